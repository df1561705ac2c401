"""Running the cache's jobs (musicvae/data/cache_job.py) in worker processes.

Without a time limit the jobs share a pool of forked workers; with one (--data.decode_timeout),
each file is decoded in a process of its own that is killed when it runs over. A worker that dies
outright is told apart by how it ended: killed from outside (out of memory?) is not the file's
fault, a crash in a codec is.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import signal
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Optional

import torch

from musicvae.data.cache_job import prepare_one


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


def run_jobs(jobs: list, workers: int, on_result: Callable[[dict[str, Any]], None]) -> None:
    """Run `prepare_one` over `jobs` in `workers` processes (0: in this one)."""
    if workers <= 0 or len(jobs) <= 1:
        # One file at a time gains little from torch's intra-op threads, and when another process
        # holds a core their OpenMP spinning made preparation several times slower.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for job in jobs:
                on_result(prepare_one(job))
        finally:
            torch.set_num_threads(threads)
        return
    lost = []
    pool = _pool(min(workers, len(jobs)))
    try:
        futures = {pool.submit(prepare_one, job): job for job in jobs}
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
    run_jobs_in_processes(sorted(lost, key=lambda j: j[1]), 1, on_result, timeout=None)


def _job_process(job: tuple, send: Any) -> None:
    """A decoding process's whole life: one file, its record sent back, then exit."""
    init_worker_process()
    try:
        record = prepare_one(job)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: not the file's fault
        record = {"rel": job[1], "interrupted": True}
    send.send(record)
    send.close()


def _ended_without_record(job: tuple, exitcode: Optional[int]) -> dict[str, Any]:
    """The record of a decoding process that died before it could send one.

    SIGKILL comes from outside the process: the kernel's OOM killer, or a person. The file is
    then retried by the next build (up to cache.MAX_RETRIES times). Any other death (SIGSEGV,
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


def run_jobs_in_processes(jobs: list, workers: int, on_result: Callable[[dict[str, Any]], None],
                           timeout: Optional[float]) -> None:
    """Run `prepare_one` over `jobs`, each in a process of its own, up to `workers` at once (at
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
