"""Random states in checkpoints, so a resumed run draws what an uninterrupted one would.

Lightning restores weights, optimizer and loop counters but not the random generators: a
resumed run would draw other reparameterisation noise and dropout masks. The data order and
crops are already a function of (seed, epoch, position) (musicvae/data/sampling.py); this covers
the generators the training step itself uses. States are stored as tensors and plain values, so
checkpoints still load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn


def capture() -> dict[str, Any]:
    """The states of Python's, numpy's and torch's (CPU and CUDA) global generators."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Put generators back to a `capture()`d state."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumableRandomState(Callback):
    """Stores every rank's generator states in checkpoints and restores them on resume.

    The state is captured after a training step (when any checkpoint is written) and applied
    when the resumed run's training starts, after the sanity check; loaders draw worker seeds
    from their own generators (data.py), so starting them shifts nothing. Validation is made
    random-neutral as well (its Griffin-Lim audio draws random phases): the states are put back
    when it ends, so where a checkpoint falls never changes what training draws.
    """

    def __init__(self) -> None:
        self._pending: Optional[dict[str, Any]] = None
        self._before_validation: Optional[dict[str, Any]] = None

    def state_dict(self) -> dict[str, Any]:
        mine = self._before_validation or capture()  # inside validation, the state it will return to
        return {"world_size": _world_size(), "ranks": _gather(mine)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") or []
        if state_dict.get("world_size") != _world_size() or not ranks:
            rank_zero_warn(
                f"the checkpoint's random states are for {state_dict.get('world_size')} process(es), this run has "
                f"{_world_size()}: training resumes with fresh random streams (not bit-identical to an "
                "uninterrupted run)"
            )
            return
        self._pending = ranks[_rank()]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            restore(self._pending)
            self._pending = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before_validation = capture()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._before_validation is not None:
            restore(self._before_validation)
            self._before_validation = None


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _gather(state: dict[str, Any]) -> list[dict[str, Any]]:
    if _world_size() == 1:
        return [state]
    # Every rank takes part in writing a checkpoint (Lightning dumps the state on all ranks
    # and rank 0 writes it), so a collective here is safe.
    gathered: list[Any] = [None] * _world_size()
    dist.all_gather_object(gathered, state)
    return gathered
