"""One job of the log-mel cache: a recording decoded into its log-mel array, and a record of how it went.

The array is written whole or not at all (a temporary file, then `os.replace`), in bounded memory
however long the recording. The record tells the build (musicvae/data/cache.py) whose fault a
failure was: the file's (remembered until it changes), the cache disk's (stops the build), or
neither (memory ran out: the next build tries the file again).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from musicvae.audio.decode import AudioError, decode_blocks
from musicvae.audio.mel import LogMelStream
from musicvae.audio.mel_settings import MelSettings
from musicvae.io.atomic import atomic_path, temporary_path, write_atomic
from musicvae.io.storage import write_fault
from musicvae.errors import printable

VANISHED = "vanished after it was listed: file not found"
#: A log-mel up to this size (95 s of 128 mels at 86 frames/s) is saved from memory; a longer one is
#: written in pieces (see _store_log_mel), so that memory does not grow with a recording's length.
_IN_MEMORY_BYTES = 4 << 20


class _WriteFailed(Exception):
    """Writing an array failed (`__cause__` says how) after `nbytes` were computed: the machine's
    fault, told apart from what reading the recording raises."""

    def __init__(self, nbytes: int) -> None:
        super().__init__(nbytes)
        self.nbytes = nbytes


def _store_log_mel(array: Path, stream: Iterable[np.ndarray], n_mels: int) -> int:
    """Write the (n_mels, frames) blocks of `stream` to the `.npy` file `array`, whole or not at all.

    Up to _IN_MEMORY_BYTES of blocks are joined in memory and saved at once. A longer log-mel
    (a three-hour recording's is 0.5 GB) goes frame-major to a scratch file as it is computed,
    and is then turned into the (n_mels, frames) array in pieces, so memory stays bounded.

    Returns:
        The array's frames.

    Raises:
        AudioError: from the stream; nothing is left behind.
        _WriteFailed: a write failed.
    """
    held: list[np.ndarray] = []
    frames = 0
    scratch = None
    scratch_path = temporary_path(array.with_name(array.name + ".frames"))
    try:
        for spec in stream:  # (n_mels, F)
            frames += spec.shape[1]
            try:
                if scratch is None:
                    held.append(spec)
                    if frames * n_mels * 4 <= _IN_MEMORY_BYTES:
                        continue
                    array.parent.mkdir(parents=True, exist_ok=True)
                    scratch = open(scratch_path, "w+b")
                    for block in held:
                        scratch.write(np.ascontiguousarray(block.T))  # (n_mels, F) -> (F, n_mels)
                    held = []
                else:
                    scratch.write(np.ascontiguousarray(spec.T))
            except OSError as err:
                raise _WriteFailed(frames * n_mels * 4) from err
        try:
            array.parent.mkdir(parents=True, exist_ok=True)
            if scratch is None:
                spec = held[0] if len(held) == 1 else np.concatenate(held, axis=1)
                write_atomic(array, lambda h: np.save(h, spec, allow_pickle=False))
            else:
                _transpose_into(array, scratch, n_mels, frames)
        except OSError as err:
            raise _WriteFailed(frames * n_mels * 4) from err
    finally:
        if scratch is not None:
            scratch.close()
            scratch_path.unlink(missing_ok=True)
    return frames


def _transpose_into(array: Path, scratch: Any, n_mels: int, frames: int) -> None:
    """A frame-major (frames, n_mels) float32 scratch file -> the (n_mels, frames) `.npy` file `array`."""
    with atomic_path(array) as tmp:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_mels, frames))  # header, sparse body
        with open(tmp, "r+b") as handle:
            if hasattr(os, "posix_fallocate"):
                # Reserve the blocks now: a full disk is then an OSError here, not a SIGBUS when a
                # page of the memory map is written back.
                os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        scratch.flush()
        scratch.seek(0)
        step = max(1, _IN_MEMORY_BYTES // (4 * 4 * n_mels))
        for start in range(0, frames, step):
            count = min(step, frames - start)
            block = np.frombuffer(scratch.read(count * n_mels * 4), np.float32).reshape(count, n_mels)
            # A fresh map per piece: unmapped, its written pages leave this process's resident set.
            out = np.lib.format.open_memmap(tmp, mode="r+")
            out[:, start : start + count] = block.T
            out.flush()
            del out


def _out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocation that failed (numpy's and Python's MemoryError, torch's CPU allocator)."""
    if isinstance(err, MemoryError) or isinstance(err, getattr(torch, "OutOfMemoryError", ())):
        return True
    # torch's CPU allocator raises a plain RuntimeError: "DefaultCPUAllocator: can't allocate memory".
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def prepare_one(job: tuple[str, str, str, MelSettings, int, int]) -> dict[str, Any]:
    """Compute and store one log-mel array; never raises, but KeyboardInterrupt.

    Returns:
        The job's `rel`, with either the entry's fields, or "error" (the file cannot be used: a
        failure, remembered until the file changes), or "fault" (the cache's disk refused the
        write: stops the build), or "transient" (not the file's fault, such as memory running out:
        the next build retries the file).
    """
    source, rel, array, mel, size, mtime_ns = job
    record: dict[str, Any] = {"rel": rel, "size": size, "mtime_ns": mtime_ns}
    try:
        rate, blocks = decode_blocks(source)
        stream = LogMelStream(blocks, rate, mel, source=source)
        n_frames = _store_log_mel(Path(array), stream, mel.n_mels)
        record.update(n_frames=n_frames, duration=stream.samples / rate, sample_rate=rate)
    except AudioError as err:
        record["error"] = str(err).removeprefix(f"{printable(source)}: ")  # str() of our errors is printable
    except _WriteFailed as failed:
        fault = write_fault(failed.__cause__, Path(array).parent, failed.nbytes, existed=False)
        if fault is not None:
            return {"rel": rel, "fault": fault}  # stops the build (see on_result)
        return {**record, "transient": f"its array could not be written ({_one_line(failed.__cause__)})"}
    except Exception as err:  # a worker reports, it never raises: one bad file must not stop a build
        if _out_of_memory(err):
            return {**record, "transient": f"out of memory ({_one_line(err)})"}
        record["error"] = _one_line(err)
    if "error" in record and not os.path.lexists(source):
        record.update(error=VANISHED, vanished=True)  # deleted or moved while it was being read
    return record


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
