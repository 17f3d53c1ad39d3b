"""Fuzzing the three file readers users hand files to: weights (`sam_jax.load`), images (the CLI's
`read_image`) and checkpoints (`load_source`, behind `convert`). Every input, however mangled, must
end in a result or in the reader's documented error, with a short message: one line, or for a
checkpoint that does not convert a headline and its indented list of problems. Never another
exception, never a hang.

Inputs are real files (the `tiny` fixture's converted weights and `.pth`, small images of several
formats and modes) with bytes overwritten, inserted or cut, with the structure the reader parses
(the safetensors header, the zip records of a `.pth`) hit most often, and, for the weights, the
header's JSON edited field by field. `derandomize=True`: each run tries the same inputs, so a
failure reproduces. The daily tier tries 1000 inputs in all (about 10 s on a 2-core CPU); the
`full` variants five times as many.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import signal
import struct
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Sequence, Tuple, Type

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import sam_jax
from sam_jax.checkpoints import ConversionError, load_source
from sam_jax.checkpoints.errors import MAX_SHOWN
from sam_jax.cli.common import ImageError, read_image

# Seconds one input may take before it counts as a hang: ten times the slowest seen (a config of
# ~190 blocks, traced in ~6 s on a loaded 2-core CPU), so only a reader that never returns trips it.
HANG_S = 60
BUDGETS = [pytest.param(1, id="daily"), pytest.param(5, id="full", marks=pytest.mark.full)]


class Hang(BaseException):
    """An input that took longer than HANG_S: a BaseException, as KeyboardInterrupt, so that the
    readers' `except Exception` cannot turn it into their documented error."""


@contextlib.contextmanager
def no_hang(seconds: float) -> Iterator[None]:
    def alarm(signum, frame):
        raise Hang(f"no result or error after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def ends_well(read: Callable[[], object], errors: Tuple[Type[BaseException], ...]) -> None:
    """`read()` returns, or raises one of `errors` with a short message; anything else fails."""
    try:
        with no_hang(HANG_S):
            read()
    except errors as e:
        lines = str(e).splitlines()
        assert lines and lines[0].strip() and "Traceback" not in str(e), repr(e)
        # One line; a ConversionError's problems follow its headline, indented, at most MAX_SHOWN
        # and a "... and N more" line.
        assert all(line.startswith("  ") for line in lines[1:]) and len(lines) <= MAX_SHOWN + 2, str(e)


class Blob(bytes):
    """An input file's bytes, shown briefly where hypothesis reports a failing input (its repr of
    a megabyte would drown the error)."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes: {bytes(self[:48])!r}...>"


def _brief(example: object) -> object:
    if isinstance(example, tuple):
        return tuple(_brief(x) for x in example)
    return Blob(example) if isinstance(example, bytes) else example


def fuzz(budget: int, examples: int, strategy: st.SearchStrategy, check: Callable[[object], None]) -> None:
    @settings(
        max_examples=examples * budget,
        deadline=None,  # timings on a shared CPU vary; HANG_S bounds each input instead
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(strategy.map(_brief))
    def run(data: object) -> None:
        check(data)

    run()


Ranges = Sequence[Tuple[int, int]]
# Byte values an edit writes: any, and (as often) the ones the parsed formats are made of.
BYTES = st.integers(0, 255) | st.sampled_from(b'0123456789{}[]",:-. \x00\xff')


@st.composite
def mutated(draw, seeds: Sequence[bytes], hot: Sequence[Ranges] = (), resize: bool = True):
    """A seed with a few bytes overwritten, inserted or deleted (`resize`; a zip archive, whose
    index records offsets, fails on any shift), cut short, or random bytes. Edits land anywhere or,
    as often as each group of `hot` byte ranges (what the reader parses: a header, a pickle), in
    one range of that group."""
    data = bytearray(draw(st.sampled_from(seeds)))
    how = draw(st.sampled_from(["edit", "edit", "edit", "cut", "random"]))
    if how == "random":
        return draw(st.binary(max_size=1024))
    if how == "cut":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    groups = [[(0, len(data))], *([r for r in g if r[0] < r[1] <= len(data)] for g in hot)]
    for _ in range(draw(st.integers(1, 6))):
        lo, hi = draw(st.sampled_from(draw(st.sampled_from([g for g in groups if g]))))
        i = min(draw(st.integers(lo, hi - 1)), len(data) - 1)  # earlier edits may have shortened it
        op = draw(st.sampled_from(["set", "set", "insert", "delete"] if resize else ["set"]))
        if op == "set":
            data[i] = draw(BYTES)
        elif op == "insert":
            data[i:i] = bytes(draw(st.lists(BYTES, min_size=1, max_size=8)))
        elif len(data) > 8:
            del data[i : i + draw(st.integers(1, 8))]
    return bytes(data)


# --- weights ------------------------------------------------------------------------------------

JSON_VALUES = (
    st.none()
    | st.booleans()
    # Up to 400: a larger image_size passes every check and `param_shapes` allocates its dummy image.
    | st.integers(-3, 400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
    | st.lists(st.integers(-2, 40), max_size=4)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)
DTYPES = ["F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "F32", "X9"]


def _split(data: bytes) -> Tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


@st.composite
def edited_header(draw, seed: bytes):
    """The seed's safetensors header with one field of the metadata or of a tensor entry changed."""
    header, body = _split(seed)
    meta = header["__metadata__"]
    what = draw(st.sampled_from(["config field", "config", "metadata", "tensor"]))
    if what == "config field":
        config = json.loads(meta["config"])
        field = draw(st.sampled_from(sorted(config) + ["colour"]))
        if draw(st.booleans()):
            config[field] = draw(JSON_VALUES)
        else:
            config.pop(field, None)
        meta["config"] = json.dumps(config)
    elif what == "config":
        meta["config"] = json.dumps(draw(JSON_VALUES)) if draw(st.booleans()) else draw(st.text(max_size=12))
    elif what == "metadata":
        key = draw(st.sampled_from(sorted(meta)))
        if draw(st.booleans()):
            del meta[key]
        else:
            meta[key] = draw(st.text(max_size=8))
    else:
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "name", "delete"]))
        if field == "dtype":
            header[name]["dtype"] = draw(st.sampled_from(DTYPES))
        elif field == "shape":
            header[name]["shape"] = draw(st.lists(st.integers(0, 64), max_size=4))
        elif field == "data_offsets":
            header[name]["data_offsets"] = draw(st.lists(st.integers(-1, len(body) + 8), min_size=2, max_size=2))
        elif field == "name":
            header[draw(st.text(max_size=12))] = header.pop(name)
        else:
            del header[name]
    return _join(header, body)


