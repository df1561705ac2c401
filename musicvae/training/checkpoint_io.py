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
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from musicvae.io.atomic import temporary_path
from musicvae.training.checkpoints import load_checkpoint
from musicvae.errors import NonFiniteError
from musicvae.io.storage import StorageError, payload_bytes, write_fault

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
        self.folders: set[Path] = set()  # folders this process has written checkpoints into
        self.written: dict[Path, tuple[Any, Any]] = {}  # file -> (epoch, step) of its last write here

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        bad = nonfinite_entries(checkpoint)
        if bad:
            step = checkpoint.get("global_step")
            raise NonFiniteError(
                f"not writing {path}: the weights hold NaN/Inf at step {step} ({', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}); the previous checkpoint is kept"
            )
        path = Path(path)
        existed = path.parent in self.folders
        if not existed:
            path.parent.mkdir(parents=True, exist_ok=True)  # not after a first write: a deleted folder is a fault
        tmp = temporary_path(path)
        self.writes += 1
        try:
            with open(tmp, "wb") as handle:
                self.write_payload(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only or vanished folder: nothing was left there either
            reason = write_fault(err, path.parent, payload_bytes(checkpoint), existed) if isinstance(err, Exception) else None
            if reason:
                raise StorageError(self._stopped(reason, checkpoint, path)) from None
            raise
        fsync_dir(path.parent)
        self.folders.add(path.parent)
        self.written[path] = (checkpoint.get("epoch"), checkpoint.get("global_step"))

    def write_payload(self, checkpoint: dict[str, Any], handle: io.BufferedWriter) -> None:
        """The checkpoint's bytes into the open temporary file (a fault-injecting subclass overrides this)."""
        torch.save(checkpoint, handle)

    def _stopped(self, reason: str, checkpoint: dict[str, Any], path: Path) -> str:
        """The one line a refused checkpoint write ends training with: why, where, and what is kept."""
        kept = self.written.get(path) or stored_position(path)
        if kept is not None and path.is_file():
            what = f"{path} (epoch {kept[0]}, step {kept[1]}) is kept and resumes the run (--ckpt_path {path})"
        elif not path.parent.is_dir():
            what = f"no checkpoint of this run remains there ({path.parent} is gone)"
        else:
            what = f"no {path.name} was written before"
        return (f"checkpoint not written: {reason}. Training stopped at step {checkpoint.get('global_step')} "
                f"(epoch {checkpoint.get('epoch')}); {what}. Free space or fix the folder (or choose another "
                "--checkpoint_dir), then resume")

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        # Always weights_only, whatever the caller asks: a checkpoint must never run code.
        return load_checkpoint(path, map_location=map_location or "cpu")


def stored_position(path: Path) -> Optional[tuple[Any, Any]]:
    """(epoch, step) of a checkpoint file an earlier process wrote; None if unreadable. Memory-mapped:
    only the two numbers are read, whatever the file's size."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return ckpt.get("epoch"), ckpt.get("global_step")
    except Exception:  # noqa: BLE001 - the message then just does not name it
        return None
