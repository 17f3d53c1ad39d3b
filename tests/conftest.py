"""Shared fixtures: randomised official checkpoints, converted by the real converter."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import jax
import numpy as np
import pytest
import torch

from reference import official_sam, randomise_  # noqa: F401  (also puts the stand-in on sys.path)

import sam_jax
from convert.__main__ import main as convert_main

torch.set_num_threads(os.cpu_count() or 1)


@dataclasses.dataclass
class Reference:
    name: str
    torch_model: torch.nn.Module
    pth: str
    weights: str
    model: sam_jax.Sam
    params: dict


def _make_reference(tmp_path_factory, name: str, seed: int) -> Reference:
    cfg = sam_jax.get_config(name)
    tm = randomise_(official_sam(cfg), seed)
    d = tmp_path_factory.mktemp(f"ckpt_{name}")
    pth = str(d / f"sam_{name}.pth")
    torch.save(tm.state_dict(), pth)
    out = str(d / f"sam_{name}.safetensors")
    # The real converter, through its command-line entry point. Tiny is not a preset the official
    # registry knows, so it goes through shape detection ("auto").
    assert convert_main([pth, out]) == 0
    model, params = sam_jax.load(out)
    return Reference(name, tm, pth, out, model, params)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Reference:
    return _make_reference(tmp_path_factory, "tiny", seed=0)


@pytest.fixture(scope="session")
def vit_b(tmp_path_factory) -> Reference:
    return _make_reference(tmp_path_factory, "vit_b", seed=1)


# The larger sizes run only with `-m slow` (minutes each, and vit_h needs ~10 GB of memory).
@pytest.fixture(scope="module")
def vit_l(tmp_path_factory) -> Reference:
    return _make_reference(tmp_path_factory, "vit_l", seed=2)


@pytest.fixture(scope="module")
def vit_h(tmp_path_factory) -> Reference:
    return _make_reference(tmp_path_factory, "vit_h", seed=3)


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def max_rel_err(got, ref) -> float:
    """max |got - ref| / std(ref): the error measure of the parity tolerances."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref)) / np.std(ref))


COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration")


@contextlib.contextmanager
def count_compilations(names=COMPILE_EVENTS):
    """Yields a list that collects every event in `names` (by default each trace and XLA
    compilation) started inside the block."""
    events = []

    def listener(name, duration, **kwargs):
        if name in names:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