@pytest.mark.parametrize("budget", BUDGETS)
def test_weights_reader(tiny, tmp_path_factory, budget):
    # Daily: 200 inputs, about 5 s on a 2-core CPU (full: 1000, about 20 s).
    seed = Path(tiny.weights).read_bytes()
    header_end = 8 + struct.unpack("<Q", seed[:8])[0]
    folder = tmp_path_factory.mktemp("fuzz_weights")
    # Under either name: the content tells a sam_jax file.
    names = st.sampled_from(["w.safetensors", "w.bin"])
    strategy = st.tuples(mutated([seed], [[(0, header_end)]] * 3) | edited_header(seed), names)

    def check(data_and_name: Tuple[bytes, str]) -> None:
        data, name = data_and_name
        (folder / name).write_bytes(data)
        ends_well(lambda: sam_jax.load(folder / name), (ValueError, OSError))

    fuzz(budget, 200, strategy, check)


# --- images -------------------------------------------------------------------------------------


def _image_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8))
    out = []
    for im, fmt, kw in [
        (rgb, "PNG", {}),
        (rgb.convert("LA"), "PNG", {}),
        (rgb.convert("P"), "PNG", {}),
        (Image.fromarray(rng.integers(0, 65536, (5, 7), dtype=np.uint16)), "PNG", {}),
        (rgb, "JPEG", {"quality": 90}),
        (rgb.convert("L"), "JPEG", {}),
        (rgb.convert("CMYK"), "JPEG", {}),
        (rgb, "GIF", {}),
        (rgb, "TIFF", {"compression": "tiff_deflate"}),
        (Image.fromarray(rng.random((4, 5), dtype=np.float32)), "TIFF", {}),
        (rgb, "WEBP", {}),
        (rgb, "BMP", {}),
    ]:
        buf = io.BytesIO()
        if fmt == "JPEG" and im.mode == "RGB":  # an EXIF orientation for exif_transpose to apply
            exif = Image.Exif()
            exif[0x0112] = 6
            kw = {**kw, "exif": exif.tobytes()}
        im.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out


@pytest.mark.parametrize("budget", BUDGETS)
def test_image_reader(tmp_path_factory, budget):
    # Daily: 600 inputs, about 3 s (full: 3000, about 20 s).
    path = tmp_path_factory.mktemp("fuzz_images") / "image"

    def check(data: bytes) -> None:
        path.write_bytes(data)
        result = []
        ends_well(lambda: result.append(read_image(str(path))), (ImageError,))
        if result:
            image = result[0]
            assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3, image
            assert image.shape[2] == 3 and image.size > 0

    # Past the signature (8 bytes at most), the headers of these small files lie in their first 200 bytes.
    fuzz(budget, 600, mutated(_image_seeds(), [[(8, 200)]] * 2), check)


# --- checkpoints --------------------------------------------------------------------------------


def _zip_structure(data: bytes) -> list[Ranges]:
    """Byte ranges of a torch zip checkpoint that its reader parses, in groups: the pickle (twice
    as often: it is what the unpickler reads), the central directory at the end, the records'
    local headers."""
    records = zipfile.ZipFile(io.BytesIO(data)).infolist()
    pickle = next(i for i in records if i.filename.endswith("data.pkl"))
    end = max(i.header_offset + 100 + i.compress_size for i in records)
    return [
        *[[(pickle.header_offset, pickle.header_offset + 100 + pickle.compress_size)]] * 2,
        [(min(end, len(data) - 1), len(data))],
        [(i.header_offset, i.header_offset + 30 + len(i.filename) + 64) for i in records],
    ]


@pytest.mark.parametrize("budget", BUDGETS)
def test_checkpoint_reader(tiny, tmp_path_factory, budget):
    # Daily: 200 inputs, about 2 s (full: 1000, about 15 s).
    seed = Path(tiny.pth).read_bytes()
    path = tmp_path_factory.mktemp("fuzz_checkpoints") / "sam.pth"
    structure = _zip_structure(seed)

    def check(data: bytes) -> None:
        path.write_bytes(data)
        result = []
        ends_well(lambda: result.append(load_source(str(path))), (ConversionError,))
        if result:
            config, params = result[0]
            assert isinstance(config, sam_jax.SamConfig) and math.isfinite(sam_jax.count_params(params))

    fuzz(budget, 200, mutated([seed], structure, resize=False), check)
