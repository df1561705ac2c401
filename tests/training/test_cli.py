"""The training command line end to end: cli_main, and the command as scripts/train.py runs it
(exit status and output), both in-process. Two-process training: tests/training/test_ddp.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import train
from conftest import tiny_fit_args
from musicvae.training.cli import cli_main

REPO = Path(__file__).resolve().parents[2]
LOSS_PARTS = ("loss", "recon", "kl", "kl_nats", "spectral", "output_reg", "mse")


@pytest.mark.slow
def test_fit_writes_checkpoints_that_load_weights_only(tiny_run):
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = torch.load(tiny_run["ckpt_dir"] / name, map_location="cpu", weights_only=True)
        assert ckpt["epoch"] == 1 or name == "best.ckpt"
        data_state = ckpt["MelDataModule"]
        assert data_state["mel"]["n_mels"] == 32
        assert data_state["std"] > 0 and data_state["split_mode"] in ("file", "segment")
        assert ckpt["hyper_parameters"]["n_mels"] == 32 and ckpt["hyper_parameters"]["frames"] == 32
        assert "freq_weight" in ckpt["state_dict"]


@pytest.mark.slow
def test_tensorboard_holds_every_loss_part_and_the_figure(tiny_run):
    events = EventAccumulator(str(tiny_run["log_dir"]), size_guidance={"images": 0, "scalars": 0, "audio": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for part in LOSS_PARTS:
        assert f"val/{part}" in scalars
        assert f"train/{part}_step" in scalars and f"train/{part}_epoch" in scalars
    diagnostics = ("range_frac_outside", "recon_min", "recon_max", "input_min", "input_max", "featureless_frac",
                   "weighted_mse", "spectral_convergence", "lsd_db", "ssim", "psnr", "active_units", "active_frac")
    for name in diagnostics:
        assert f"val/{name}" in scalars, name
    assert sum(tag.startswith("val/band_ratio/") for tag in scalars) == 5  # the 5 segments of the weight table
    images = events.Tags()["images"]
    assert {"val/reconstructions", "val/band_variance_ratio", "val/kl_per_dim", "val/prior_samples"} <= set(images)
    # Audio every 5 validation epochs from the first: epoch 0 of this 2-epoch run.
    audio = events.Tags()["audio"]
    assert {"val/audio/0_input", "val/audio/0_reconstruction", "val/audio/1_input"} <= set(audio)
    clip = events.Audio("val/audio/0_reconstruction")
    assert len(clip) == 1 and clip[0].sample_rate == 22050 and clip[0].step == events.Images("val/reconstructions")[0].step
    assert len(events.Images("val/reconstructions")) == 2  # one per epoch, none for the sanity check
    losses = [e.value for e in events.Scalars("train/loss_epoch")]
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow
def test_standard_loss_trains_through_the_cli(tmp_path):
    cli = cli_main(tiny_fit_args(tmp_path, "--model.loss", "standard", "--trainer.max_epochs", "1"))
    logged = cli.trainer.logged_metrics
    assert {"val/loss", "val/recon", "val/kl", "val/kl_nats"} <= set(logged)
    assert "val/spectral" not in logged
    assert cli.model.hparams.loss == "standard"


def test_print_config_is_complete_and_reloadable(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(REPO / "configs" / "improved.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert {"trainer", "model", "data", "checkpoint_dir", "seed_everything"} <= set(config)
    assert config["data"]["mel"] is None or config["data"]["mel"]["n_mels"] == 128
    # The printed config is itself a valid config.
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(tmp_path / "full.yaml"), "--print_config"])


@pytest.mark.parametrize("name", ["quickstart", "standard", "improved", "recommended"])
def test_every_config_parses(name, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(REPO / "configs" / f"{name}.yaml"), "--print_config"])
    assert "model:" in capsys.readouterr().out


def test_recipes_match_the_notebook(capsys):
    def printed(name: str) -> dict:
        with pytest.raises(SystemExit):
            cli_main(["--config", str(REPO / "configs" / f"{name}.yaml"), "--print_config"])
        config = yaml.safe_load(capsys.readouterr().out)
        assert config["model"]["class_path"] == "musicvae.MusicVAEModule"
        config["model"] = config["model"]["init_args"]
        return config

    standard, improved = printed("standard"), printed("improved")
    assert standard["model"]["loss"] == "standard"
    assert (standard["model"]["lr"], standard["model"]["beta"]) == (1e-4, 0.1)
    m, t = improved["model"], improved["trainer"]
    assert (m["loss"], m["lr"], m["beta"], m["output_reg_weight"], m["spectral_weight"]) == (
        "spectral", 5e-5, 0.05, 0.01, 0.1,
    )
    assert (t["max_epochs"], t["gradient_clip_val"]) == (100, 1.0)
    assert improved["data"]["val_split"] == 0.1
    assert improved["seed_everything"] == 123
    assert improved["checkpoint_dir"] == "checkpoints/music_vae_improved"


def test_seed_everything_seeds_the_split():
    cli = cli_main(["--config", str(REPO / "configs" / "improved.yaml")], run=False)
    assert cli.datamodule.seed == 123
    cli = cli_main(["--config", str(REPO / "configs" / "improved.yaml"), "--seed_everything", "7"], run=False)
    assert cli.datamodule.seed == 7
    assert cli.model.hparams.n_mels == cli.datamodule.n_mels == 128  # shapes linked from the data


def test_script_reports_bad_data_dir_without_a_traceback(tmp_path):
    result = train(["--data.data_dir", str(tmp_path / "missing"), "--trainer.max_epochs", "1"], cwd=tmp_path)
    assert result.returncode == 2
    assert "musicvae: error:" in result.stderr and "missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_script_rejects_a_mistyped_flag(tmp_path):
    result = train(["--trainer.max_epoch", "1"], cwd=tmp_path)
    assert result.returncode != 0
    assert "max_epoch" in result.stderr
    assert not (tmp_path / "ckpt").exists()


def test_script_help_lists_the_groups():
    result = train(["--help"])
    assert result.returncode == 0
    for flag in ("--model.help", "--media.audio_every_n_epochs", "--data.data_dir", "--trainer.max_epochs",
                 "--checkpoint_dir", "--ckpt_path"):
        assert flag in result.stdout
    for model in ("MusicVAEModule", "SharpenModule"):  # each model class's settings, by name
        result = train(["--model.help", model])
        assert result.returncode == 0 and "--model.beta" in result.stdout
        assert ("--model.adv_weight" in result.stdout) == (model == "SharpenModule")


@pytest.mark.slow
def test_script_trains_from_another_directory(tmp_path):
    # Relative paths in flags resolve against the caller's directory, not the repository.
    result = train(tiny_fit_args(Path("run"), "--trainer.max_epochs", "1")[1:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "ckpt" / "last.ckpt").is_file()
    assert "last.ckpt" in result.stdout + result.stderr


@pytest.mark.slow
def test_bf16_mixed_precision_trains(tmp_path):
    cli = cli_main(tiny_fit_args(tmp_path, "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1"))
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
