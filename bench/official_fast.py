"""The strongest configuration of the official PyTorch SAM that a benchmark should compare against.

Eager fp32 is not what a PyTorch user on a GPU runs. `configure_official` gives the official
model, unchanged in its weights, three standard speed-ups, each optional:

  * sdpa: every image-encoder `Attention` computes `F.scaled_dot_product_attention` with the
    decomposed relative-position terms as an additive mask (the official code materialises
    softmax(q k^T + bias) by hand). On CUDA this takes PyTorch's memory-efficient kernel;
  * bf16: the image encoder runs under `torch.autocast(device, torch.bfloat16)` (weights stay
    fp32, PyTorch's mixed precision) and hands fp32 features on. The prompt encoder and mask
    decoder stay fp32: the official `predict` converts its outputs with `.numpy()`, which has no
    bf16, and they are a small share of the FLOPs;
  * compile: `torch.compile` of the image encoder (the FLOPs are there; the prompt encoder and
    mask decoder are small and shape-polymorphic in the predictor).

The SDPA forward is checked against the official one in tests/bench/test_official_fast.py, so a
speed-up measured against it is a speed-up against the same function.
"""

from __future__ import annotations

import dataclasses
import types

import torch
import torch.nn.functional as F

MODES = ("eager", "fast")


def default_device() -> str:
    """cuda when torch sees one, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_mode(device: str) -> str:
    """ "fast" on CUDA; "eager" elsewhere (a CPU's bf16 is emulated: compiled bf16 is slower there)."""
    return "fast" if torch.device(device).type == "cuda" else "eager"


@dataclasses.dataclass(frozen=True)
class OfficialConfig:
    """How the official model runs: the device, and which of the speed-ups are on."""

    device: str = "cpu"
    sdpa: bool = False
    bf16: bool = False
    compile: bool = False

    @classmethod
    def from_mode(cls, mode: str, device: str) -> "OfficialConfig":
        """ "eager": fp32 as the official code ships; "fast": SDPA + bf16 autocast + torch.compile."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        fast = mode == "fast"
        return cls(device=device, sdpa=fast, bf16=fast, compile=fast)

    def describe(self) -> str:
        parts = [
            p for p, on in (("SDPA", self.sdpa), ("bf16 autocast", self.bf16), ("torch.compile", self.compile)) if on
        ]
        return f"{self.device}, " + (" + ".join(parts) if parts else "eager fp32")


def sdpa_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The official image-encoder `Attention.forward`, with the softmax(q k^T * scale + rel-pos)
    @ v done by `F.scaled_dot_product_attention` (its default scale is head_dim ** -0.5, the
    official `self.scale`). The rel-pos terms are computed from the unscaled q, as officially."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    b, h, w, _ = x.shape
    n = h * w
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
    bias = None
    if self.use_rel_pos:
        rq = q.reshape(b, self.num_heads, h, w, -1)
        rh = get_rel_pos(h, h, self.rel_pos_h).to(rq.dtype)
        rw = get_rel_pos(w, w, self.rel_pos_w).to(rq.dtype)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", rq, rh)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", rq, rw)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, self.num_heads, n, n)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = out.reshape(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return self.proj(out)


def use_sdpa(image_encoder: torch.nn.Module) -> int:
    """Switches every official `Attention` under image_encoder to `sdpa_attention_forward`;
    returns how many were switched."""
    from segment_anything.modeling.image_encoder import Attention

    n = 0
    for m in image_encoder.modules():
        if isinstance(m, Attention):
            m.forward = types.MethodType(sdpa_attention_forward, m)
            n += 1
    return n


class Bf16Encoder(torch.nn.Module):
    """Runs the wrapped image encoder under bf16 autocast and returns fp32 features."""

    def __init__(self, encoder: torch.nn.Module, device_type: str):
        super().__init__()
        self.encoder, self.device_type = encoder, device_type
        self.img_size = getattr(encoder, "img_size", None)  # read by the official Sam.preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.encoder(x).float()


def configure_official(sam: torch.nn.Module, cfg: OfficialConfig) -> torch.nn.Module:
    """Moves the official `Sam` to cfg.device in eval mode and applies cfg's speed-ups to its
    image encoder, in place; returns sam. Run it under `torch.no_grad()`, as the official
    predictor does."""
    sam.to(cfg.device).eval()
    encoder = sam.image_encoder
    if cfg.sdpa and use_sdpa(encoder) == 0:
        raise ValueError("no official image-encoder Attention found to switch to SDPA")
    if cfg.compile:
        encoder = torch.compile(encoder)
    if cfg.bf16:
        encoder = Bf16Encoder(encoder, torch.device(cfg.device).type)
    sam.image_encoder = encoder
    return sam


def synchronize(device: str) -> None:
    """Waits for the device's queued work (CUDA calls return before their kernels finish)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def torch_matmul_tflops(device: str, n: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matmul rate of torch on the device, TFLOP/s (n x n x n, after warm-up)."""
    import time

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12
