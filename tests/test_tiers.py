"""The suite's own contract: the daily tier (`-m "not full"`) holds no full-size run, and torch is
needed only where the official reference is used."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

FULL_SIZE_PRESETS = frozenset({"vit_b", "vit_l", "vit_h", "default"})
# Parametrized over every preset, but they read shapes only (meta tensors, jax.eval_shape): the
# daily tier keeps them. A new test over full-size presets is `full` or joins this list.
SHAPES_ONLY = frozenset(
    {
        "test_param_count",
        "test_structure_of_every_size",
        "test_names_and_shapes_match_transformers",
        "test_config_json_round_trip",
    }
)

# A test module that uses the official reference (or torch itself) says so at the top.
USES_TORCH = re.compile(
    r"^(import torch|from torch|import segment_anything|from segment_anything"
    r"|from tests(\.reference)? import|import tests\.reference)",
    re.M,
)

BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
"""


def test_full_size_parameters_are_classified(request):
    """In any selection (the daily tier above all), a test parametrized over a full-size preset is
    marked `full` or reads shapes only."""
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        named = FULL_SIZE_PRESETS & {v for v in params.values() if isinstance(v, str)}
        if named and item.get_closest_marker("full") is None:
            assert item.originalname in SHAPES_ONLY, f"{item.nodeid}: mark it full, or add it to SHAPES_ONLY"


@pytest.mark.full  # ~6 s: a fresh interpreter collecting the suite
def test_collects_without_torch():
    """conftest, and every test module that does not import torch, the official model or the
    reference helpers, collect in an interpreter where importing torch fails."""
    files = sorted(
        str(f.relative_to(HERE)) for f in pathlib.Path(HERE).rglob("test_*.py") if not USES_TORCH.search(f.read_text())
    )
    assert "test_tiers.py" in files and len(files) > 5, files
    paths = [os.path.join("tests", f) for f in files]
    r = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, "-m", "not full", *paths],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "tests collected" in r.stdout
