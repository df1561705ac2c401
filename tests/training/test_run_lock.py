"""One training run per checkpoint folder (musicvae/training/run_lock.py): two runs on one folder (the
first in a forked child, paused at a step; the second in the test's process), a killed holder, and
the staleness rule."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from helpers import Child, fit_args, step_of, train
from musicvae.io.atomic import HOST
from musicvae.training.run_lock import LOCK_NAME, STALE_S, holder_alive, process_started


def paused_at(tmp_path: Path, cache: Path, step: int) -> tuple[Child, Path, list[str]]:
    """A run in a child process that waits at `step` until tmp_path/at_step.go exists."""
    marker = tmp_path / "at_step"
    args = fit_args(tmp_path, cache)
    proc = Child("train", [*args, "--trainer.callbacks+=probes.WaitAtStep", "--trainer.callbacks.step", str(step),
                           "--trainer.callbacks.marker", str(marker)])
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    return proc, marker, args


@pytest.mark.slow
def test_a_second_run_on_a_live_runs_folder_is_refused_and_readers_are_not(tmp_path, straight):
    first, marker, args = paused_at(tmp_path, straight["cache"], 9)
    try:
        lock = json.loads((tmp_path / "ckpt" / LOCK_NAME).read_text())
        assert (lock["host"], lock["pid"]) == (HOST, first.pid)
        second = train([*args, "--overwrite", "true"])
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another training run: pid {first.pid} on host {HOST}" in second.stderr
        reader = train(["validate", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--trainer.callbacks", "[]"])
        assert reader.returncode == 0, reader.stderr[-2000:]
    finally:
        marker.with_suffix(".go").touch()
    assert first.wait(timeout=300) == 0, first.communicate()[1][-2000:]
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists()
    assert step_of(tmp_path / "ckpt" / "last.ckpt") == 16  # the first run's, whole


@pytest.mark.slow
def test_a_killed_holders_lock_is_taken_over_on_resume(tmp_path, straight):
    first, marker, _ = paused_at(tmp_path, straight["cache"], 9)
    first.send_signal(signal.SIGKILL)
    first.wait()
    marker.with_suffix(".go").touch()  # the resumed run passes step 9 again, with the same probe
    assert (tmp_path / "ckpt" / LOCK_NAME).exists()
    # The probe given again: a checkpoint's stored callbacks are never taken beyond Lightning's plain ones.
    resumed = train(["fit", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--trainer.callbacks+=probes.WaitAtStep",
                     "--trainer.callbacks.step", "9", "--trainer.callbacks.marker", str(marker)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"took over the lock of {tmp_path / 'ckpt'} from a run that is gone (pid {first.pid}" in resumed.stderr


def test_staleness_rule():
    me = {"host": HOST, "pid": os.getpid(), "started": process_started(os.getpid())}
    now = time.time()
    assert holder_alive(me, now - 10 * STALE_S)  # on this host the process decides, not the heartbeat
    assert not holder_alive({**me, "started": "another boot:1"}, now)  # a reused pid
    assert not holder_alive({**me, "pid": 2 ** 22 + 1}, now)
    other = {"host": "elsewhere", "pid": 1, "started": None}
    assert holder_alive(other, now - STALE_S / 2, now) and not holder_alive(other, now - 2 * STALE_S, now)
