"""Whole-or-absent file writes: a temporary file in the same folder, then a rename.

The temporary name carries the writer's pid and host (`.NAME.PID@HOST.tmp`), so a cleaner can
tell a dead writer's leftovers from a live writer's work in progress (see cache.py).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Callable

#: Matches the temporary names below; group 1 is the writer's pid, group 2 its host.
TMP_PATTERN = re.compile(r"\.(\d+)@([^.@]*)\.tmp$")
HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call `write(handle)` on a temporary file beside `path`, then rename it into place.

    A kill leaves `path` either as it was or complete, never half-written (os.replace is atomic
    within one filesystem, which the same folder guarantees).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}@{HOST}.tmp")
    try:
        with open(tmp, mode) as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
