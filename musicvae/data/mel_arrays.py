"""Mel array files on disk -> validated, summarised recordings (MelSource), and their non-silent windows.

Scanning reads each array once, checks it, and keeps only a per-frame loudness profile, so the
arrays themselves stay on disk (memory-mapped `.npy`) and a collection need not fit in RAM.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from musicvae.data.listing import link_problem
from musicvae.errors import DataError

#: File suffixes read as precomputed log-mel arrays.
ARRAY_SUFFIXES = (".npy", ".pt")


@dataclass
class MelSource:
    """One usable recording: where it is and how loud each frame is.

    Attributes:
        path: absolute path of the array file.
        rel: path relative to the data folder (the key of the split by recording).
        n_frames: number of time frames.
        frame_max: (n_frames,) loudest mel bin of each frame, used to skip silent segments.
        floor: log value treated as silence for this file.
    """

    path: str
    rel: str
    n_frames: int
    frame_max: np.ndarray
    floor: float


def load_mel_array(path: Path, n_mels: int) -> np.ndarray:
    """Open a `(n_mels, T)` or `(1, n_mels, T)` array; `.npy` files are memory-mapped.

    Raises:
        DataError: naming the file and what was expected.
    """
    path = Path(path)
    try:
        if path.suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, torch.Tensor):
                raise DataError(f"{path}: expected a tensor of shape (n_mels, frames), got a {type(obj).__name__}")
            array = obj.detach().float().numpy()
    except DataError:
        raise
    except Exception as err:  # numpy and torch raise many types for unreadable/corrupt files
        raise DataError(f"{path}: cannot read the array ({read_failure(path, err)})") from err
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise DataError(f"{path}: expected shape (n_mels, frames) or (1, n_mels, frames), got {tuple(array.shape)}")
    if array.shape[0] != n_mels:
        hint = " (it looks transposed: save it as (n_mels, frames))" if array.shape[1] == n_mels else ""
        raise DataError(
            f"{path}: has {array.shape[0]} mel bins, expected {n_mels}{hint}; "
            f"set --data.mel.n_mels or the folder's mel.json to match the arrays"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{path}: expected a floating-point log-mel array, got dtype {array.dtype}")
    return array


def read_failure(path: Path, err: BaseException) -> str:
    """Why `path` could not be read, in words, without repeating the path (the caller names it)."""
    if link_problem(path, err):
        return link_problem(path, err)
    if isinstance(err, FileNotFoundError):
        return "vanished after it was listed: file not found"
    if isinstance(err, IsADirectoryError):
        return "is a directory, not an array file"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    try:
        size = os.stat(path).st_size
    except OSError:
        size = None
    if size == 0:
        return "empty file (0 bytes)"
    if size is not None and path.suffix == ".npy":
        shortfall = _npy_shortfall(path, size)
        if shortfall:
            return shortfall
    message = str(err).replace(repr(str(path)), "the file").replace(str(path), "the file")
    if "Weights only load failed" in message:  # torch's page-long advice to unpickle unsafely
        detail = re.search(r"WeightsUnpickler error: (.+)", message)
        return "not a tensor file that torch.load reads safely" + (f" ({detail.group(1).strip()})" if detail else "")
    return f"{type(err).__name__}: {message.strip().splitlines()[0] if message.strip() else ''}"


def _npy_shortfall(path: Path, size: int) -> Optional[str]:
    """'truncated: ...' when a `.npy` file holds fewer bytes than its header declares, else None."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(handle)
            offset = handle.tell()
    except Exception:  # not even a readable header: nothing more specific to say
        return None
    expected = math.prod(shape) * dtype.itemsize
    if size - offset < expected:
        return f"truncated: the header promises {expected} bytes of data, the file holds {size - offset}"
    return None


def scan_mel_file(path: Path, rel: str, n_mels: int, log_floor: float) -> MelSource:
    """Validate one array file and summarise it as a MelSource.

    Raises:
        DataError: unreadable, wrong shape, or non-finite values (with the first bad frame).
    """
    return summarise_mel(load_mel_array(path, n_mels), path, rel, log_floor)


def summarise_mel(array: np.ndarray, path: Path, rel: str, log_floor: float) -> MelSource:
    """A MelSource of an (n_mels, T) log-mel, memory-mapped or in memory, read in blocks.

    Raises:
        DataError: non-finite values, naming `path` and the first bad frame.
    """
    n_frames = array.shape[1]
    frame_max = np.empty(n_frames, dtype=np.float32)
    file_min = math.inf
    chunk = 4096  # frames per read: bounded memory on long memory-mapped files
    for start in range(0, n_frames, chunk):
        block = np.asarray(array[:, start : start + chunk], dtype=np.float32)
        finite = np.isfinite(block)
        if not finite.all():
            frame = start + int(np.argmin(finite.all(axis=0)))
            raise DataError(f"{path}: contains NaN or Inf (first at frame {frame}); fix or remove the file")
        frame_max[start : start + chunk] = block.max(axis=0)
        file_min = min(file_min, float(block.min()))
    # Silence is judged against the lower of the file's own minimum and the declared log floor:
    # arrays in other log units (dB) have minima far below our floor and must not all look silent.
    floor = min(file_min, log_floor) if n_frames else log_floor
    return MelSource(str(Path(path).resolve()), rel, n_frames, frame_max, floor)


def window_starts(source: MelSource, lo: int, hi: int, frames: int, silence_margin: float) -> list[int]:
    """Starts of non-overlapping, non-silent windows of `frames` inside [lo, hi).

    A window is silent when its loudest value is within `silence_margin` (natural-log units) of
    the file's floor: such segments teach the model to output dark spectrograms.
    """
    starts = []
    for start in range(lo, hi - frames + 1, frames):
        if source.frame_max[start : start + frames].max() > source.floor + silence_margin:
            starts.append(start)
    return starts
