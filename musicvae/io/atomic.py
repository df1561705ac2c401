"""Whole-or-absent file writes: a temporary file in the same folder, then a rename.

The temporary name carries the writer's pid and host (`.NAME.PID@HOST.tmp`), so a cleaner can
tell a dead writer's leftovers from a live writer's work in progress (see cache.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

#: Matches the temporary names below; group 1 is the writer's pid, group 2 its host.
TMP_PATTERN = re.compile(r"\.(\d+)@([^.@]*)\.tmp$")
HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
#: A temporary file untouched this long is abandoned even if its writer's fate is unknown
#: (another host on a shared filesystem): no write of ours takes an hour between two bytes.
STALE_TMP_S = 3600.0


def temporary_path(path: str | os.PathLike) -> Path:
    """The temporary name beside `path` that this process writes before renaming."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}@{HOST}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the temporary path beside `path` to write; it is renamed onto `path` when the block
    ends, and removed when the block raises (or is killed: see remove_abandoned).

    For writers that need a name rather than a handle (numpy.lib.format.open_memmap).
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)  # atomic within one filesystem, which the same folder guarantees
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call `write(handle)` on a temporary file beside `path`, then rename it into place.

    A kill leaves `path` either as it was or complete, never half-written.
    """
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        write(handle)


def is_abandoned(path: Path, max_age_s: float = STALE_TMP_S) -> bool:
    """A temporary file whose writer on this host is dead, or one older than `max_age_s`."""
    match = TMP_PATTERN.search(path.name)
    try:
        if time.time() - path.stat().st_mtime > max_age_s:
            return True
    except OSError:
        return False
    if match is None or match.group(2) != HOST:
        return False  # another host's writer may still be alive (a shared filesystem)
    return not process_alive(int(match.group(1)))


def process_alive(pid: int) -> bool:
    """True while `pid` runs. A killed writer not yet reaped by its parent is a zombie: signal 0
    still reaches it, so /proc is asked too (where there is one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # alive but not ours to signal
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_abandoned(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete abandoned temporary files (`*.tmp` of dead writers) under `folder`; returns them."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for root, _, files in os.walk(folder) if recursive else [(folder, None, [p.name for p in folder.iterdir()])]:
        for name in files:
            path = Path(root) / name
            if name.endswith(".tmp") and path.is_file() and is_abandoned(path):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
