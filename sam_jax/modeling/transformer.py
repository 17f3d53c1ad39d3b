"""Two-way transformer: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import TORCH_LN_EPS, Dtype, MatmulLayerNorm, MLPBlock, layer_norm, product, stream_dtype


class _DenseParams(nn.Module):
    """An `nn.Dense`'s parameters (same names, shapes and initialisers), returned, not applied:
    `Attention` needs the matrices themselves to choose the order of its products."""

    in_features: int
    features: int

    @nn.compact
    def __call__(self) -> Tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.in_features, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return kernel, bias


def attention_plan(n_q: int, n_k: int, dim: int, internal: int, heads: int) -> str:
    """Which order of products `Attention` uses for n_q queries and n_k keys: "standard",
    "few_queries" or "few_keys" -- the one with the fewest multiply-adds (see `Attention`)."""
    hd = internal // heads
    proj = n_q * dim * internal + 2 * n_k * dim * internal + n_q * internal * dim
    cost = {
        "standard": proj + 2 * n_q * n_k * internal,
        # q projected; keys/values stay `dim` wide: scores and the weighted sum cost n_k*dim per
        # (query, head); the value and output projections then act on n_q*heads vectors.
        "few_queries": (
            n_q * dim * internal
            + n_q * heads * hd * dim
            + 2 * n_k * dim * n_q * heads
            + n_q * heads * dim * hd
            + n_q * internal * dim
        ),
        # k, v projected; queries stay `dim` wide; the output projection is folded into the values.
        "few_keys": (
            2 * n_k * dim * internal + n_k * heads * hd * dim + n_k * heads * hd * dim + 2 * n_q * dim * n_k * heads
        ),
    }
    return min(cost, key=cost.get)


class Attention(nn.Module):
    """Multi-head attention whose projections may shrink the width by `downsample_rate`.

    The decoder attends 4096 image tokens to / from a handful of prompt tokens. When one side is
    that small, projecting the big side is most of the work, and the products can be reassociated
    so the big side is never projected (exact algebra; only float rounding differs):
      few queries (token -> image): scores = k_in . (W_k q) + q . b_k, and
        out = (sum_n a_n v_in_n) W_v + b_v (the attention weights sum to 1);
      few keys (image -> token): scores = q_in . (W_q k) + b_q . k, and
        out = sum_t a_t (v_t W_o) + b_o.
    `attention_plan` picks the order with the fewest multiply-adds from the static shapes;
    `plan` forces one (tests compare them).

    `projected` takes the image side already projected (bias included), batch 1, shared by
    every prompt, in `image_context`'s head-major layouts: {"k", "v"} when tokens attend to the
    image (`k`, `v` are then unused), or {"q"} when the image attends to tokens (`q` unused).
    Layer 0's image side does not depend on the prompt, so `SamPredictor` projects it once per
    image (`image_context`).
    """

    embedding_dim: int
    num_heads: int
    downsample_rate: int = 1
    dtype: Dtype = None
    plan: Optional[str] = None

    @nn.compact
    def __call__(
        self,
        q: Optional[jax.Array],
        k: Optional[jax.Array],
        v: Optional[jax.Array],
        key_valid: Optional[jax.Array] = None,
        projected: Optional[Dict[str, jax.Array]] = None,
    ) -> jax.Array:
        """q (B, Nq, C), k and v (B, Nk, C); key_valid (B, Nk) bool masks keys out when False."""
        c, heads = self.embedding_dim, self.num_heads
        internal = c // self.downsample_rate
        hd = internal // heads
        wq, bq = _DenseParams(c, internal, name="q_proj")()
        wk, bk = _DenseParams(c, internal, name="k_proj")()
        wv, bv = _DenseParams(c, internal, name="v_proj")()
        wo, bo = _DenseParams(internal, c, name="out_proj")()
        if projected is not None:
            return self._with_projected(projected, q, k, v, key_valid, (wq, bq, wk, bk, wv, bv, wo, bo))
        q, k, v, wq, bq, wk, bk, wv, bv, wo, bo = nn.dtypes.promote_dtype(
            q, k, v, wq, bq, wk, bk, wv, bv, wo, bo, dtype=stream_dtype(self.dtype)
        )
        mm, es = _products(self.dtype)
        b, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]
        scale = jnp.sqrt(jnp.asarray(hd, q.dtype))
        plan = self.plan or attention_plan(n_q, n_k, c, internal, heads)
        if plan not in ("standard", "few_queries", "few_keys"):
            raise ValueError(f"plan must be 'standard', 'few_queries' or 'few_keys', got {plan!r}")

        def softmax(scores, valid, axis=-1):  # over the keys axis, `valid` broadcastable to scores
            scores = scores.astype(jnp.float32)
            if valid is not None:
                scores = jnp.where(valid, scores, jnp.finfo(jnp.float32).min)
            return jax.nn.softmax(scores, axis=axis).astype(v.dtype)

        if plan == "few_queries":
            qh = (mm(q, wq) + bq).reshape(b, n_q, heads, hd)
            g = es("bthd,chd->bthc", qh, wk.reshape(c, heads, hd)).reshape(b, n_q * heads, c)
            shift = es("bthd,hd->bth", qh, bk.reshape(heads, hd)).reshape(b, n_q * heads, 1)
            # The official code divides the scores after q.k (not q before): keep that order.
            # Scores key-major, (B, Nk, Nq*heads): XLA:CPU runs k (Nk x C) @ g^T (C x Nq*heads)
            # faster than g @ k^T (vit_b decode, same-run A/B: ~5%); softmax over the keys axis.
            scores = (es("bnc,bmc->bnm", k, g) + shift.reshape(b, 1, n_q * heads)) / scale
            a = softmax(scores, None if key_valid is None else key_valid[:, :, None], axis=1)
            z = es("bnm,bnc->bmc", a, v).reshape(b, n_q, heads, c)
            out = es("bthc,chd->bthd", z, wv.reshape(c, heads, hd)) + bv.reshape(heads, hd)
            return mm(out.reshape(b, n_q, internal), wo) + bo
        if plan == "few_keys":
            kh = (mm(k, wk) + bk).reshape(b, n_k, heads, hd)
            vh = (mm(v, wv) + bv).reshape(b, n_k, heads, hd)
            g = es("bthd,chd->bcht", kh, wq.reshape(c, heads, hd)).reshape(b, c, heads * n_k)
            shift = es("bthd,hd->bht", kh, bq.reshape(heads, hd)).reshape(b, 1, heads * n_k)
            scores = ((mm(q, g) + shift) / scale).reshape(b, n_q, heads, n_k)
            a = softmax(scores, None if key_valid is None else key_valid[:, None, None, :])
            u = es("bthd,hdc->bhtc", vh, wo.reshape(heads, hd, c)).reshape(b, heads * n_k, c)
            return mm(a.reshape(b, n_q, heads * n_k), u) + bo
        qh = (mm(q, wq) + bq).reshape(b, n_q, heads, hd)
        kh = (mm(k, wk) + bk).reshape(b, n_k, heads, hd)
        vh = (mm(v, wv) + bv).reshape(b, n_k, heads, hd)
        scores = es("bqhd,bkhd->bhqk", qh, kh) / scale
        a = softmax(scores, None if key_valid is None else key_valid[:, None, None, :])
        out = es("bhqk,bkhd->bqhd", a, vh).reshape(b, n_q, internal)
        return mm(out, wo) + bo

    def _with_projected(self, projected, q, k, v, key_valid, weights) -> jax.Array:
        """The standard order of products with the image side's projections given, head-major
        as `image_context` stores them (so no per-call transposes): {"k"} (1, heads, N, hd) and
        {"v"} (1, heads, hd, N) for tokens attending to the image, {"q"} (1, heads, N, hd) for the
        image attending to tokens (the layouts XLA:CPU multiplies fastest: ~3% of a vit_b decode
        against k as (1, heads, hd, N)). One projected image side serves every prompt of the batch."""
        heads = self.num_heads
        mm, es = _products(self.dtype)
        wq, bq, wk, bk, wv, bv, wo, bo = weights

        def softmax(scores, valid):
            scores = scores.astype(jnp.float32)
            if valid is not None:
                scores = jnp.where(valid, scores, jnp.finfo(jnp.float32).min)
            return jax.nn.softmax(scores, axis=-1)

        if set(projected) == {"k", "v"}:  # tokens q attend to the projected image side
            pk, pv, q, wq, bq, wo, bo = nn.dtypes.promote_dtype(
                projected["k"][0], projected["v"][0], q, wq, bq, wo, bo, dtype=stream_dtype(self.dtype)
            )
            qh = (mm(q, wq) + bq).reshape(*q.shape[:2], heads, -1)
            scale = jnp.sqrt(jnp.asarray(qh.shape[-1], qh.dtype))
            scores = es("bqhd,hkd->bhqk", qh, pk) / scale
            a = softmax(scores, None if key_valid is None else key_valid[:, None, None, :]).astype(pv.dtype)
            out = es("bhqk,hdk->bqhd", a, pv)
            return mm(out.reshape(*out.shape[:2], -1), wo) + bo
        if set(projected) == {"q"}:  # the projected image side attends to tokens k, v
            pq, k, v, wk, bk, wv, bv, wo, bo = nn.dtypes.promote_dtype(
                projected["q"][0], k, v, wk, bk, wv, bv, wo, bo, dtype=stream_dtype(self.dtype)
            )
            kh = (mm(k, wk) + bk).reshape(*k.shape[:2], heads, -1)
            vh = (mm(v, wv) + bv).reshape(*v.shape[:2], heads, -1)
            scale = jnp.sqrt(jnp.asarray(kh.shape[-1], kh.dtype))
            scores = es("hqd,bkhd->bhqk", pq, kh) / scale
            a = softmax(scores, None if key_valid is None else key_valid[:, None, None, :]).astype(vh.dtype)
            # The output projection folded into the few values first, as in the "few_keys" plan.
            u = es("bkhd,hdc->bhkc", vh, wo.reshape(heads, -1, wo.shape[-1]))
            return es("bhqk,bhkc->bqc", a, u) + bo
        raise ValueError(f"projected must hold 'k' and 'v', or 'q'; got {sorted(projected)}")


def _products(dtype: Dtype):
    """(matmul, einsum) in the compute dtype `dtype` (`common.product`)."""

    def mm(a: jax.Array, b: jax.Array) -> jax.Array:
        return product(jnp.matmul, a, b, dtype=dtype)

    def es(spec: str, *operands: jax.Array) -> jax.Array:
        return product(jnp.einsum, spec, *operands, dtype=dtype)

    return mm, es


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image, MLP, image->token; post-norm, torch LayerNorm eps."""

    embedding_dim: int
    num_heads: int
    mlp_dim: int
    downsample_rate: int = 2
    skip_first_layer_pe: bool = False
    dtype: Dtype = None

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe, token_valid=None, image_context=None):
        """`image_context` (layer 0 only, see `image_context`): the image side's projections,
        given instead of computed from keys + key_pe."""
        c, h, dt = self.embedding_dim, self.num_heads, self.dtype
        if image_context is not None and not self.skip_first_layer_pe:
            raise ValueError("image_context applies to the first two-way block only")
        if self.skip_first_layer_pe:
            # Layer 0: no positional encoding AND no residual, as in the official block.
            queries = Attention(c, h, dtype=dt, name="self_attn")(queries, queries, queries, token_valid)
        else:
            q = queries + query_pe
            queries = queries + Attention(c, h, dtype=dt, name="self_attn")(q, q, queries, token_valid)
        queries = layer_norm(TORCH_LN_EPS, "norm1", dt)(queries)

        t2i = Attention(c, h, self.downsample_rate, dtype=dt, name="cross_attn_token_to_image")
        if image_context is None:
            k = keys + key_pe
            queries = queries + t2i(queries + query_pe, k, keys)
        else:
            queries = queries + t2i(
                queries + query_pe, None, None, projected={"k": image_context["t2i_k"], "v": image_context["t2i_v"]}
            )
        queries = layer_norm(TORCH_LN_EPS, "norm2", dt)(queries)

        queries = queries + MLPBlock(self.mlp_dim, nn.relu, dtype=dt, name="mlp")(queries)
        queries = layer_norm(TORCH_LN_EPS, "norm3", dt)(queries)

        i2t = Attention(c, h, self.downsample_rate, dtype=dt, name="cross_attn_image_to_token")
        q = queries + query_pe
        if image_context is None:
            keys = keys + i2t(k, q, queries, token_valid)
        else:
            keys = keys + i2t(None, q, queries, token_valid, projected={"q": image_context["i2t_q"]})
        keys = MatmulLayerNorm(TORCH_LN_EPS, dt, name="norm4")(keys)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Decoder transformer over (tokens, image).

    Args:
      depth (int): number of two-way blocks.
      embedding_dim (int): channel width C.
      num_heads (int): attention heads.
      mlp_dim (int): hidden width of the token MLP.
    """

    depth: int
    embedding_dim: int
    num_heads: int
    mlp_dim: int
    downsample_rate: int = 2
    dtype: Dtype = None

    @nn.compact
    def __call__(
        self,
        image_embedding: jax.Array,
        image_pe: jax.Array,
        point_embedding: jax.Array,
        token_valid: Optional[jax.Array] = None,
        image_context: Optional[Dict[str, jax.Array]] = None,
        output_tokens: Optional[Tuple[int, ...]] = None,
    ) -> Tuple[jax.Array, jax.Array]:
        """image_embedding and image_pe (B or 1, h, w, C) NHWC; point_embedding (B, T, C).

        image_context: optional `image_context(...)` of this image_embedding (batch 1): layer 0
          then reads the image side's projections instead of computing them.
        output_tokens: static indices of the tokens whose output is wanted (default all): the
          final token->image attention, which is per query, then runs for those only.

        Returns the processed tokens (B, T, C) (or (B, len(output_tokens), C)) and image tokens
        (B, h*w, C) in row-major order.
        """
        hh, ww, c = image_embedding.shape[1:]
        keys = image_embedding.reshape(image_embedding.shape[0], hh * ww, c)
        key_pe = image_pe.reshape(image_pe.shape[0], hh * ww, c)
        queries = point_embedding
        for i in range(self.depth):
            queries, keys = TwoWayAttentionBlock(
                c,
                self.num_heads,
                self.mlp_dim,
                self.downsample_rate,
                skip_first_layer_pe=(i == 0),
                dtype=self.dtype,
                name=f"layers_{i}",
            )(queries, keys, point_embedding, key_pe, token_valid, image_context if i == 0 else None)
        keys = jnp.broadcast_to(keys, (point_embedding.shape[0], *keys.shape[1:]))
        if output_tokens is not None:
            idx = jnp.asarray(output_tokens, jnp.int32)
            queries, point_embedding = jnp.take(queries, idx, axis=1), jnp.take(point_embedding, idx, axis=1)
        q, k = queries + point_embedding, keys + key_pe
        queries = queries + Attention(
            c, self.num_heads, self.downsample_rate, dtype=self.dtype, name="final_attn_token_to_image"
        )(q, k, keys)
        queries = layer_norm(TORCH_LN_EPS, "norm_final_attn", self.dtype)(queries)
        return queries, keys


def image_context(
    params: Dict, image_embedding: jax.Array, image_pe: jax.Array, num_heads: int
) -> Dict[str, jax.Array]:
    """What layer 0 of the two-way transformer computes from the image alone, for prompts
    without a mask input (the dense prompt is then the constant no-mask embedding).

    Args:
      params: a full SAM parameter tree.
      image_embedding: (1, h, w, C) NHWC; image_pe: (h, w, C) (`Sam.get_dense_pe`).
      num_heads: the decoder's attention heads (`SamConfig.decoder_num_heads`).

    Returns float32 arrays with a leading batch of 1: "src" (1, h, w, C), the embedding plus the
    no-mask embedding (the decoder's image tokens before layer 0), and layer 0's projections of
    the image side, head-major: "t2i_k" (1, heads, h*w, head_dim) and "t2i_v" (1, heads, head_dim,
    h*w), the keys and values the tokens attend to, and "i2t_q" (1, heads, h*w, head_dim), the
    queries of the image->token attention. Given to `Sam.decode` as `image_context`, they
    replace three of layer 0's (h*w x C) x (C x heads*tokens) products per call by products ~16x
    smaller (about 15% of a vit_b decode's multiply-adds for one prompt); the order of products
    is then the official one, equal to the plain path up to float rounding.
    """
    if image_embedding.ndim != 4 or image_embedding.shape[0] != 1:
        raise ValueError(f"image_embedding must be (1, h, w, C), got shape {image_embedding.shape}")
    layer = params["mask_decoder"]["transformer"]["layers_0"]
    no_mask = params["prompt_encoder"]["no_mask_embed"]["embedding"][0]
    src = (image_embedding + no_mask).astype(jnp.float32)
    n, c = src.shape[1] * src.shape[2], src.shape[3]
    flat = src.reshape(1, n, c)
    k = flat + jnp.reshape(image_pe, (1, n, c))

    def proj(p, x):  # (1, N, C) -> (1, heads, N, head_dim)
        y = x @ p["kernel"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
        return y.reshape(1, n, num_heads, -1).transpose(0, 2, 1, 3)

    t2i, i2t = layer["cross_attn_token_to_image"], layer["cross_attn_image_to_token"]
    return {
        "src": src,
        "t2i_k": proj(t2i["k_proj"], k),
        "t2i_v": proj(t2i["v_proj"], flat).transpose(0, 1, 3, 2),
        "i2t_q": proj(i2t["q_proj"], k),
    }
