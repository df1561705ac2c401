"""DataLoader worker processes: they leave stop signals to the main process, which ends them at exit."""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # its exit handler is registered first, so the one below runs before it
import signal


def ignore_stop_signals(worker_id: int) -> None:
    # Schedulers send SIGTERM to every process of a job, and a terminal's Ctrl-C sends SIGINT to
    # every process of the foreground group; a worker dying of either would crash the main process
    # before it can save. The main process handles both and ends the workers.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _kill_loader_workers() -> None:
    """End the loader workers still alive when the process exits, with SIGKILL.

    Workers ignore SIGTERM (ignore_stop_signals), and multiprocessing ends daemonic children at
    exit with SIGTERM (`Process.terminate`), then waits for them: a run stopped mid-epoch (Ctrl-C, SIGTERM, an error)
    whose loader iterator was still alive at exit waited forever (1 of 16 Ctrl-C trials of
    scripts/reliability.py). Lightning shuts down the workers of torch's own multi-process iterator
    at teardown, not those of torchdata's StatefulDataLoader (combined_loader.py's
    `_shutdown_workers_and_reset_iterator` checks for torch's class), so they are left to garbage
    collection, which may come after this. Registered after multiprocessing's exit handler, so it
    runs before it (atexit runs last-in, first-out); workers hold nothing that needs a clean end."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if not workers:
        return
    # torch's loader raises from its SIGCHLD handler when a worker dies: that would stop this loop.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in workers:
        child.kill()
    for child in workers:
        try:
            child.join(timeout=5)
        except Exception:  # noqa: BLE001 - exiting anyway; the next worker must still be ended
            pass


atexit.register(_kill_loader_workers)


def whole_item(item: dict) -> dict:
    """A prediction batch as the dataset made it (tensors, strings, numbers). A module-level
    function, not a lambda: spawn and forkserver workers (macOS, Python 3.14) pickle it."""
    return item
