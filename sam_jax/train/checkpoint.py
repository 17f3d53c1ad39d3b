"""Train-state checkpoints with orbax: save every few steps, resume exactly where training stopped.

A checkpoint holds the whole `TrainState` (step, params, optimizer state). Resuming restores it
into the structure of a freshly created state (same model, same optimizer), so `restore` needs
that template; the next steps then reproduce an uninterrupted run bit for bit as long as the
per-step keys and batches are functions of the step number (see examples/finetune.py).
"""

from __future__ import annotations

import os
from typing import Optional

import jax

from .step import TrainState


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ImportError("checkpoints need orbax: pip install 'sam-jax[train]'") from None
    return ocp


class Checkpointer:
    """Saves and restores `TrainState`s under `directory` (one sub-folder per step).

    Args:
      directory (str): where checkpoints live (created if missing).
      max_to_keep (int): older checkpoints beyond this many are deleted.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3) -> None:
        ocp = _ocp()
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        )

    def save(self, state: TrainState, wait: bool = True) -> int:
        """Writes `state` under its step number; returns the step. `wait=False` writes in the
        background (call `wait()` before reading it or exiting)."""
        step = int(jax.device_get(state.step))
        self._manager.save(step, args=self._ocp.args.StandardSave(state), force=True)
        if wait:
            self._manager.wait_until_finished()
        return step

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def latest_step(self) -> Optional[int]:
        """The newest saved step, or None if there is none."""
        return self._manager.latest_step()

    def restore(self, template: TrainState, step: Optional[int] = None) -> TrainState:
        """The state saved at `step` (default: the latest), in the structure of `template` (a state
        created by `TrainState.create` with the same model and optimizer)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint under {self.directory}")
        abstract = jax.tree_util.tree_map(self._ocp.utils.to_shape_dtype_struct, template)
        return self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
