// The sam-jax demo page: plain JavaScript drawing on one canvas (see sam_jax/demo/__init__.py).
// Prompts go to the server as pixels of the image as displayed, (x, y) in [0, W] x [0, H]; masks
// come back as 1-bit PNGs (white = mask, transparent elsewhere) at the image's size.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");
const stage = $("stage");
const statusLine = $("status");

const MASK_COLOUR = "rgb(30, 144, 255)";
const MASK_ALPHA = 0.55;
const ALL_ALPHA = 0.5;
const BOX_COLOUR = "#ffd400";
const DRAG_PX = 5; // a press that moves less than this many screen pixels is a click
const THUMB_PX = 64;

let info = { max_bytes: Infinity, model: "" };
const state = {
  image: null, // {id, width, height, name, scale, photo: canvas at display size}
  points: [], // [x, y, label] in image pixels, label 1 on the object, 0 off it
  box: null, // [x0, y0, x1, y1] in image pixels
  history: [], // for undo: {kind: "point"} or {kind: "box", previous}
  version: 0, // bumped by every change of the prompt; answers for older versions are dropped
  inFlight: false,
  queued: null, // the click time of a change made while a request was in flight
  result: null, // the shown answer: {masks, scores, best, selected, bitmaps}
  overlay: null, // its selected mask, tinted, at display size
  all: null, // "segment everything": {records, overlay}
  drag: null,
  busy: false, // an embedding or "segment everything" under way
  opening: 0,
};
// Click-to-mask round trips in ms, from the click (the button's release) to the frame that shows
// the mask: read by the tests, and shown in the status line.
window.samDemo = { state, roundTrips: [] };
window.lastRoundTripMs = null;

// --- status line ---

let busyTimer = null;

function setStatus(text, kind = "") {
  if (busyTimer !== null) {
    clearInterval(busyTimer);
    busyTimer = null;
  }
  statusLine.textContent = text;
  statusLine.className = kind;
}

function setBusy(text) {
  const start = performance.now();
  setStatus("", "busy");
  const show = () => {
    statusLine.textContent = `${text} ${((performance.now() - start) / 1000).toFixed(1)} s`;
  };
  show();
  busyTimer = setInterval(show, 100);
}

// --- server ---

async function api(url, options = {}) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (e) {
    throw new Error(`the server cannot be reached (${e.message}): is sam-jax demo still running?`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = null;
  }
  if (!response.ok) {
    throw new Error(data && data.error ? data.error : `the server answered ${response.status} ${response.statusText}`);
  }
  if (data === null) throw new Error("the server's answer is not JSON");
  return data;
}

