"""Memory of a process and its DataLoader workers, read from /proc (Linux).

USS (unique set size) is the memory that would be freed if the process ended: pages mapped by
this process alone, `Private_Clean + Private_Dirty` in `/proc/PID/smaps_rollup`. Unlike RSS it
leaves out the shared libraries (torch's ~1 GB) that RSS counts once per process.

Summed over a main process and its forked workers, USS undercounts: the pages a worker still
shares copy-on-write with the main process (the interpreter, torch, the dataset's index) are
private to neither, so they are in nobody's USS. PSS splits each page among the processes that
map it, so `Pss_Anon` summed over the tree counts each anonymous page of the tree once
(anonymous pages are shared only with relatives): that sum, `anon`, is the tree's heap and
tensors, what a leak or a copy of the data would grow. `Pss_File` covers mapped files: the
memory-mapped log-mel cache (clean pages the kernel may drop and read again) and libraries.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

#: smaps_rollup fields kept, in bytes.
FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Private_Clean", "Private_Dirty", "Shared_Clean",
          "Shared_Dirty", "Anonymous", "Swap")


def smaps_rollup(pid: int) -> Optional[dict[str, int]]:
    """The memory summary of process `pid` in bytes, or None when it is gone (or not readable).

    A zombie (a worker that has exited but not been reaped) has an empty rollup: also None.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            text = handle.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in FIELDS:
            values[key] = int(rest.split()[0]) * 1024  # "1756 kB"
    return values or None


def uss(pid: int) -> Optional[int]:
    """Unique set size of `pid` in bytes (Private_Clean + Private_Dirty), None when it is gone."""
    values = smaps_rollup(pid)
    if values is None:
        return None
    return values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)


def mapped_pss(pid: int, prefixes: tuple[str, ...]) -> int:
    """PSS in bytes of `pid`'s mappings of files whose path starts with one of `prefixes`
    (e.g. the memory-mapped arrays of a log-mel cache); 0 when the process is gone."""
    total, counting = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as handle:
            for line in handle:
                if not line[0].isupper():  # a mapping's header: "start-end perms offset dev inode path"
                    parts = line.split(None, 5)
                    counting = len(parts) == 6 and parts[5].rstrip("\n").startswith(prefixes)
                elif counting and line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    return total


def _children(pid: int) -> Optional[list[int]]:
    """Direct children, from /proc/PID/task/*/children; None where the kernel lacks that file."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    kids: set[int] = set()
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as handle:
                kids.update(int(k) for k in handle.read().split())
        except FileNotFoundError:
            if os.path.exists(f"/proc/{pid}/task/{tid}"):
                return None  # the thread is there, the file is not: no CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return sorted(kids)


def _parent(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children, ...)."""
    if _children(pid) is None:  # scan every process's parent instead (slower)
        parents = {int(e): _parent(int(e)) for e in os.listdir("/proc") if e.isdigit()}

        def children(p: int) -> list[int]:
            return sorted(child for child, parent in parents.items() if parent == p)
    else:
        def children(p: int) -> list[int]:
            return _children(p) or []
    found, frontier = [], [pid]
    while frontier:
        kids = children(frontier.pop())
        found += kids
        frontier += kids
    return found


@dataclass
class TreeMemory:
    """One reading of a process and its descendants, in bytes (see the module docstring)."""

    main_uss: int = 0
    workers_uss: int = 0
    pss: int = 0
    anon: int = 0  # sum of Pss_Anon: the tree's anonymous memory, shared pages counted once
    file: int = 0  # sum of Pss_File
    mapped: int = 0  # sum of PSS of the mappings under the watched prefixes (tree_memory's `prefixes`)
    workers: int = 0

    @property
    def uss(self) -> int:
        return self.main_uss + self.workers_uss

    def add(self, values: dict[str, int], worker: bool) -> None:
        private = values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
        if worker:
            self.workers_uss += private
            self.workers += 1
        else:
            self.main_uss += private
        self.pss += values.get("Pss", 0)
        self.anon += values.get("Pss_Anon", 0)
        self.file += values.get("Pss_File", 0)

    def as_dict(self) -> dict[str, int]:
        return {"uss": self.uss, "main_uss": self.main_uss, "workers_uss": self.workers_uss, "pss": self.pss,
                "anon": self.anon, "file": self.file, "mapped": self.mapped, "workers": self.workers}


def tree_memory(pid: Optional[int] = None, prefixes: tuple[str, ...] = ()) -> TreeMemory:
    """USS, PSS and PSS's anonymous and file parts of `pid` (default: this process) and its
    descendants; with `prefixes`, also the PSS of their mappings of files under those paths."""
    pid = os.getpid() if pid is None else pid
    reading = TreeMemory()
    for process in [pid, *descendants(pid)]:
        values = smaps_rollup(process)
        if values is None:
            continue
        reading.add(values, worker=process != pid)
        if prefixes:
            reading.mapped += mapped_pss(process, prefixes)
    return reading


@dataclass
class MemorySampler:
    """Samples `tree_memory()` every `interval` seconds in a background thread.

    Use as a context manager; `peak` holds each field's largest value, `last` the final reading.
    """

    interval: float = 0.05
    prefixes: tuple[str, ...] = ()
    samples: list[TreeMemory] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None

    def __enter__(self) -> "MemorySampler":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.samples.append(tree_memory(prefixes=self.prefixes))

    def sample(self) -> None:
        """Take a reading now (from any thread), besides the periodic ones."""
        self.samples.append(tree_memory(prefixes=self.prefixes))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(tree_memory(prefixes=self.prefixes))
            self._stop.wait(self.interval)

    @property
    def peak(self) -> dict[str, int]:
        """Each field's largest value over the samples (not necessarily all from one sample)."""
        readings = [r.as_dict() for r in self.samples]
        return {key: max(r[key] for r in readings) for key in readings[0]}

    @property
    def steady(self) -> dict[str, int]:
        """Each field's median over the samples taken with every worker running.

        The processes of a tree are read one after the other, so a sample taken while a worker
        forks can count the main process's pages before the fork and the worker's share after
        it: peaks of summed PSS overstate. The median of the samples is the state that holds.
        """
        most = max(r.workers for r in self.samples)
        readings = [r.as_dict() for r in self.samples if r.workers == most]
        return {key: int(statistics.median(r[key] for r in readings)) for key in readings[0]}

    @property
    def last(self) -> TreeMemory:
        return self.samples[-1]

    def summary(self, seconds: Optional[float] = None) -> dict[str, Any]:
        """Peak, steady and final readings (bytes), the most workers seen and the number of samples."""
        return {
            "peak": self.peak,
            "steady": self.steady,
            "last": self.last.as_dict(),
            "max_workers": self.peak["workers"],
            "samples": len(self.samples),
            **({"seconds": seconds} if seconds is not None else {}),
        }


def timed_sampling(fn: Callable[[], Any], interval: float = 0.05, prefixes: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run `fn()` while sampling memory; the sampler's summary plus the wall seconds it took."""
    sampler = MemorySampler(interval=interval, prefixes=prefixes)
    start = time.perf_counter()
    with sampler:
        fn()
    return sampler.summary(time.perf_counter() - start)


def growth_per_hour(hours: list[float], values: list[float]) -> float:
    """Least-squares slope of `values` against `hours` (units of `values` per hour of audio)."""
    if len(hours) < 2:
        return 0.0
    mean_h, mean_v = sum(hours) / len(hours), sum(values) / len(values)
    var = sum((h - mean_h) ** 2 for h in hours)
    if var == 0:
        return 0.0
    return sum((h - mean_h) * (v - mean_v) for h, v in zip(hours, values)) / var
