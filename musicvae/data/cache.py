"""A folder of audio files -> cached log-mel arrays, computed once and reused while fresh.

One cache folder per (data folder, mel settings), see `cache_folder`:

    manifest.json     entries (usable recordings), failures and retries, keyed by path relative to data_dir
    mel.json          the mel settings, as in any folder of precomputed arrays
    arrays/<rel>.npy  one (n_mels, frames) float32 log-mel array per usable recording

An entry is fresh while its source has the size and modification time recorded with it, so a
warm check is a stat() and a dictionary lookup per file, never a decode. Failures are recorded
the same way, so a warm run reports a broken file again without decoding it again. A failure
that is not the file's fault (memory ran out, its process was killed from outside, the build was
interrupted, the disk filled) is not a failure: the next build tries the file again. Those of the
first two kinds are counted under "retries", and the MAX_RETRIES-th is recorded as a failure.

Arrays, the manifest and mel.json are written to a temporary file in their own folder and then
`os.replace`d: a kill leaves each of them either whole or absent, never half-written. The
manifest is saved every few seconds during a build, so a killed build keeps most of its work;
an array written after the last save is simply recomputed next time.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import stat
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from musicvae.audio.mel import AUDIO_SUFFIXES, AudioError, LogMelStream, MelSettings, decode_blocks
from musicvae.io.atomic import atomic_path, remove_abandoned, temporary_path, write_atomic
from musicvae.io.storage import StorageError, write_fault
from musicvae.data.listing import link_problem, list_folder
from musicvae.errors import DataError, printable

#: Bump when the arrays or the manifest change meaning, so older caches are not reused.
CACHE_VERSION = 1
MANIFEST = "manifest.json"
_SAVE_EVERY_S = 5.0  # manifest saves during a build: at most this much work is lost to a kill
VANISHED = "vanished after it was listed: file not found"
#: A log-mel up to this size (95 s of 128 mels at 86 frames/s) is saved from memory; a longer one is
#: written in pieces (see _store_log_mel), so that memory does not grow with a recording's length.
_IN_MEMORY_BYTES = 4 << 20
#: Builds that may fail on a file for reasons not its own (memory ran out, its process was
#: killed) before the file is recorded as unusable: a file that exhausts memory by itself each
#: time must not be retried forever.
MAX_RETRIES = 3
# Files that vanished between listing and reading in the last build of each cache folder in this
# process: {folder: {rel: reason}}. A training run builds twice (prepare_data, then setup, whose
# build the run reports), and the second listing no longer sees such a file; it is named from here.
_vanished_last_build: dict[str, dict[str, str]] = {}


@dataclass
class CacheEntry:
    """One usable recording and its cached log-mel array.

    Attributes:
        rel: POSIX path of the source relative to the data folder (the key of the split).
        source: absolute path of the audio file.
        array: absolute path of its (n_mels, n_frames) float32 `.npy` array.
        n_frames: time frames in the array.
        duration: seconds of audio in the source.
        sample_rate: the source's native sample rate.
    """

    rel: str
    source: str
    array: str
    n_frames: int
    duration: float
    sample_rate: int


@dataclass
class CacheReport:
    """What a build found: usable entries (sorted by rel), unusable files, and the work done.

    Attributes:
        entries: one per usable recording.
        problems: (path, reason) for each file that cannot be used, each reported once.
        computed: entries (and failures) decoded by this build.
        reused: entries (and failures) taken from the manifest without decoding.
        seconds_of_audio: total duration of the entries.
    """

    entries: list[CacheEntry] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    computed: int = 0
    reused: int = 0
    seconds_of_audio: float = 0.0


def cache_folder(cache_dir: str | os.PathLike, data_dir: str | os.PathLike, mel: MelSettings) -> Path:
    """The cache folder of one data folder (by absolute path) under one set of mel settings."""
    data_dir = Path(data_dir).expanduser().resolve()
    key = json.dumps({"v": CACHE_VERSION, "data_dir": str(data_dir), "mel": mel.to_dict()}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", data_dir.name) or "root"
    return Path(cache_dir).expanduser().resolve() / "audio" / f"{name}-{digest}"


def find_audio_files(data_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative POSIX paths of the audio files under `data_dir`, sorted, and problems: directories
    that carry an audio suffix, and symbolic links that loop (musicvae.data.listing: links to
    folders are followed, each folder once)."""
    listing = list_folder(data_dir)
    problems = [(str(Path(data_dir) / rel), "is a directory, not an audio file") for rel in listing.dirs
                if os.path.splitext(rel)[1].lower() in AUDIO_SUFFIXES]
    found = [rel for rel in listing.files if os.path.splitext(rel)[1].lower() in AUDIO_SUFFIXES]
    return found, problems + listing.loops


