"""PeerWatch's decisions and the peer-lost line, without processes (the real runs: tests/training/test_ddp.py)."""

from __future__ import annotations

import signal

import pytest

from musicvae.training.peers import PeerWatch, collective_error_cause, exit_description, peer_lost, peer_lost_message


class FakeChild:
    def __init__(self, pid: int, code: int | None = None) -> None:
        self.pid, self.returncode = pid, code

    def poll(self):
        return self.returncode


def watch(*children: FakeChild, parent: int | None = None) -> PeerWatch:
    w = PeerWatch(lambda cause: cause, parent=parent, first_rank=1)
    w.adopt(list(children))
    return w


def test_a_killed_or_failed_child_is_a_lost_peer_at_once():
    assert watch(FakeChild(10), FakeChild(11, -signal.SIGKILL)).check(0.0) == \
        "rank 2, pid 11, killed by SIGKILL, as the out-of-memory killer does"
    assert "rank 1, pid 10, ended with exit status 3" in watch(FakeChild(10, 3)).check(0.0)


@pytest.mark.parametrize("code", [0, 130, 143])
def test_an_orderly_exit_is_given_time_before_it_counts(code):
    """Done, Ctrl-C and SIGTERM stop every rank at the same step: the launching process is about to
    stop too (Lightning's observer SIGKILLed it at such moments)."""
    w = watch(FakeChild(10, code))
    assert w.check(100.0) is None
    assert w.check(100.0 + PeerWatch.ORDERLY_GRACE_S - 1) is None
    assert "stopped in order (exit status" in w.check(100.0 + PeerWatch.ORDERLY_GRACE_S + 1)


def test_a_running_child_and_a_present_parent_are_fine():
    import os

    assert watch(FakeChild(10), parent=os.getppid()).check(0.0) is None


def test_a_gone_parent_is_reported_after_the_grace_unless_the_run_ends_first(monkeypatch):
    monkeypatch.setattr(PeerWatch, "PARENT_GRACE_S", 0.01)
    assert "pid 1, which started this process" in watch(parent=1).check(0.0)
    w = watch(parent=1)
    w.stop()  # the run ended during the grace: the launcher exiting first is no fault
    assert w.check(0.0) is None


def test_collective_failures_are_recognised_and_explained():
    closed = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")
    assert peer_lost(closed) and peer_lost(RuntimeError("wrapped")) is False
    wrapped = RuntimeError("during the step")
    wrapped.__cause__ = closed
    assert peer_lost(wrapped)
    timed_out = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms for recv operation to complete")
    assert peer_lost(timed_out)
    pair = RuntimeError("Application timeout caused pair closure")  # gloo, seen on rank 0 in a broadcast
    assert peer_lost(pair) and collective_error_cause(pair, 30.0).startswith("it did not answer within 30 s")
    assert collective_error_cause(timed_out, 30.0).startswith("it did not answer within 30 s, --collective_timeout")
    assert collective_error_cause(timed_out, None).startswith("it did not answer within the process group's timeout")
    start = RuntimeError("Timed out after 601 seconds waiting for clients. 1/4 clients joined.")
    assert collective_error_cause(start, 600.0).startswith("not every process joined within 600 s")
    assert exit_description(-11) == "killed by SIGSEGV"


def test_the_line_names_the_checkpoint_kept_or_says_there_is_none(tmp_path):
    import torch

    last = tmp_path / "last.ckpt"
    assert peer_lost_message(0, 2, "x", last, "cmd --ckpt_path L").endswith(
        "no last.ckpt of this run was written: run the same command again")
    torch.save({"epoch": 3, "global_step": 40}, last)
    line = peer_lost_message(1, 4, "x", last, "cmd --ckpt_path L")
    assert line.startswith("rank 1: another process of this 4-process run died (x); ")
    assert line.endswith(f"{last} (epoch 3, step 40) is intact. Resume with:\n  cmd --ckpt_path L")


def test_a_process_stopping_on_its_own_does_not_report_its_children(monkeypatch):
    """After a second Ctrl-C Lightning SIGKILLs the children itself; the trainer is marked interrupted
    first, and the watch stands down instead of calling that a death."""
    import musicvae.training.peers as peers

    exits = []
    monkeypatch.setattr(PeerWatch, "POLL_S", 0.01)
    monkeypatch.setattr(peers.os, "_exit", exits.append)
    monkeypatch.setattr(peers, "report", lambda line: exits.append(line))
    w = PeerWatch(lambda cause: cause, first_rank=1, standing_down=lambda: True)
    w.adopt([FakeChild(10, -signal.SIGKILL)])
    w.start()
    import time

    time.sleep(0.2)
    w.stop()
    assert exits == []
    w = PeerWatch(lambda cause: cause, first_rank=1)
    w.adopt([FakeChild(10, -signal.SIGKILL)])
    w.start()
    time.sleep(0.2)
    w.stop()
    assert exits[:2] == ["rank 1, pid 10, killed by SIGKILL, as the out-of-memory killer does", 5]
