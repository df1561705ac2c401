"""The suite's own footing: commands run in-process leave the process as they found it
(tests/conftest.py, global_state_kept), and a forked child is a real process (tests/helpers.py)."""

from __future__ import annotations

import os
import signal
import warnings

import torch
from jsonargparse import get_loader

from conftest import REPO, global_state_kept
from helpers import Child, train


def snapshot() -> dict:
    return {
        "filters": list(warnings.filters),
        "environ": dict(os.environ),
        "handlers": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)},
        "cwd": os.getcwd(),
        "threads": torch.get_num_threads(),
        "torch": (torch.is_grad_enabled(), torch.get_default_dtype(), torch.get_float32_matmul_precision(),
                  torch.are_deterministic_algorithms_enabled()),
        "yaml_loader": get_loader("yaml"),
    }


def test_global_state_kept_puts_back_each_thing_a_command_changes(tmp_path):
    from musicvae.io.safe_load import limit_config_yaml

    before = snapshot()
    with global_state_kept():
        warnings.filterwarnings("ignore", message="anything")
        os.environ["PL_GLOBAL_SEED"] = "7"
        os.environ.pop("MUSICVAE_CACHE", None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        os.chdir(tmp_path)
        torch.set_num_threads(torch.get_num_threads() + 1)
        torch.set_grad_enabled(False)  # as benchmark-quality leaves it
        torch.set_default_dtype(torch.float64)
        torch.set_float32_matmul_precision("medium")
        torch.use_deterministic_algorithms(True)
        limit_config_yaml()
        assert snapshot() != before  # the premise: each of them changed
    assert snapshot() == before


def test_a_command_run_in_process_leaves_the_process_as_it_found_it(tmp_path):
    before = snapshot()
    result = train(["--config", str(REPO / "configs" / "quickstart.yaml"), "--print_config"])
    assert result.returncode == 0 and "model:" in result.stdout, result.stderr[-2000:]
    assert snapshot() == before
    # benchmark-quality turns autograd off for its whole process (refused here before any work).
    from helpers import run_command

    refused = run_command("benchmark-quality", ["--test_dir", str(tmp_path / "missing"), "--ckpt_path",
                                                 str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "o")])
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert snapshot() == before


def test_a_child_is_a_real_process_and_its_exit_status_is_its_own(tmp_path):
    child = Child("train", ["--trainer.max_epoch", "1"])  # a typo: the parser refuses it
    result = child.result(timeout=120)
    assert child.pid != os.getpid()
    assert result.returncode == 2 and "max_epoch" in result.stderr
