"""Backend tuning: every choice that depends on which XLA backend runs the model, and what it buys.

Nothing else in sam_jax reads the backend or the devices to decide how to compute: modeling asks
`attention_chunk_rows` and `fused_attention_kernel`, the predictor and AMG compile with
`jit_tuned` and the predictor runs its encoder through `encode_staged`. None of it changes a
result beyond float rounding. This module imports nothing from sam_jax (modeling imports it).

Measured 2026-12-05, jax / jaxlib 0.10.2, on a 2-core AMD EPYC VM (no AVX-512), random vit_b
params, in ONE process with the variants' repeats interleaved. Other work shared the two cores
(load 6-9): absolute times are ~3x the unloaded ones and the spread is wide, so read the medians
and the per-round ratios.

  vit_b image encoder, batch 1, 1024 x 1024 (5 rounds after warm-up):
    one jit, XLA's defaults            median 32.95 s  (24.09 - 40.82)
    one jit, CPU_XLA_OPTIONS           median 37.60 s  (19.08 - 45.70)
    `encode_staged` (the chain below)  median 29.36 s  (14.80 - 29.67)
  The chain was the fastest in every round: staged / defaults per round 0.40 - 0.90, median
  0.73; staged / options 0.41 - 0.78, median 0.76. The staging still pays; the options alone
  do not (the global blocks' attention needs XLA's defaults, the rest runs better without).

  vit_b decoder, 64 boxes, image context, one jit each (9 rounds, load 6-9): XLA's defaults
  8.47 s (6.56 - 12.26), CPU_XLA_OPTIONS 8.47 s (6.48 - 10.44): within the noise of that run.
  An earlier unloaded same-run A/B (jaxlib 0.10) gave predict_batch with 64 boxes 3.17 -> 2.73 s
  and AMG from an embedding 32.0 -> 27.4 s with the options.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# --- XLA:CPU compiler options ---

# XLA:CPU (jaxlib 0.10) by default hands each dot, with the elementwise ops and reductions around
# it, to a YNNPACK "library fusion", which runs them one after another over whole tensors. The
# decoder's ~100 small dots among LayerNorms and softmaxes, the mask upscaling and the encoder's
# windowed blocks run better on XLA's own loop fusions; the global blocks' chunked attention runs
# ~1.8x slower on them (see `encoder_stages`).
CPU_XLA_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.lru_cache(maxsize=None)
def cpu_compiler_options() -> Optional[Dict[str, str]]:
    """`CPU_XLA_OPTIONS` if this XLA knows them (checked once by a tiny compile), else None."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_XLA_OPTIONS).lower(np.zeros(1, np.float32)).compile()
    except jax.errors.JaxRuntimeError as e:
        # What an XLA without the option raises: "INVALID_ARGUMENT: No such compile option: '...'".
        if "No such compile option" not in str(e):
            raise
        return None
    return dict(CPU_XLA_OPTIONS)


class _TunedJit:
    """`jax.jit(fun, **kw)` with `cpu_compiler_options()`, created at the first call (the options
    check compiles, which should not happen at import). Other attributes are the jitted
    function's (`lower`, ...)."""

    def __init__(self, fun: Callable, **kw: Any) -> None:
        self._fun, self._kw, self._jit = fun, kw, None
        functools.update_wrapper(self, fun)

    def _get(self) -> Callable:
        if self._jit is None:
            opts = cpu_compiler_options()
            self._jit = jax.jit(self._fun, **self._kw, **({"compiler_options": opts} if opts else {}))
        return self._jit

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._get()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("_fun", "_kw", "_jit"):  # not set yet (e.g. while copying): no recursion
            raise AttributeError(name)
        return getattr(self._get(), name)


def jit_tuned(fun: Callable, **kw: Any) -> Callable:
    """`jax.jit(fun, **kw)`, compiled with `cpu_compiler_options()` where this XLA knows them
    (XLA's defaults otherwise). Safe at import time: the options are checked at the first call."""
    return _TunedJit(fun, **kw)


# --- The image encoder as a chain of stages (XLA:CPU) ---


def encoder_stages(config: Any) -> Tuple[Tuple[int, int, bool], ...]:
    """(start, stop, xla_defaults) stages of a `SamConfig`'s image encoder, in half-blocks (2i:
    block i's attention half, 2i + 1: its MLP half; see `Sam.encode_image_layers`): the attention
    half of each global block alone, with XLA's default options; everything between them in one
    stage each, with `CPU_XLA_OPTIONS` (vit_b: half-blocks 0-3, 4, 5-9, 10, 11-15, 16, 17-21, 22,
    23). One executable cannot mix the two options, hence the chain."""
    stages, start = [], 0
    for g in sorted(config.encoder_global_attn_indexes):
        if start < 2 * g:
            stages.append((start, 2 * g, False))
        stages.append((2 * g, 2 * g + 1, True))
        start = 2 * g + 1
    stages.append((start, 2 * config.encoder_depth, False))
    return tuple(stages)


