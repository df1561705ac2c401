"""Checkpoints written before the package was reorganised still resume, evaluate, generate and export.

The fixture checks out the last commit of the flat layout (`git archive`, from this clone's own
history) and trains a tiny run with it in a process of its own (that version's `musicvae` package),
so the checkpoint is exactly what that version wrote. Today's commands then run in-process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_FLAGS, load_script
from helpers import run_command

pytestmark = pytest.mark.slow

#: The last commit with the flat `musicvae/*.py` layout.
FLAT_LAYOUT = "4d927391a1a2be8bf83e32e435d0f71062248231"


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("old_layout")
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot check out the old layout")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", FLAT_LAYOUT, "musicvae", "scripts",
                              "configs"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {FLAT_LAYOUT[:7]} is not in this clone's history (a shallow clone?)")
    old = tmp / "old"
    old.mkdir()
    (tmp / "old.tar").write_bytes(archive.stdout)
    with tarfile.open(tmp / "old.tar") as tar:
        tar.extractall(old, filter="data")
    run = tmp / "run"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    trained = subprocess.run(
        [sys.executable, str(old / "scripts" / "train.py"), "fit", *TINY_FLAGS, "--data.cache_dir", str(tmp / "cache"),
         "--checkpoint_dir", str(run / "ckpt"), "--trainer.logger.init_args.save_dir", str(run / "logs")],
        cwd=old, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    return run


def test_an_old_checkpoint_resumes_with_the_new_command(old_run):
    last = old_run / "ckpt" / "last.ckpt"
    before = torch.load(last, weights_only=True)["global_step"]
    resumed = run_command("musicvae", ["fit", "--ckpt_path", str(last), "--trainer.max_epochs", "3"], cwd=old_run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] > before
    # The new layout's config keys are not changes of the run: only what the command changed is named.
    changed = [line for line in (resumed.stdout + resumed.stderr).splitlines() if "resuming with changed settings" in line]
    assert changed and changed[0].split("changed settings: ")[1] == "trainer.max_epochs 2 -> 3", changed


def test_an_old_checkpoint_evaluates_generates_and_exports(old_run, tmp_path):
    best = str(old_run / "ckpt" / "best.ckpt")
    assert load_script("evaluate").main(["--ckpt_path", best, "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.md").is_file()
    assert load_script("generate").main(["sample", "--ckpt_path", best, "-n", "2", "--griffin_lim_iters", "2",
                                         "--out", str(tmp_path / "samples"), "--seed", "0"]) == 0
    assert len(list((tmp_path / "samples").glob("*.wav"))) == 2
    assert load_script("export").main(["--ckpt_path", best, "--out", str(tmp_path / "model.pt")]) == 0
    assert (tmp_path / "model.pt").stat().st_size > 0
