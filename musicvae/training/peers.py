"""The other processes of a multi-process (DDP) run: noticing that one died, and saying so.

A process of the run learns that a peer died in one of three ways:

- a collective (all-reduce, broadcast) fails: gloo at once ("Connection closed by peer"), NCCL only
  when the process group's timeout runs out (30 minutes unless `--collective_timeout` says
  otherwise). `peer_lost(err)` recognises the error and the command stops with one line
  (`MusicVAECLI._run_subcommand`);
- on the process that started the others (a one-machine run Lightning launches itself), `PeerWatch`
  polls them. It replaces Lightning's own observer, which SIGKILLs that process without a word
  within 5 s of any child's non-zero exit: while it was outside a collective (writing a checkpoint,
  drawing media), and always under NCCL, whose collectives block rather than fail; and also
  after the orderly exits of Ctrl-C and SIGTERM (130, 143), racing its own orderly exit;
- on a process Lightning (or torchrun, or SLURM) started, `PeerWatch` notices that its launcher is
  gone: the process was re-parented.

Each way ends the same: one line naming the rank, what died, which `last.ckpt` (epoch, step) is
intact (checkpoint writes are atomic, so a death mid-write keeps the previous one) and the command
that resumes; exit status 5.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from lightning.pytorch.utilities import rank_zero_warn

from musicvae.errors import ConfigError, MusicVAEError
from musicvae.io.safe_load import first_line
from musicvae.training.checkpoint_io import stored_position
from musicvae.training.guards import INTERRUPTED_EXIT, PREEMPTED_EXIT
from musicvae.training.lightning_private import observe_launched_processes, set_process_group_timeout

#: Exit status of a process whose peer died.
PEER_LOST_EXIT = 5
#: What a collective raises on the survivors when a peer dies: gloo's closed or reset connection,
#: NCCL's aborted communicator or timeout, and torch.distributed's own error types.
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "nccl communicator was aborted",
              "watchdog caught collective operation timeout", "socket timeout", "timed out waiting",
              "caused pair closure")  # gloo's "Application timeout caused pair closure", on the other side of a timeout
#: Exit statuses every rank takes together (done, Ctrl-C, SIGTERM: the stop is agreed across ranks),
#: so a child ending with one is not a death unless the launching process is still training long after.
ORDERLY_EXITS = (0, INTERRUPTED_EXIT, PREEMPTED_EXIT)


class PeerLostError(MusicVAEError):
    """Another process of a multi-process run died (killed, out of memory, its node lost)."""


def peer_lost(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is a collective failing because another rank is gone."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        name, text = type(err).__name__, str(err).lower()
        if name in ("DistNetworkError", "DistBackendError", "DistStoreError") or any(s in text for s in _PEER_LOST):
            return True
        err = err.__cause__ or err.__context__
    return False


def collective_error_cause(err: BaseException, timeout_s: Optional[float]) -> str:
    """What a failed collective says, as the part in brackets of the one line."""
    text = first_line(err)
    limit = f"{timeout_s:g} s, --collective_timeout" if timeout_s else "the process group's timeout"
    if any(marker in text for marker in ("waiting for clients", "trying to connect")):
        # The start: every process imports torch and Lightning before it joins, seconds to minutes.
        return (f"not every process joined within {limit}: one failed to start or is slower to start (raise "
                f"--collective_timeout if it is that short); {text}")
    if "timed out" in text.lower() or "timeout" in text.lower():
        return f"it did not answer within {limit}: it died or hangs; {text}"
    return text


def exit_description(returncode: int) -> str:
    """`-9` -> "killed by SIGKILL, as the out-of-memory killer does"; `3` -> "ended with exit status 3, ..."."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        why = ", as the out-of-memory killer does" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{why}"
    return f"ended with exit status {returncode}, its own message above"


def peer_lost_message(rank: int, world_size: int, cause: str, last: Path, resume: str) -> str:
    """The one line (and the resume command under it) of a rank whose peer died."""
    kept = stored_position(last) if last.is_file() else None
    start = f"rank {rank}: another process of this {world_size}-process run died ({cause}); "
    if kept is None:
        return start + "no last.ckpt of this run was written: run the same command again"
    return start + f"{last} (epoch {kept[0]}, step {kept[1]}) is intact. Resume with:\n  {resume}"


_REPORTED = threading.Lock()


def report(line: str) -> bool:
    """Print `musicvae: error: LINE` once per process: the watch thread and the main thread may both
    see the same death (gloo fails the collective while the child's exit is polled)."""
    if not _REPORTED.acquire(blocking=False):
        return False
    sys.stderr.write(f"musicvae: error: {line}\n")
    sys.stderr.flush()
    return True