def _load_manifest(folder: Path, data_dir: Path, mel: MelSettings) -> dict[str, Any]:
    empty = {"version": CACHE_VERSION, "data_dir": str(data_dir), "mel": mel.to_dict(), "entries": {}, "failures": {},
             "retries": {}}
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return empty  # no manifest yet; a corrupt one is rebuilt rather than trusted
    if not isinstance(manifest, dict) or any(manifest.get(k) != empty[k] for k in ("version", "data_dir", "mel")):
        return empty
    if not isinstance(manifest.get("entries"), dict) or not isinstance(manifest.get("failures"), dict):
        return empty
    if not isinstance(manifest.setdefault("retries", {}), dict):  # absent from caches of earlier versions
        return empty
    return manifest


def _save_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_atomic(folder / MANIFEST, lambda h: json.dump(manifest, h, separators=(",", ":")), mode="w")


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


def _prepare_one(job: tuple[str, str, str, MelSettings, int, int]) -> dict[str, Any]:
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


def init_worker_process() -> None:
    """Settings of a preparation worker process (the benchmark applies them to time stages alike)."""
    # One thread per process: the pool already uses every core, and torch's OpenMP pool inherited
    # through fork is not safe to use in the child (PyTorch's DataLoader workers do the same).
    torch.set_num_threads(1)
    # glibc serves blocks above its mmap threshold (128 KB at first, adapting) with fresh pages
    # from the kernel, so each file's multi-MB decode and STFT buffers page-faulted anew. Keeping
    # them on the heap made preparation faster. Workers only: the caller's process is not ours
    # to tune. A no-op where the C library is not glibc.
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: blocks up to 64 MB come from the heap
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD: keep up to 128 MB of freed heap
    except (OSError, AttributeError):
        pass


def _pool(workers: int) -> ProcessPoolExecutor:
    # fork starts a worker in milliseconds; spawn would re-import torch in each (seconds).
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    return ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker_process)


def _run_jobs(jobs: list, workers: int, on_result: Callable[[dict[str, Any]], None]) -> None:
    """Run `_prepare_one` over `jobs` in `workers` processes (0: in this one)."""
    if workers <= 0 or len(jobs) <= 1:
        # One file at a time gains little from torch's intra-op threads, and when another process
        # holds a core their OpenMP spinning made preparation several times slower.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for job in jobs:
                on_result(_prepare_one(job))
        finally:
            torch.set_num_threads(threads)
        return
    lost = []
    pool = _pool(min(workers, len(jobs)))
    try:
        futures = {pool.submit(_prepare_one, job): job for job in jobs}
        for future in as_completed(futures):
            try:
                on_result(future.result())
            except BrokenProcessPool:
                lost.append(futures[future])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    # A worker died outright (a crash in a codec, or killed for memory) and took every pending
    # job with it: retry those one by one, each in a process of its own, so that only the
    # culprit is reported, and how its process ended decides whose fault it was.
    _run_jobs_in_processes(sorted(lost, key=lambda j: j[1]), 1, on_result, timeout=None)


def _job_process(job: tuple, send: Any) -> None:
    """A decoding process's whole life: one file, its record sent back, then exit."""
    init_worker_process()
    try:
        record = _prepare_one(job)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: not the file's fault
        record = {"rel": job[1], "interrupted": True}
    send.send(record)
    send.close()


def _ended_without_record(job: tuple, exitcode: Optional[int]) -> dict[str, Any]:
    """The record of a decoding process that died before it could send one.

    SIGKILL comes from outside the process: the kernel's OOM killer, or a person. The file is
    then retried by the next build (up to MAX_RETRIES times). Any other death (SIGSEGV,
    SIGABRT, an exit) is the codec's crash on this file, and the file is recorded as unusable.
    """
    record = {"rel": job[1], "size": job[4], "mtime_ns": job[5]}
    if exitcode == -signal.SIGKILL:
        return {**record, "transient": "its decoding process was killed (SIGKILL: out of memory?)"}
    how = f"exit status {exitcode}"
    if exitcode is not None and exitcode < 0:
        try:
            how = f"signal {signal.Signals(-exitcode).name}"
        except ValueError:  # a real-time signal has no name
            how = f"signal {-exitcode}"
    return {**record, "error": f"the decoder crashed its process ({how}): a codec fault on this file"}


