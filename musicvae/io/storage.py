"""Writes the machine refuses: a full disk, a read-only or vanished folder, as one clear line.

A full disk during `torch.save` surfaces as torch's `RuntimeError: [enforce fail at
inline_container.cc] ... unexpected pos` with no errno; a read-only remount as `OSError(EROFS)`;
a deleted folder as `FileNotFoundError`. `write_fault` tells them apart (by errno where there is
one, else by the free space and the folder's state) so every writer can stop with the folder,
what was needed and what is kept, and the command line exits with STORAGE_EXIT.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from musicvae.errors import MusicVAEError

#: Exit status of a run stopped because the machine refused a write (disk full, read-only, folder gone).
STORAGE_EXIT = 4
#: Errnos of a full disk (or a quota) and of a read-only filesystem.
_FULL = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EROFS}
_DENIED = {errno.EACCES, errno.EPERM}
#: Free bytes under which a failed write of unknown size is put down to a full disk (torch.save's
#: failure carries no errno).
NEARLY_FULL = 1 << 20


class StorageError(MusicVAEError):
    """The machine refused a write; the message names the folder, the reason and what is kept."""


def payload_bytes(obj: Any) -> int:
    """The bytes of the tensors and arrays in a (nested) checkpoint-like object: what a save writes, to within
    its small pickled remainder."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


def free_bytes(folder: str | os.PathLike) -> Optional[int]:
    """Free bytes on the filesystem that holds `folder` (or would: its nearest existing parent)."""
    path = Path(folder).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def size_text(n: Optional[float]) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _errnos(err: BaseException) -> set[int]:
    found, seen = set(), set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            found.add(err.errno)
        err = err.__cause__ or err.__context__
    return found


def write_fault(err: BaseException, folder: str | os.PathLike, needed: Optional[int],
                existed: bool = True) -> Optional[str]:
    """Why the machine refused a write into `folder`, in words; None when `err` is something else.

    Args:
        err: what the write raised.
        folder: the folder written into.
        needed: the bytes the write needed (about); None when unknown (a full disk is then known by errno only).
        existed: the folder existed before this write (a vanished folder is then a fault, not a first write).
    """
    folder = Path(folder)
    codes = _errnos(err)
    free = free_bytes(folder)
    if existed and not folder.is_dir():
        return f"{folder} no longer exists (deleted or unmounted during the run)"
    if codes & _READ_ONLY or (folder.is_dir() and read_only(folder)):
        return f"{folder} is on a read-only filesystem now"
    if codes & _DENIED:
        return f"{folder} is not writable (permission denied)"
    if needed is None and (codes & _FULL or (free is not None and free < NEARLY_FULL)):
        return f"no space left on the device of {folder} ({size_text(free)} free)"
    if codes & _FULL or (needed is not None and free is not None and free < needed):
        return (f"no space left on the device of {folder}: the write needs about {size_text(needed)} and "
                f"{size_text(free)} is free")
    return None


def read_only(folder: str | os.PathLike) -> bool:
    """True when `folder` is on a filesystem mounted read-only."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False