function postJSON(url, body) {
  return api(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

function base64Blob(b64, type) {
  return new Blob([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], { type });
}

function pngBitmap(b64) {
  return createImageBitmap(base64Blob(b64, "image/png"));
}

// --- drawing ---

function newCanvas(w, h) {
  const c = document.createElement("canvas");
  c.width = w;
  c.height = h;
  return c;
}

// A mask (white on transparent) as a canvas of w x h in one colour.
function tinted(bitmap, colour, w, h) {
  const c = newCanvas(w, h);
  const g = c.getContext("2d");
  g.drawImage(bitmap, 0, 0, w, h);
  g.globalCompositeOperation = "source-in";
  g.fillStyle = colour;
  g.fillRect(0, 0, w, h);
  return c;
}

function scaled(bitmap, w, h) {
  const c = newCanvas(w, h);
  const g = c.getContext("2d");
  g.imageSmoothingQuality = "high";
  g.drawImage(bitmap, 0, 0, w, h);
  return c;
}

function drawBox(b, dashed) {
  ctx.save();
  ctx.lineWidth = 2;
  ctx.strokeStyle = BOX_COLOUR;
  if (dashed) ctx.setLineDash([6, 4]);
  ctx.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
  ctx.restore();
}

function drawPoint(x, y, label) {
  ctx.beginPath();
  ctx.arc(x, y, 5, 0, 2 * Math.PI);
  ctx.fillStyle = label === 1 ? "#18b544" : "#e0262f";
  ctx.fill();
  ctx.lineWidth = 1.5;
  ctx.strokeStyle = "#fff";
  ctx.stroke();
}

function draw() {
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const image = state.image;
  if (!image) return;
  ctx.drawImage(image.photo, 0, 0);
  if (state.all && $("show-all").checked) {
    ctx.globalAlpha = ALL_ALPHA;
    ctx.drawImage(state.all.overlay, 0, 0);
    ctx.globalAlpha = 1;
  }
  if (state.overlay) {
    ctx.globalAlpha = MASK_ALPHA;
    ctx.drawImage(state.overlay, 0, 0);
    ctx.globalAlpha = 1;
  }
  const s = image.scale;
  if (state.box) drawBox(state.box.map((v) => v * s), false);
  const d = state.drag;
  if (d && d.moved) drawBox([Math.min(d.sx, d.x), Math.min(d.sy, d.y), Math.max(d.sx, d.x), Math.max(d.sy, d.y)], true);
  for (const [x, y, label] of state.points) drawPoint(x * s, y * s, label);
}

function updateButtons() {
  const prompts = state.points.length > 0 || state.box !== null;
  $("undo").disabled = state.history.length === 0;
  $("clear").disabled = !(prompts || state.all);
  $("everything").disabled = !state.image || state.busy;
  $("download-mask").disabled = !state.result;
  $("download-all").disabled = !state.all;
  $("show-all").disabled = !state.all;
}

// --- opening an image ---

async function openFile(file) {
  if (!file) return;
  const ticket = ++state.opening;
  if (file.size > info.max_bytes) {
    setStatus(`${file.name} is ${(file.size / 1e6).toFixed(1)} MB; this server takes at most ${info.max_bytes / 1e6} MB`, "error");
    return;
  }
  showImage(null);
  let bitmap = null;
  try {
    bitmap = await createImageBitmap(file); // EXIF orientation applied, as the server reads it
  } catch (e) {
    bitmap = null; // a format the browser does not show (TIFF, ...): the server sends a preview
  }
  state.busy = true;
  updateButtons();
  setBusy(`Computing the image embedding of ${file.name}…`);
  let res;
  try {
    const url = bitmap ? "api/image" : "api/image?preview=1";
    res = await api(url, { method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" } });
    if (!bitmap) bitmap = await createImageBitmap(base64Blob(res.preview, "image/jpeg"));
  } catch (e) {
    if (ticket === state.opening) {
      state.busy = false;
      updateButtons();
      setStatus(`${file.name}: ${e.message}`, "error");
    }
    return;
  }
  if (ticket !== state.opening) return; // another file was opened meanwhile
  state.busy = false;
  let note = "";
  if (bitmap.width !== res.width || bitmap.height !== res.height) {
    note = ` The browser shows it as ${bitmap.width}x${bitmap.height}: it is drawn stretched to the server's frame.`;
  }
  showImage({ id: res.id, width: res.width, height: res.height, name: file.name }, bitmap);
  setStatus(`${file.name}: ${res.width}x${res.height}, embedding computed in ${res.seconds.toFixed(1)} s. ` +
    `Click on an object.${note}`);
}

function fitScale(w, h) {
  const maxW = Math.max(200, stage.clientWidth - 4);
  const maxH = Math.max(200, window.innerHeight - stage.getBoundingClientRect().top - 24);
  return Math.min(1, maxW / w, maxH / h);
}

function showImage(image, bitmap) {
  state.image = image;
  state.points = [];
  state.box = null;
  state.history = [];
  state.version++;
  state.result = null;
  state.overlay = null;
  state.all = null;
  if (image) {
    image.scale = fitScale(image.width, image.height);
    const w = Math.max(1, Math.round(image.width * image.scale));
    const h = Math.max(1, Math.round(image.height * image.scale));
    image.photo = scaled(bitmap, w, h);
    bitmap.close();
    canvas.width = w;
    canvas.height = h;
  } else {
    canvas.width = 0;
    canvas.height = 0;
  }
  stage.classList.toggle("loaded", !!image);
  showCandidates();
  updateButtons();
  draw();
}

// --- prompts ---

function toImage(px, py) {
  const image = state.image;
  const x = (Math.min(Math.max(px, 0), canvas.clientWidth) / canvas.clientWidth) * image.width;
  const y = (Math.min(Math.max(py, 0), canvas.clientHeight) / canvas.clientHeight) * image.height;
  return [Math.round(x * 10) / 10, Math.round(y * 10) / 10];
}

canvas.addEventListener("contextmenu", (e) => e.preventDefault());

canvas.addEventListener("pointerdown", (e) => {
  if (!state.image || (e.button !== 0 && e.button !== 2)) return;
  canvas.setPointerCapture(e.pointerId);
  state.drag = { sx: e.offsetX, sy: e.offsetY, x: e.offsetX, y: e.offsetY, negative: e.button === 2 || e.shiftKey };
});

canvas.addEventListener("pointermove", (e) => {
  const d = state.drag;
  if (!d) return;
  d.x = e.offsetX;
  d.y = e.offsetY;
  if (!d.moved && Math.hypot(d.x - d.sx, d.y - d.sy) >= DRAG_PX) d.moved = true;
  if (d.moved) draw();
});

canvas.addEventListener("pointerup", (e) => {
  const d = state.drag;
  if (!d) return;
  const t0 = performance.now();
  state.drag = null;
  d.x = e.offsetX;
  d.y = e.offsetY;
  if (d.moved) {
    const [x0, y0] = toImage(Math.min(d.sx, d.x), Math.min(d.sy, d.y));
    const [x1, y1] = toImage(Math.max(d.sx, d.x), Math.max(d.sy, d.y));
    state.history.push({ kind: "box", previous: state.box });
    state.box = [x0, y0, x1, y1];
  } else {
    const [x, y] = toImage(d.sx, d.sy);
    state.points.push([x, y, d.negative ? 0 : 1]);
    state.history.push({ kind: "point" });
  }
  changed(t0);
});

canvas.addEventListener("pointercancel", () => {
  state.drag = null;
  draw();
});

function changed(t0) {
  state.version++;
  draw();
  updateButtons();
  requestPredict(t0);
}

function undo() {
  const last = state.history.pop();
  if (!last) return;
  if (last.kind === "point") state.points.pop();
  else state.box = last.previous;
  changed(performance.now());
}

function clearAll() {
  state.points = [];
  state.box = null;
  state.history = [];
  state.all = null;
  changed(performance.now());
}

// Asks for the masks of the current prompt; while a request is in flight, the latest change
// waits for it and goes next (clicks faster than the server are merged, never queued up).
function requestPredict(t0) {
  const image = state.image;
  if (!image) return;
  if (state.points.length === 0 && state.box === null) {
    state.result = null;
    state.overlay = null;
    showCandidates();
    updateButtons();
    draw();
    return;
  }
  if (state.inFlight) {
    state.queued = t0;
    return;
  }
  state.inFlight = true;
  const version = state.version;
  const body = { id: image.id, points: state.points, box: state.box, multimask: true };
  if (info.hq) body.hq_token_only = $("hq-token-only").checked;
  postJSON("api/predict", body)
    .then(async (res) => {
      if (version !== state.version) return; // the prompt changed meanwhile: its own answer follows
      await showResult(res);
      if (version !== state.version) return;
      const ms = await nextFrame(t0);
      if (!state.busy && version === state.version) {
        const k = res.best;
        setStatus(`Mask ${k + 1} of ${res.masks.length} (the best), score ${res.scores[k].toFixed(3)}: ` +
          `${ms.toFixed(0)} ms from the click (the model ${res.ms.toFixed(0)} ms).`);
      }
      // Thumbnails of the three, while the next click may already go out.
      showCandidates().catch((e) => setStatus(`cannot show the candidates: ${e.message}`, "error"));
    })
    .catch((e) => {
      if (state.image === image) setStatus(e.message, "error");
    })
    .finally(() => {
      state.inFlight = false;
      if (state.queued !== null) {
        const t = state.queued;
        state.queued = null;
        requestPredict(t);
      }
    });
}

async function showResult(res) {
  const bitmaps = res.masks.map(() => null);
  bitmaps[res.best] = await pngBitmap(res.masks[res.best]);
  state.result = { ...res, selected: res.best, bitmaps };
  state.overlay = tinted(bitmaps[res.best], MASK_COLOUR, canvas.width, canvas.height);
  updateButtons();
  draw();
}

// Resolves at the frame that shows what was drawn, with the time since t0 in ms.
function nextFrame(t0) {
  return new Promise((resolve) => {
    requestAnimationFrame(() => {
      const ms = performance.now() - t0;
      window.lastRoundTripMs = ms;
      window.samDemo.roundTrips.push(ms);
      resolve(ms);
    });
  });
}

function candidatesHint() {
  // SAM-HQ's predictor returns one mask per prompt (its HQ output), SAM's three.
  return info.hq
    ? "SAM-HQ proposes one mask for each prompt."
    : "The model proposes three masks for each prompt; the best is shown. Pick another here.";
}

async function showCandidates() {
  const list = $("candidates");
  const r = state.result;
  if (!r) {
    list.innerHTML = `<p class="hint">${candidatesHint()}</p>`;
    return;
  }
  await Promise.all(r.bitmaps.map(async (b, k) => {
    if (!b) r.bitmaps[k] = await pngBitmap(r.masks[k]);
  }));
  if (state.result !== r) return;
  const s = Math.min(1, THUMB_PX / Math.max(canvas.width, canvas.height));
  const w = Math.max(1, Math.round(canvas.width * s));
  const h = Math.max(1, Math.round(canvas.height * s));
  const buttons = r.masks.map((_, k) => {
    const button = document.createElement("button");
    button.className = "candidate" + (k === r.selected ? " selected" : "");
    button.dataset.index = String(k);
    const thumb = newCanvas(w, h);
    const g = thumb.getContext("2d");
    g.drawImage(state.image.photo, 0, 0, w, h);
    g.globalAlpha = 0.7;
    g.drawImage(tinted(r.bitmaps[k], MASK_COLOUR, w, h), 0, 0);
    const text = document.createElement("span");
    text.textContent = `score ${r.scores[k].toFixed(3)}`;
    if (k === r.best) {
      const best = document.createElement("div");
      best.className = "best";
      best.textContent = "best";
      text.append(best);
    }
    button.append(thumb, text);
    button.addEventListener("click", () => select(k));
    return button;
  });
  list.replaceChildren(...buttons);
}

function select(k) {
  const r = state.result;
  if (!r || !r.bitmaps[k]) return;
  r.selected = k;
  state.overlay = tinted(r.bitmaps[k], MASK_COLOUR, canvas.width, canvas.height);
  for (const b of document.querySelectorAll(".candidate")) b.classList.toggle("selected", b.dataset.index === String(k));
  setStatus(`Mask ${k + 1} of ${r.masks.length}, score ${r.scores[k].toFixed(3)}.`);
  draw();
}

// --- segment everything ---

function numberField(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text); // NaN is sent as null, and refused by the server
}

async function segmentEverything() {
  const image = state.image;
  if (!image || state.busy) return;
  const body = {
    id: image.id,
    points_per_side: numberField("points-per-side"),
    pred_iou_thresh: numberField("iou-thresh"),
    stability_score_thresh: numberField("stability-thresh"),
  };
  state.busy = true;
  updateButtons();
  setBusy(`Segmenting everything (${body.points_per_side} x ${body.points_per_side} points)…`);
  try {
    const res = await postJSON("api/everything", body);
    if (state.image !== image) return;
    const bitmap = await pngBitmap(res.labels);
    state.all = { records: res.records, overlay: scaled(bitmap, canvas.width, canvas.height) };
    bitmap.close();
    $("show-all").checked = true;
    const none = res.count === 0 ? ": none passed the thresholds; lower them to see more" : "";
    setStatus(`${res.count} mask${res.count === 1 ? "" : "s"} in ${res.seconds.toFixed(1)} s${none}.`);
  } catch (e) {
    if (state.image === image) setStatus(e.message, "error");
  } finally {
    if (state.image === image) state.busy = false;
    updateButtons();
    draw();
  }
}

// --- downloads ---

function download(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 60000);
}

$("download-mask").addEventListener("click", () => {
  const r = state.result;
  if (r) download(base64Blob(r.masks[r.selected], "image/png"), `${state.image.name}.mask.png`);
});

// The records `sam-jax amg --output-mode coco_rle` writes for this image, under its name too.
$("download-all").addEventListener("click", () => {
  if (state.all) download(new Blob([JSON.stringify(state.all.records)], { type: "application/json" }), `${state.image.name}.json`);
});

// --- wiring ---

$("file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  e.target.value = ""; // so that opening the same file again is a change
  openFile(file);
});
$("undo").addEventListener("click", undo);
$("clear").addEventListener("click", clearAll);
$("everything").addEventListener("click", segmentEverything);
$("show-all").addEventListener("change", draw);
// SAM-HQ: the same prompt again, with or without SAM's mask added to the HQ mask.
$("hq-token-only").addEventListener("change", () => {
  state.version++;
  requestPredict(performance.now());
});

window.addEventListener("keydown", (e) => {
  if ((e.ctrlKey || e.metaKey) && e.key === "z" && e.target.tagName !== "INPUT") {
    e.preventDefault();
    undo();
  }
});

window.addEventListener("dragover", (e) => {
  e.preventDefault();
  stage.classList.add("dragover");
});
window.addEventListener("dragleave", (e) => {
  if (!e.relatedTarget) stage.classList.remove("dragover");
});
window.addEventListener("drop", (e) => {
  e.preventDefault();
  stage.classList.remove("dragover");
  const file = e.dataTransfer && e.dataTransfer.files[0];
  if (file) openFile(file);
  else setStatus("Drop an image file.", "error");
});

api("api/info")
  .then((i) => {
    info = i;
    $("model").textContent = i.model ? `model: ${i.model}` : "";
    $("hq-token-only-label").hidden = !i.hq; // the option exists for SAM-HQ weights only
    if (!state.result) $("candidates").innerHTML = `<p class="hint">${candidatesHint()}</p>`;
    $("points-per-side").value = i.everything.points_per_side;
    $("points-per-side").max = i.max_points_per_side;
    $("iou-thresh").value = i.everything.pred_iou_thresh;
    $("stability-thresh").value = i.everything.stability_score_thresh;
  })
  .catch((e) => setStatus(e.message, "error"));
