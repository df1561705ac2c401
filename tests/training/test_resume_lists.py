"""`+=` on resume: the same command again, with --ckpt_path, resumes the same run.

The stored run config is the base of a resumed command; a `+=` there appends to the list the
command itself builds, which replaces the stored list (musicvae/training/cli.py,
restart_appended_lists). Every kind of list a user appends to is covered: callbacks, loggers,
plugins, and the model's freq_bands and channels.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import tiny_fit_args
from helpers import train
from musicvae.training.checkpoints import RUN_CONFIG_KEY
from musicvae.training.resume import appended_keys


def test_appended_keys_reads_both_spellings():
    args = ["--trainer.callbacks+=a.B", "--trainer.callbacks.x", "1", "--model.channels+", "32",
            "--model.lr=1", "--trainer.callbacks+=c.D", "--data.path", "a+=b"]
    assert appended_keys(args) == ["trainer.callbacks", "model.channels"]


@pytest.mark.slow
def test_same_command_with_ckpt_path_resumes_with_every_list_unchanged(tmp_path):
    appended = [
        "--trainer.callbacks+=probes.CountingProbe", "--trainer.callbacks.label", "first",
        "--trainer.logger+=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "csv"),
        "--trainer.plugins+=lightning.fabric.plugins.environments.LightningEnvironment",
        "--model.channels+=16",  # [8, 16] -> [8, 16, 16]
        "--model.freq_bands", "[[0.0, 0.5, 1.0]]", "--model.freq_bands+=[[0.5, 1.0, 2.0]]",
    ]
    command = tiny_fit_args(tmp_path, *appended)
    first = train([*command, "--trainer.max_epochs", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "ckpt" / "last.ckpt"
    again = train([*command, "--trainer.max_epochs", "2", "--ckpt_path", str(last)])
    assert again.returncode == 0, again.stderr[-3000:]
    changed = [line for line in again.stderr.splitlines() if "resuming with changed settings" in line]
    assert changed == ["musicvae: resuming with changed settings: trainer.max_epochs 1 -> 2"], changed

    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    config = yaml.safe_load(ckpt[RUN_CONFIG_KEY])
    assert ckpt["epoch"] == 1
    assert [c["class_path"] for c in config["trainer"]["callbacks"]] == ["probes.CountingProbe"]
    assert [p["class_path"] for p in config["trainer"]["plugins"]] == [
        "lightning.fabric.plugins.environments.LightningEnvironment"]
    assert [lg["class_path"].rsplit(".", 1)[1] for lg in config["trainer"]["logger"]] == ["TensorBoardLogger", "CSVLogger"]
    assert config["model"]["init_args"]["channels"] == [8, 16, 16]
    assert config["model"]["init_args"]["freq_bands"] == [[0.0, 0.5, 1.0], [0.5, 1.0, 2.0]]
    # The stateful probe counted both epochs' batches once, and each logger kept writing its own version.
    counts = [state for key, state in ckpt["callbacks"].items() if key.startswith("CountingProbe")]
    assert len(counts) == 1 and counts[0]["batches"] == ckpt["global_step"]
    assert [p.name for p in (tmp_path / "logs" / "musicvae").iterdir()] == ["version_0"]
    assert [p.name for p in (tmp_path / "csv" / "lightning_logs").iterdir()] == ["version_0"]


@pytest.mark.slow
def test_appending_on_resume_adds_to_the_commands_own_list(tmp_path):
    """A resume that appends something new changes the list by exactly that, and says so."""
    command = tiny_fit_args(tmp_path, "--trainer.max_epochs", "1", "--trainer.callbacks+=probes.CountingProbe")
    assert train(command).returncode == 0
    more = train([*command, "--trainer.max_epochs", "2", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
                      "--trainer.callbacks+=probes.LossRecorder", "--trainer.callbacks.out", str(tmp_path / "l.json")])
    assert more.returncode == 0, more.stderr[-3000:]
    config = yaml.safe_load(torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)[RUN_CONFIG_KEY])
    assert [c["class_path"] for c in config["trainer"]["callbacks"]] == ["probes.CountingProbe", "probes.LossRecorder"]
    assert "trainer.callbacks" in more.stderr.split("resuming with changed settings:")[1].splitlines()[0]
