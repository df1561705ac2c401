"""Faults injected on purpose, for the reliability checks (`musicvae reliability`, the test suite).

Nothing here is imported by training: a run gets a fault only when its own command line passes the
plugin (`kill_in_write_flags`), so product code carries no test hook.
"""

from __future__ import annotations

import io
import json
import os
import signal
from typing import Any

import torch

from musicvae.training.checkpoint_io import AtomicCheckpointIO


class KillInCheckpointWrite(AtomicCheckpointIO):
    """AtomicCheckpointIO that SIGKILLs its process halfway through its `at_write`-th checkpoint write
    (counted from 1), after half the bytes reached the disk: the worst moment for a kill.

    Args:
        at_write: which write dies.
    """

    def __init__(self, at_write: int) -> None:
        super().__init__()
        self.at_write = int(at_write)

    def write_payload(self, checkpoint: dict[str, Any], handle: io.BufferedWriter) -> None:
        if self.writes != self.at_write:
            return super().write_payload(checkpoint, handle)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


def kill_in_write_flags(at_write: int) -> list[str]:
    """`fit` flags that make the run SIGKILL itself halfway through its `at_write`-th checkpoint write."""
    plugin = {"class_path": f"{__name__}.KillInCheckpointWrite", "init_args": {"at_write": int(at_write)}}
    return ["--trainer.plugins", json.dumps([plugin])]
