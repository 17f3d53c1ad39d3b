"""bench/profile_ops.py puts each executed XLA:CPU thunk in the category its HLO says: checked on
small functions that hold one kind of work each, compiled and traced for real."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from bench.profile_ops import CATEGORIES, categorize, parse_hlo, profile


def _categories(fn, *args) -> set:
    """The categories of the instructions of `fn`'s compiled HLO (any of them may run as a thunk)."""
    comps, instrs = parse_hlo(jax.jit(fn).lower(*args).compile().as_text())
    return {categorize(comps, instrs, name) for name, (op, _, _) in instrs.items() if op != "parameter"}


A = jnp.ones((64, 32), jnp.float32)
B = jnp.ones((32, 16), jnp.float32)


@pytest.mark.parametrize(
    "fn, args, want",
    [
        (lambda a, b: a @ b, (A, B), "matmul f32"),
        (
            lambda a, b: jax.lax.dot(
                a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32
            ),
            (A, B),
            "matmul bf16",
        ),
        (
            lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.int32),
            (A.astype(jnp.int8), B.astype(jnp.int8)),
            "matmul int8",
        ),
        (lambda a: jnp.round(a * 3.0).astype(jnp.int8), (A,), "int8 quantize / rescale"),
        (lambda a: jnp.exp(a) / jnp.sum(jnp.exp(a), -1, keepdims=True), (A,), "other"),
    ],
)
def test_categories(fn, args, want):
    assert want in _categories(fn, *args)
    # A thunk that does this work is not put in a category of another kind of work.
    others = {"matmul int8", "matmul bf16", "matmul f32", "int8 quantize / rescale"} - {want}
    assert not (_categories(fn, *args) & others), _categories(fn, *args)


def test_profile_sums_per_category():
    f = jax.jit(lambda a, b: jax.nn.gelu(a @ b).T.copy())
    res = profile(f, (jnp.ones((256, 256)), jnp.ones((256, 256))), calls=2)
    assert set(res["ms_per_call"]) == set(CATEGORIES)
    assert res["ms_per_call"]["matmul f32"] > 0
    assert res["ms_per_call"]["matmul int8"] == res["ms_per_call"]["matmul bf16"] == 0
    assert res["thunk_ms_total"] == pytest.approx(sum(res["ms_per_call"].values()))
