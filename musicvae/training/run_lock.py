"""One training run per checkpoint folder: a lock file that names its holder and proves it alive.

Two jobs started from one config, or a requeued job while the old one still runs, would
otherwise both write `best.ckpt` and `last.ckpt`, each overwriting the other's. The lock is a
file, `.musicvae.lock`, in the checkpoint folder:

- its holder is a host, a process id and that process's start time (so a reused pid is not
  mistaken for the holder), written when the lock is taken;
- the holder refreshes the file's modification time every HEARTBEAT_S seconds from a daemon
  thread, so a run on another host sharing the folder (NFS, Lustre) is seen alive for as long
  as it runs, days included;
- a lock is stale when its holder is gone: on this host, no process with that id and start
  time; on another host, no heartbeat for STALE_S seconds. A stale lock is taken over with a
  warning, so resuming after a crash or a kill is never blocked. A live one is never taken,
  `--overwrite true` included.

Only rank 0 of `fit` takes it; validate, test, predict and the other commands only read.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

from musicvae.io.atomic import HOST, process_alive, write_atomic
from musicvae.errors import MusicVAEError

LOCK_NAME = ".musicvae.lock"
#: Seconds between two heartbeats of the holder.
HEARTBEAT_S = 30.0
#: A lock held from another host is stale after this long without a heartbeat (ten missed beats:
#: a stalled network filesystem must not hand a live run's folder to a second job).
STALE_S = 300.0


class RunLockError(MusicVAEError):
    """The checkpoint folder is in use by a live run; the message names it."""


def process_started(pid: int) -> Optional[str]:
    """An identity for the process `pid` that a reused pid cannot share: boot id and start time in
    clock ticks (Linux /proc); None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            ticks = handle.read().rsplit(")", 1)[1].split()[19]
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return f"{handle.read().strip()}:{ticks}"
    except (OSError, IndexError):
        return None


def holder_alive(holder: dict[str, Any], mtime: float, now: Optional[float] = None) -> bool:
    """Whether the lock's holder still runs (see the module docstring for the rule)."""
    if holder.get("host") != HOST:
        return (now if now is not None else time.time()) - mtime < STALE_S
    pid = int(holder.get("pid", -1))
    if pid <= 0 or not process_alive(pid):
        return False
    started = holder.get("started")
    return started is None or process_started(pid) in (None, started)


def describe(holder: dict[str, Any], mtime: float) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", mtime)))
    beat = time.time() - mtime
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, training since {since} "
            f"(last heartbeat {beat:.0f} s ago): {holder.get('command', '?')}")


class RunLock:
    """The lock of one checkpoint folder, held by this process while it trains there.

    Args:
        folder: the checkpoint folder (created if missing).
        command: the holder's command line, shown to whoever finds the folder taken.
    """

    def __init__(self, folder: str | os.PathLike, command: str = "") -> None:
        self.path = Path(folder) / LOCK_NAME
        self.command = command
        self.created_folder = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def refuse_if_held(self) -> None:
        """Raise RunLockError when a live run holds the lock; writes nothing (a check before any work)."""
        if self.path.is_file():
            holder, mtime = self._read()
            if holder is not None and holder_alive(holder, mtime):
                raise self._held(holder, mtime)

    def _held(self, holder: dict[str, Any], mtime: float) -> RunLockError:
        return RunLockError(
            f"{self.path.parent} is in use by another training run: {describe(holder, mtime)}. Wait for it, stop "
            "it, or choose another --checkpoint_dir (--overwrite true does not take a live run's folder)")

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a warning when a stale one was taken over, None otherwise.

        Raises:
            RunLockError: a live run holds it.
        """
        self.created_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = {"host": HOST, "pid": os.getpid(), "started": process_started(os.getpid()),
                "since": time.time(), "command": self.command}
        note = None
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder, mtime = self._read()
            if holder is not None and holder_alive(holder, mtime):
                raise self._held(holder, mtime) from None
            note = (f"musicvae: took over the lock of {self.path.parent} from a run that is gone "
                    f"({describe(holder, mtime) if holder else 'unreadable lock file'})")
            write_atomic(self.path, lambda h: json.dump(mine, h), mode="w")
        else:
            with os.fdopen(fd, "w") as handle:
                json.dump(mine, handle)
        self._thread = threading.Thread(target=self._beat, name="musicvae-run-lock", daemon=True)
        self._thread.start()
        return note

    def _read(self) -> tuple[Optional[dict[str, Any]], float]:
        try:
            mtime = self.path.stat().st_mtime
            return json.loads(self.path.read_text()), mtime
        except (OSError, ValueError):
            return None, 0.0

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the folder's own write errors stop training with their message

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this process's."""
        self._stop.set()
        holder, _ = self._read()
        if holder is not None and holder.get("host") == HOST and int(holder.get("pid", -1)) == os.getpid():
            try:
                self.path.unlink()
                if self.created_folder and not any(self.path.parent.iterdir()):
                    self.path.parent.rmdir()  # a run stopped before writing anything leaves no folder
            except OSError:
                pass