def _run_jobs_in_processes(jobs: list, workers: int, on_result: Callable[[dict[str, Any]], None],
                           timeout: Optional[float]) -> None:
    """Run `_prepare_one` over `jobs`, each in a process of its own, up to `workers` at once (at
    least one). With a `timeout`, a process still running after `timeout` seconds is killed
    (SIGKILL): a decoder stuck on a malformed file, even one that blocks every signal, cannot
    hold the build. A fork costs milliseconds against the seconds a file takes to decode."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pending, running = list(jobs), {}
    try:
        while pending or running:
            while pending and len(running) < max(1, workers):
                job = pending.pop(0)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_job_process, args=(job, send), daemon=True)
                process.start()
                send.close()
                running[receive] = (process, job, time.monotonic())
            for conn in multiprocessing.connection.wait(list(running), timeout=0.2):
                process, job, _ = running.pop(conn)
                try:
                    record = conn.recv()
                except (EOFError, OSError):
                    record = None
                conn.close()
                process.join()
                on_result(record if record is not None else _ended_without_record(job, process.exitcode))
            now = time.monotonic()
            for conn, (process, job, started) in list(running.items()):
                if timeout is not None and now - started > timeout:
                    process.kill()
                    process.join()
                    conn.close()
                    del running[conn]
                    # A decoder that hangs hangs on the file: recorded like a bad file (docs/reliability.md).
                    on_result({"rel": job[1], "size": job[4], "mtime_ns": job[5],
                               "error": f"decoding took longer than {timeout:g} s (--data.decode_timeout); "
                                        "its process was stopped"})
    finally:
        for conn, (process, _, _) in running.items():
            process.kill()
            process.join()
            conn.close()


def build_audio_cache(
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    mel: MelSettings,
    workers: int = 0,
    progress: bool = False,
    decode_timeout: Optional[float] = None,
) -> CacheReport:
    """Bring the log-mel cache of every audio file under `data_dir` up to date.

    Args:
        data_dir: folder searched recursively for AUDIO_SUFFIXES files; only read.
        cache_dir: root of the caches; this folder's cache is `cache_folder(cache_dir, data_dir, mel)`.
        mel: the mel settings of the arrays.
        workers: processes that decode in parallel; 0 decodes in this process.
        progress: show a progress bar (tqdm, on stderr) over the files to compute.
        decode_timeout: seconds one file may take to decode and store, each in a process of its
            own that is killed when it runs over (the file is then reported like any bad file);
            None: no limit, in `workers` pooled processes (or this one).

    Returns:
        The usable entries sorted by path, the unusable files with reasons, and the counts.

    Raises:
        DataError: `data_dir` is not a folder.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: the audio folder does not exist or is not a folder")
    folder = cache_folder(cache_dir, data_dir, mel)
    arrays = folder / "arrays"
    arrays.mkdir(parents=True, exist_ok=True)
    remove_abandoned(folder)
    old = _load_manifest(folder, data_dir, mel)
    manifest = {**old, "entries": {}, "failures": {}, "retries": {}}
    rels, problems = find_audio_files(data_dir)
    report = CacheReport()
    jobs = []
    listed = set(rels)
    vanished: dict[str, str] = {}  # rel -> reason, for files gone between listing and reading
    interrupted: set[str] = set()
    earlier = _vanished_last_build.pop(str(folder), {})
    problems += [(str(data_dir / rel), reason) for rel, reason in earlier.items() if rel not in listed]
    for rel in rels:
        source = data_dir / rel
        try:
            st = os.stat(source)
        except OSError as err:
            if link_problem(source, err):
                problems.append((str(source), link_problem(source, err)))
            elif isinstance(err, FileNotFoundError):
                vanished[rel] = VANISHED
            else:
                problems.append((str(source), f"cannot stat ({err.strerror})"))
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append((str(source), "not a regular file"))
            continue
        key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        entry, failure = old["entries"].get(rel), old["failures"].get(rel)
        if entry and _matches(entry, key) and os.path.exists(folder / entry["array"]):
            manifest["entries"][rel] = entry
            report.reused += 1
        elif failure and _matches(failure, key):
            manifest["failures"][rel] = failure
            report.reused += 1
        else:
            retry = old["retries"].get(rel)
            if retry and _matches(retry, key):
                manifest["retries"][rel] = retry  # kept until this build settles the file
            jobs.append((str(source), rel, str(arrays / f"{rel}.npy"), mel, st.st_size, st.st_mtime_ns))
    bar = _progress_bar(len(jobs), report.reused, progress)
    last_save = time.monotonic()

    def on_result(record: dict[str, Any]) -> None:
        nonlocal last_save
        rel = record.pop("rel")
        if "fault" in record:
            done = len(manifest["entries"])
            raise StorageError(
                f"log-mel cache not written: {record['fault']}. Preparation stopped at {rel}; the {done} arrays "
                f"already in {folder} are kept, and the next run continues from there once there is room "
                "(or choose another --data.cache_dir)")
        if record.get("interrupted"):
            interrupted.add(rel)  # Ctrl-C in its decoding process: nothing is recorded
            return
        retry = manifest["retries"].pop(rel, None)
        if "transient" in record:
            count = (retry or {}).get("count", 0) + 1
            if count < MAX_RETRIES:
                manifest["retries"][rel] = {**record, "count": count}
            else:
                reason = record.pop("transient")
                manifest["failures"][rel] = {**record, "error": f"{reason}, in {count} builds in a row; "
                                                                 "not tried again until the file changes"}
        elif record.pop("vanished", False):
            vanished[rel] = record["error"]  # not recorded: there is no file left to key it by
        elif "error" in record:
            manifest["failures"][rel] = record
        else:
            manifest["entries"][rel] = {**record, "array": f"arrays/{rel}.npy"}
        report.computed += 1
        if bar is not None:
            bar.update(1)
        if time.monotonic() - last_save > _SAVE_EVERY_S:
            _save_manifest(folder, manifest)
            last_save = time.monotonic()

    try:
        if decode_timeout is None:
            _run_jobs(jobs, workers, on_result)
        else:
            _run_jobs_in_processes(jobs, workers, on_result, decode_timeout)
    finally:
        if bar is not None:
            bar.close()
        if jobs or manifest["entries"].keys() != old["entries"].keys() or manifest["retries"] != old["retries"]:
            _save_manifest(folder, manifest)
    # Arrays of recordings that are gone, or no longer decode, go with their entries.
    for rel, entry in old["entries"].items():
        if rel not in manifest["entries"]:
            (folder / entry["array"]).unlink(missing_ok=True)
    if not (folder / "mel.json").exists():
        write_atomic(folder / "mel.json", lambda h: h.write(json.dumps(mel.to_dict(), indent=2) + "\n"), "w")

    for rel in rels:
        if rel in manifest["entries"]:
            e = manifest["entries"][rel]
            report.entries.append(CacheEntry(rel, str(data_dir / rel), str(folder / e["array"]),
                                             e["n_frames"], e["duration"], e["sample_rate"]))
        elif rel in manifest["failures"]:
            problems.append((str(data_dir / rel), manifest["failures"][rel]["error"]))
        elif rel in interrupted:
            problems.append((str(data_dir / rel), "its decoding was interrupted (Ctrl-C); the next run tries it again"))
        elif rel in manifest["retries"]:
            retry = manifest["retries"][rel]
            problems.append((str(data_dir / rel), f"{retry['transient']}; not the file's fault, so the next run "
                                                  f"tries it again ({retry['count']} of {MAX_RETRIES} tries)"))
    problems += [(str(data_dir / rel), reason) for rel, reason in vanished.items()]
    if vanished:
        _vanished_last_build[str(folder)] = vanished
    report.problems = sorted((printable(path), printable(reason)) for path, reason in problems)  # one line each
    report.seconds_of_audio = float(sum(e.duration for e in report.entries))
    return report


def _matches(record: dict[str, Any], key: dict[str, int]) -> bool:
    return record.get("size") == key["size"] and record.get("mtime_ns") == key["mtime_ns"]


def _progress_bar(total: int, reused: int, enabled: bool) -> Optional[Any]:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc=f"log-mel ({reused} cached)", dynamic_ncols=True)
