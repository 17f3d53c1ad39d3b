"""Shared fixtures: randomised official checkpoints, converted by the real converter; the test tiers.

Tiers: a test that requests a full-size model (the `FULL_SIZE_FIXTURES` below) is
marked `full` here; long runs and the costlier variants of a check the daily tier already makes
carry an explicit `full` mark, with their measured cost. `python -m pytest` runs everything;
`python -m pytest -m "not full" -n 2` is the daily tier (about four minutes on 2 cores). torch is imported
only by the fixtures that build the official reference, so the suite collects without it.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import TYPE_CHECKING

import jax
import pytest

import sam_jax

if TYPE_CHECKING:
    import torch

# Requesting one of these fixtures (directly or through another fixture) marks a test `full`.
FULL_SIZE_FIXTURES = frozenset({"vit_b", "vit_l", "vit_h", "mobile_sam", "sam_hq_vit_b"})


@dataclasses.dataclass
class Reference:
    name: str
    torch_model: torch.nn.Module
    pth: str
    weights: str
    model: sam_jax.Sam
    params: dict


def _make_reference(tmp_path_factory, name: str, seed: int) -> Reference:
    import torch

    from convert.__main__ import main as convert_main
    from tests.reference import official_sam, randomise_

    cfg = sam_jax.get_config(name)
    tm = randomise_(official_sam(cfg), seed)
    d = tmp_path_factory.mktemp(f"ckpt_{name}")
    pth = str(d / f"sam_{name}.pth")
    torch.save(tm.state_dict(), pth)
    out = str(d / f"sam_{name}.safetensors")
    # The real converter, through its command-line entry point, detecting the model from the
    # keys and shapes ("auto"; tiny is not a preset the official registry knows).
    assert convert_main([pth, out]) == 0
    model, params = sam_jax.load(out)
    return Reference(name, tm, pth, out, model, params)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Reference:
    return _make_reference(tmp_path_factory, "tiny", seed=0)


@pytest.fixture(scope="session")
def vit_b(tmp_path_factory) -> Reference:
    return _make_reference(tmp_path_factory, "vit_b", seed=1)


@pytest.fixture(scope="session")
def mobile_sam(tmp_path_factory) -> Reference:
    return _make_reference(tmp_path_factory, "mobile_sam", seed=4)


@pytest.fixture(scope="session")
def tiny_hq(tmp_path_factory) -> Reference:
    return _make_reference(tmp_path_factory, "tiny_hq", seed=5)


@pytest.fixture(scope="module")
def sam_hq_vit_b(tmp_path_factory) -> Reference:
    return _make_reference(tmp_path_factory, "sam_hq_vit_b", seed=6)


# Module scope: built for one parity run each, then freed (vit_h needs ~10 GB of memory).
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


def _memory_mappings() -> tuple:
    """(mappings this process holds, the kernel's limit per process), or (0, 0) where /proc cannot
    tell (not Linux)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f), limit
    except (OSError, ValueError):
        return 0, 0


@pytest.fixture(autouse=True)
def _bounded_memory_mappings():
    """XLA:CPU maps the code and the constants of each compiled kernel into pages of their own
    (about two mappings per kernel, freed with the executable). The whole suite compiles enough
    programs in one process to pass Linux's default limit of 65,530 mappings per process
    (vm.max_map_count), where the next compile crashes inside XLA (SIGSEGV or SIGABRT); one vit_l
    parity test alone adds ~20,000. After a test that leaves the process above a third of the
    limit, JAX's caches are dropped (what runs next recompiles what it uses); below it the
    compiled programs are kept, which saves the recompiles. Counting costs ~1 ms a test."""
    yield
    count, limit = _memory_mappings()
    if limit and count > limit // 3:
        jax.clear_caches()
        gc.collect()


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if FULL_SIZE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.full)
