"""Checkpoints written by earlier versions still resume, evaluate, generate and export.

Each fixture checks out an earlier commit (`git archive`, from this clone's own history) and trains a
tiny run with it in a process of its own (that version's `musicvae` package), so the checkpoint is
exactly what that version wrote. Today's commands then run in-process. Two layouts are covered:
- the flat package layout (`musicvae/*.py`), the first published one;
- the flat model settings (`--model.adversarial true`, `--model.kl_warmup_steps`, the media options under
  `model`), the last layout before the settings table of musicvae/training/hparams.py, including a
  checkpoint of the adversarial stage, which today is SharpenModule.
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
#: The last commit with flat model settings (`adversarial`, `kl_warmup_steps`, `media_*` in `model`).
FLAT_SETTINGS = "9b94b92546df1d4ebe85326f20dec532844a4ba8"
#: The adversarial stage on the tiny model, in that version's flags (configs/sharp.yaml of that commit).
OLD_STAGE_FLAGS = ["--model.disc_channels", "[8, 16]", "--model.adv_start_step", "2", "--trainer.max_epochs", "1",
                   "--trainer.max_steps", "-1", "--monitor", "val/realism_differences"]


def checkout(commit: str, tmp: Path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot check out an earlier version")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, "musicvae", "scripts",
                              "configs"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {commit[:7]} is not in this clone's history (a shallow clone?)")
    old = tmp / "old"
    old.mkdir()
    (tmp / "old.tar").write_bytes(archive.stdout)
    with tarfile.open(tmp / "old.tar") as tar:
        tar.extractall(old, filter="data")
    return old


def train_old(old: Path, run: Path, cache: Path, *extra: str, config: tuple[str, ...] = ()) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    trained = subprocess.run(
        [sys.executable, str(old / "scripts" / "train.py"), "fit", *config, *TINY_FLAGS, *extra, "--data.cache_dir",
         str(cache), "--checkpoint_dir", str(run / "ckpt"), "--trainer.logger.init_args.save_dir", str(run / "logs")],
        cwd=old, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]


@pytest.fixture(scope="module", params=[FLAT_LAYOUT, FLAT_SETTINGS], ids=["flat-layout", "flat-settings"])
def old_run(request, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("old")
    old = checkout(request.param, tmp)
    train_old(old, tmp / "run", tmp / "cache")
    return tmp / "run"


@pytest.fixture(scope="module")
def old_stage(tmp_path_factory) -> Path:
    """The adversarial stage as the flat-settings version ran it: `--model.adversarial true` (its sharp.yaml)."""
    tmp = tmp_path_factory.mktemp("old_stage")
    old = checkout(FLAT_SETTINGS, tmp)
    train_old(old, tmp / "vae", tmp / "cache")
    train_old(old, tmp / "stage", tmp / "cache", *OLD_STAGE_FLAGS, "--model.init_from",
              str(tmp / "vae" / "ckpt" / "best.ckpt"), config=("--config", str(old / "configs" / "sharp.yaml")))
    return tmp / "stage"


def test_an_old_checkpoint_resumes_with_the_new_command(old_run):
    last = old_run / "ckpt" / "last.ckpt"
    before = torch.load(last, weights_only=True)["global_step"]
    resumed = run_command("musicvae", ["fit", "--ckpt_path", str(last), "--trainer.max_epochs", "3"], cwd=old_run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] > before
    # The new layout's config keys are not changes of the run: only what the command changed is named.
    changed = [line for line in (resumed.stdout + resumed.stderr).splitlines() if "resuming with changed settings" in line]
    assert changed and changed[0].split("changed settings: ")[1] == "trainer.max_epochs 2 -> 3", changed
    hparams = torch.load(last, weights_only=True)["hyper_parameters"]
    assert "adversarial" not in hparams and "audio_every_n_epochs" not in hparams  # written in today's layout


def test_an_old_checkpoint_evaluates_generates_and_exports(old_run, tmp_path):
    best = str(old_run / "ckpt" / "best.ckpt")
    assert load_script("evaluate").main(["--ckpt_path", best, "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.md").is_file()
    assert load_script("generate").main(["sample", "--ckpt_path", best, "-n", "2", "--griffin_lim_iters", "2",
                                         "--out", str(tmp_path / "samples"), "--seed", "0"]) == 0
    assert len(list((tmp_path / "samples").glob("*.wav"))) == 2
    assert load_script("export").main(["--ckpt_path", best, "--out", str(tmp_path / "model.pt")]) == 0
    assert (tmp_path / "model.pt").stat().st_size > 0


def test_an_old_adversarial_checkpoint_resumes_as_sharpen_module_and_is_used_by_every_command(old_stage, tmp_path):
    from musicvae.inference.loading import load_module
    from musicvae.training.sharpen import SharpenModule

    last = old_stage / "ckpt" / "last.ckpt"
    stored = torch.load(last, weights_only=True)
    assert stored["hyper_parameters"]["adversarial"] is True  # what that version wrote
    module, _ = load_module(last)
    assert isinstance(module, SharpenModule) and module.hparams.disc_channels == [8, 16]
    resumed = run_command("musicvae", ["fit", "--ckpt_path", str(last), "--trainer.max_epochs", "2"], cwd=old_stage)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = torch.load(last, weights_only=True)
    assert after["global_step"] > stored["global_step"]
    assert after["hyper_parameters"]["_class_path"].endswith("SharpenModule")
    best = str(old_stage / "ckpt" / "best.ckpt")
    assert load_script("evaluate").main(["--ckpt_path", best, "--out", str(tmp_path / "report")]) == 0
    assert load_script("generate").main(["sample", "--ckpt_path", best, "-n", "1", "--griffin_lim_iters", "2",
                                         "--out", str(tmp_path / "samples"), "--seed", "0"]) == 0
    assert load_script("export").main(["--ckpt_path", best, "--out", str(tmp_path / "model.pt")]) == 0