class PeerWatch:
    """A thread that watches this process's peers while `fit` runs, on runs of several processes.

    `adopt(procs)` hands it the children Lightning's launcher started (in place of Lightning's
    observer: `lightning_private.observe_launched_processes`); `parent` is this process's launcher,
    watched where one started it. On a death it stops the other children (SIGKILL: a process blocked
    in an NCCL collective acts on nothing else), prints the one line and ends this process with exit
    status 5 (`os._exit`: the main thread may be blocked in a collective that never returns). Loggers
    lose what they had not flushed; the checkpoint folder holds the last complete `last.ckpt`, and a
    half-written temporary file is removed by the next start."""

    POLL_S = 0.5
    #: A re-parented process waits this long for its own fit to end before it calls its launcher dead
    #: (at the end of a run the launcher may exit a moment before the others).
    PARENT_GRACE_S = 5.0
    #: How long the launching process may keep training after a child's orderly exit (every rank
    #: stops at the same step, so it should be seconds).
    ORDERLY_GRACE_S = 60.0

    def __init__(self, message: Callable[[str], str], parent: Optional[int] = None,
                 before_exit: Callable[[], None] = lambda: None, first_rank: int = 1,
                 standing_down: Callable[[], bool] = lambda: False) -> None:
        self.message = message  # cause -> the one line (peer_lost_message with the run's details bound)
        self.parent = parent
        self.before_exit = before_exit
        # True once this process is stopping on its own (an exception, Ctrl-C, SIGTERM: Lightning marks the
        # trainer interrupted before anything else): its own message and status win, and Lightning itself
        # SIGKILLs the children after a second Ctrl-C, which is then no death to report.
        self.standing_down = standing_down
        self.first_rank = first_rank  # global rank of the first child (the launcher's rank + 1)
        self.children: list[subprocess.Popen] = []
        self._stopped = threading.Event()
        self._orderly_since: Optional[float] = None
        self._thread = threading.Thread(target=self._run, name="musicvae-peer-watch", daemon=True)

    def adopt(self, children: list[subprocess.Popen]) -> None:
        self.children = children

    def start(self) -> "PeerWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def check(self, now: float) -> Optional[str]:
        """The cause to report if a peer is gone, else None (one poll; `now` in monotonic seconds)."""
        for index, child in enumerate(self.children):
            code = child.poll()
            if code is None:
                continue
            rank = self.first_rank + index
            if code not in ORDERLY_EXITS:
                return f"rank {rank}, pid {child.pid}, {exit_description(code)}"
            if self._orderly_since is None:
                self._orderly_since = now
            if now - self._orderly_since > self.ORDERLY_GRACE_S:
                return (f"rank {rank}, pid {child.pid}, stopped in order (exit status {code}) over "
                        f"{self.ORDERLY_GRACE_S:g} s ago, and this process is still training")
        if self.parent is not None and os.getppid() != self.parent:
            if self._stopped.wait(self.PARENT_GRACE_S):
                return None
            return f"pid {self.parent}, which started this process (rank 0 or its launcher), is gone"
        return None

    def _run(self) -> None:
        while not self._stopped.wait(self.POLL_S):
            cause = self.check(time.monotonic())
            if cause is not None and not self._stopped.is_set() and not self.standing_down():
                self._stop_everything(cause)

    def _stop_everything(self, cause: str) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
        try:
            self.before_exit()
        finally:
            report(self.message(cause))
            os._exit(PEER_LOST_EXIT)


def apply_collective_timeout(trainer: Any, seconds: Optional[float]) -> None:
    """`--collective_timeout`: the DDP process group's timeout for every collective (None: PyTorch's)."""
    if seconds is None:
        return
    if seconds <= 0:
        raise ConfigError(f"--collective_timeout {seconds:g}: give a number of seconds above 0 (e.g. 600)")
    if not set_process_group_timeout(trainer.strategy, seconds) and trainer.world_size > 1:
        rank_zero_warn(f"--collective_timeout is not applied: it sets a DDP process group's timeout, and "
                       f"the strategy is {type(trainer.strategy).__name__}")


@contextmanager
def peers_watched(trainer: Any, message: Callable[[str], str], before_exit: Callable[[], None],
                  timeout: Optional[float], watch: bool = True) -> Iterator[None]:
    """Run a subcommand of several processes so that another process's death is reported: a collective
    that fails because another process died or hung becomes one PeerLostError line, and with `watch` a
    PeerWatch also watches the processes this one started and the one that started it.

    Args:
        trainer: the run's trainer (None, or one process: nothing to do).
        message: cause -> the one line (peer_lost_message with the run's details bound).
        before_exit: what to release before a watch ends the process (the run lock).
        timeout: `--collective_timeout`, named in a timed-out collective's line.
        watch: start a PeerWatch (fit; the other subcommands end without one).
    """
    if trainer is None or trainer.world_size < 2:
        yield
        return
    environment = getattr(trainer.strategy, "cluster_environment", None)
    # Started by a launcher (Lightning's, torchrun, SLURM): watch it. The process that launches the
    # others itself (Lightning, one machine) has the user's shell as parent: nothing to watch there.
    launched = environment is not None and environment.creates_processes_externally
    peer_watch = PeerWatch(message, parent=os.getppid() if launched else None, before_exit=before_exit,
                           first_rank=trainer.global_rank + 1, standing_down=lambda: trainer.interrupted).start() \
        if watch else None
    try:
        if peer_watch is None:
            yield
        else:
            # The children Lightning launches go to PeerWatch instead of Lightning's observer.
            with observe_launched_processes(peer_watch.adopt):
                yield
    except Exception as err:
        if not peer_lost(err):
            raise
        raise PeerLostError(message(collective_error_cause(err, timeout))) from None
    finally:
        if peer_watch is not None:
            peer_watch.stop()
