"""Checkpoint files that a kill at any moment leaves whole, and that never hold NaN weights.

Lightning's default writer goes through fsspec, which stages the file in `$TMPDIR` and moves it
into place; across filesystems that move is a copy into the final name, so a `kill -9` during
it truncates `last.ckpt`. Here the file is written beside its final name, flushed and fsynced,
renamed over it with `os.replace` (atomic within a filesystem) and the folder is fsynced so the
rename itself survives a power cut. A kill leaves the previous checkpoint and at worst a
temporary file, which the next run removes (`atomic.remove_abandoned`).
"""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from musicvae.atomic import temporary_path
from musicvae.training.checkpoints import load_checkpoint
from musicvae.errors import NonFiniteError

#: Test-only hook: "N" makes this process SIGKILL itself halfway through its N-th checkpoint
#: write (counted from 1), the worst moment for a kill. Used by tests and scripts/reliability.py.
KILL_HOOK_ENV = "MUSICVAE_TEST_KILL_IN_CHECKPOINT_WRITE"


def nonfinite_entries(checkpoint: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors in the checkpoint's weights that hold a NaN or Inf."""
    state = checkpoint.get("state_dict") or {}
    return [name for name, value in state.items()
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX: the directory entry lives in the folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows, where folders cannot be opened; os.replace is all there is
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (network mounts) refuse fsync on folders
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes checkpoints whole-or-not-at-all and reads them with `weights_only=True` only."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        bad = nonfinite_entries(checkpoint)
        if bad:
            step = checkpoint.get("global_step")
            raise NonFiniteError(
                f"not writing {path}: the weights hold NaN/Inf at step {step} ({', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}); the previous checkpoint is kept"
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path)
        self.writes += 1
        try:
            with open(tmp, "wb") as handle:
                if os.environ.get(KILL_HOOK_ENV) == str(self.writes):
                    _write_half_and_die(checkpoint, handle)
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        # Always weights_only, whatever the caller asks: a checkpoint must never run code.
        return load_checkpoint(path, map_location=map_location or "cpu")


def _write_half_and_die(checkpoint: dict[str, Any], handle: io.BufferedWriter) -> None:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    data = buffer.getvalue()
    handle.write(data[: len(data) // 2])
    handle.flush()
    os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