def staging_pays(config: Any = None, int8_activations: bool = False) -> bool:
    """Whether `encode_staged` beats one jit of the encoder here: on XLA:CPU where this XLA knows
    `CPU_XLA_OPTIONS` (measured above), for SAM's ViT (a `SamConfig` whose `encoder_type` is not
    "vit" has no stages: MobileSAM's TinyViT runs as one jit; nor, for now, SAM-HQ's, which also
    returns the tokens after its first global block). Elsewhere one jit is the choice.

    int8_activations (a "w8a8" model of `sam_jax.quantize`): one jit with XLA's defaults, whose
    YNNPACK fusions run the int8 x int8 -> int32 dots and the activations' quantization far faster
    than XLA's own fusions. Measured 2026-12-05, jax 0.10.2, the 2-core EPYC with nothing else
    running, random vit_b params in "w8a8", 3 interleaved rounds after warm-up: one jit with XLA's
    defaults median 7.42 s, one jit with CPU_XLA_OPTIONS 15.84 s, `encode_staged` 13.13 s (its
    stages but the global attention halves run without YNNPACK). fp32, bf16 and "w8" (float
    compute) keep the chain (`python bench/profile_ops.py`: one jit 8.2 / 11.9 / 9.0 s against
    set_image's 7.8 / 8.9 / 7.4 s staged in the same quiet spell)."""
    if config is not None and (config.encoder_type != "vit" or config.hq):
        return False  # SAM-HQ also needs the tokens after the first global block: one jit for now
    if int8_activations:
        return False
    return _cpu_options_known()


def encoder_runs_tuned(config: Any) -> bool:
    """Whether an encoder that runs as one jit (not staged) compiles with `CPU_XLA_OPTIONS`:
    MobileSAM's TinyViT on XLA:CPU, whose depthwise convolutions, BatchNorms and small windowed
    attentions run better on XLA's own fusions. Measured 2026-12-05, jax 0.10.2, the 2-core EPYC
    above with nothing else running, random mobile_sam params, 1024 x 1024, 7 interleaved rounds:
    XLA's defaults median 1.25 s, CPU_XLA_OPTIONS 0.87 s (per-round ratio 0.67 - 0.71)."""
    return config.encoder_type == "tiny_vit" and _cpu_options_known()


def _cpu_options_known() -> bool:
    """XLA:CPU runs the model, and this XLA knows `CPU_XLA_OPTIONS`."""
    return jax.default_backend() == "cpu" and cpu_compiler_options() is not None


def _encoder_stage(model: Any, params: Any, x: jax.Array, start: int, stop: int) -> jax.Array:
    return model.apply({"params": params}, x, start, stop, method="encode_image_layers")


_STAGE_STATIC = ("model", "start", "stop")
_stage_xla_defaults = jax.jit(_encoder_stage, static_argnames=_STAGE_STATIC)
_stage_tuned = jit_tuned(_encoder_stage, static_argnames=_STAGE_STATIC)


def encode_staged(model: Any, params: Any, x: jax.Array) -> jax.Array:
    """`Sam.encode_image` on preprocessed images (B, S, S, 3) NHWC -> embeddings (B, h, w, C)
    NHWC float32, run as the chain of `encoder_stages`, each jitted with the options it runs
    fastest with (call it as is, not inside your own jit; use it where `staging_pays()`). The same
    embeddings as one jit up to float rounding; each stage compiles once per batch size. Stages
    take the whole parameter tree: jit drops the parameters a stage does not read."""
    for start, stop, xla_defaults in encoder_stages(model.config):
        run = _stage_xla_defaults if xla_defaults else _stage_tuned
        x = run(model, params, x, start=start, stop=stop)
    return x


# --- Compiling ahead (SamPredictor's compile_ahead) ---


def compile_beside_encoder() -> bool:
    """Whether `SamPredictor` compiles its interactive decoder programs ahead *while* `set_image`
    encodes (True: the encoder runs on an accelerator, the compiles on host cores it leaves free),
    or only once the encoder is done (XLA:CPU, where both share the same cores: compiling beside the
    encoder made vit_b's first `set_image` 12 s -> 22 s on a 2-core CPU for the same total work).
    After the encoder, the programs compile while the user looks at the image; the first `predict`
    moves its own program to the front of the queue."""
    return jax.default_backend() != "cpu"


# --- The encoder's attention (asked by modeling.image_encoder at trace time) ---

# Score-matrix bytes one step of the chunked attention materialises on CPU (per head, a few grid
# rows of queries against every key): 4 MiB keeps a step's scores in cache; the full global
# attention of vit_b would write 12 x 4096 x 4096 floats (805 MB) per block.
CHUNK_BYTES = 4 << 20


def attention_chunk_rows(h: int, w: int) -> Optional[int]:
    """Query rows per step of the "chunked" attention over an h x w grid, so that a step's scores
    stay near CHUNK_BYTES; None (all rows at once) on accelerators and for small grids."""
    if jax.default_backend() != "cpu":
        return None
    target = max(1, CHUNK_BYTES // (4 * w * h * w))
    if target >= h:
        return None
    return max(r for r in range(1, target + 1) if h % r == 0)


def fused_attention_kernel(dtype: Any, head_dim: int) -> Optional[str]:
    """The `implementation` to ask `jax.nn.dot_product_attention` for: "cudnn" where cuDNN's fused
    attention takes the inputs (a CUDA device, bf16 / fp16, head dim a multiple of 8 up to 128),
    else None (JAX's choice). Left to choose with a bias, JAX ran XLA's attention on an H100
    (jax 0.11.2): the vit_h encoder at batch 8 in bf16 took 187.9 ms that way, 136.5 ms on cuDNN."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return None
    if head_dim % 8 or head_dim > 128:
        return None
    try:
        device = jax.devices()[0]
        cuda = device.platform == "gpu" and "cuda" in str(device.client.platform_version).lower()
    except (RuntimeError, AttributeError):
        return None
    return "cudnn" if cuda else None
