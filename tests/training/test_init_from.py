"""--model.init_from: a new run from a trained model's weights, through scripts/train.py's command line.

What it must do: the weights at the first step are the checkpoint's, the optimizer and step count are
fresh, the checkpoint's mel settings and normalisation are used unless told otherwise (and the run
says which), and weights that do not fit are named. The hostile-file refusals are in
test_hostile_checkpoints.py (the sixth loader).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_FLAGS, tiny_fit_args
from helpers import step_of, weights
from musicvae.errors import CheckpointError
from musicvae.training.cli import cli_main

#: The tiny flags without --data.mel.n_mels: the mel settings are the checkpoint's to give.
NO_MEL = [a for i, a in enumerate(TINY_FLAGS) if a != "--data.mel.n_mels" and TINY_FLAGS[i - 1] != "--data.mel.n_mels"]


def started(root: Path, init: Path, *extra: str, flags: list[str] = TINY_FLAGS) -> tuple[dict, str]:
    """Train one epoch from `init`; returns what the module and data looked like when training started."""
    probe = [{"class_path": "probes.WeightsAtStart", "init_args": {"out": str(root / "start.pt")}}]
    args = ["fit", *flags, "--data.cache_dir", str(root / "cache"), "--checkpoint_dir", str(root / "ckpt"),
            "--trainer.logger.init_args.save_dir", str(root / "logs"), "--trainer.max_epochs", "1",
            "--model.init_from", str(init), "--trainer.callbacks", json.dumps(probe), *extra]
    cli_main(args)
    return torch.load(root / "start.pt", weights_only=True), args


@pytest.mark.slow
def test_a_new_run_starts_from_the_weights_with_a_fresh_optimizer(tiny_run, tmp_path, caplog):
    init = tiny_run["ckpt_dir"] / "best.ckpt"
    caplog.set_level("INFO")
    start, _ = started(tmp_path, init, "--model.lr", "1e-4")
    stored = weights(init)
    assert all(torch.equal(start["state_dict"][k], v) for k, v in stored.items() if k != "freq_weight")
    assert start["global_step"] == 0 and start["optimizer_state_sizes"] == [0]
    assert step_of(tmp_path / "ckpt" / "last.ckpt") == 8  # one epoch counted from 0, not from the checkpoint's 16
    out = caplog.text
    assert f"starting from the weights of {init}" in out and "a new optimizer, step count 0" in out


@pytest.mark.slow
def test_the_checkpoints_mel_settings_and_normalisation_are_kept_unless_told(tiny_run, tmp_path, caplog):
    init = tiny_run["ckpt_dir"] / "best.ckpt"
    state = torch.load(init, weights_only=True)["MelDataModule"]
    # Other music (another synthetic seed), no --data.mel: the checkpoint's 32 bins and statistics.
    other = ["--data.synthetic_pieces", "6", "--seed_everything", "7"]
    caplog.set_level("INFO")
    start, _ = started(tmp_path / "kept", init, *other, flags=NO_MEL)
    assert start["n_mels"] == 32 and (start["mean"], start["std"]) == (state["mean"], state["std"])
    err = caplog.text
    caplog.clear()
    assert "mel settings: the checkpoint's" in err and "normalisation: the checkpoint's" in err
    fresh, _ = started(tmp_path / "fresh", init, *other, "--init_normalization", "data", flags=NO_MEL)
    assert (fresh["mean"], fresh["std"]) != (state["mean"], state["std"])
    assert "computed from this run's training data" in caplog.text


def test_weights_that_do_not_fit_are_named(tiny_run, tmp_path):
    init = tiny_run["ckpt_dir"] / "best.ckpt"
    with pytest.raises(CheckpointError, match=r"init_from.*vae\.to_latent\.weight \(checkpoint 16x\d+, model 32x\d+\)"
                       r".*latent_dim 8.*latent_dim 16"):
        cli_main(tiny_fit_args(tmp_path, "--model.latent_dim", "16", "--model.init_from", str(init)))
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "cache").exists()  # refused before any work


def test_a_missing_init_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        cli_main(tiny_fit_args(tmp_path, "--model.init_from", str(tmp_path / "missing.ckpt")))
