"""best/last checkpoints, resume with new hyper-parameters, bad checkpoints, and the listing script."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import global_state_kept, tiny_fit_args
from helpers import run_command, train
from musicvae.training.checkpoints import list_checkpoints, load_checkpoint
from musicvae.training.cli import cli_main
from musicvae.training.run_callbacks import checkpoint_callbacks
from musicvae.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[2]


class WorseningModule(L.LightningModule):
    """Validation loss grows every epoch, so only the first epoch is ever the best."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", float(self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=4)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=4)


def test_last_checkpoint_advances_while_validation_gets_worse(tmp_path):
    from probes import ValHistory

    history = tmp_path / "history.json"
    trainer = L.Trainer(
        max_epochs=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*checkpoint_callbacks(tmp_path / "ckpt"), ValHistory(str(history), str(tmp_path / "ckpt"))],
    )
    trainer.fit(WorseningModule())
    rows = json.loads(history.read_text())
    assert [r["last"] for r in rows] == [0, 1, 2, 3]
    assert [r["best"] for r in rows] == [0, 0, 0, 0]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best.ckpt", "last.ckpt"]  # no last-v1


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny 2-epoch run with a probe-free config, copied per test that resumes it."""
    root = tmp_path_factory.mktemp("resumable")
    with global_state_kept():
        cli_main(tiny_fit_args(root, "--model.latent_dim", "6"))
    return root


def copy_run(trained: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(trained, target)
    return target


def probe_flag(out: Path) -> list[str]:
    spec = [{"class_path": "probes.FirstStepProbe", "init_args": {"out": str(out)}}]
    return ["--trainer.callbacks", json.dumps(spec)]


@pytest.mark.slow
def test_resume_uses_new_lr_and_beta_and_keeps_adam_state(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    last = run / "ckpt" / "last.ckpt"
    before = torch.load(last, weights_only=True)
    probe = tmp_path / "probe.json"
    # A given config beats the stored run; a flag after it beats both.
    (tmp_path / "override.yaml").write_text("model:\n  beta: 0.5\n  spectral_weight: 0.3\n  lr: 0.1\n")
    with pytest.warns(UserWarning, match="model.beta.*changed on resume while best.ckpt is chosen by val/loss"):
        cli = cli_main([
            "fit", "--ckpt_path", str(last), "--checkpoint_dir", str(run / "ckpt"),
            "--config", str(tmp_path / "override.yaml"), "--model.lr", "1e-5", "--trainer.max_epochs", "3",
            *probe_flag(probe),
        ])
    seen = json.loads(probe.read_text())
    assert seen["lr"] == [1e-5]
    assert seen["beta"] == 0.5 and seen["spectral_weight"] == 0.3 and cli.model.hparams.beta == 0.5
    assert cli.model.hparams.latent_dim == 6  # not given: from the stored run
    assert seen["epoch"] == before["epoch"] + 1 and seen["global_step"] == before["global_step"]
    restored = torch.load(probe.with_suffix(".optim.pt"), weights_only=True)["state"]
    stored = before["optimizer_states"][0]["state"]
    assert restored.keys() == stored.keys()
    for key in stored:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(restored[key][name], stored[key][name]), (key, name)
    assert torch.load(last, weights_only=True)["epoch"] == 2


@pytest.mark.slow
def test_relative_checkpoint_dir_resumes_from_another_directory(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    result = train(tiny_fit_args(Path("."), "--checkpoint_dir", "ckpt")[1:], cwd=first)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt_dir = first / "ckpt"
    best_before = load_checkpoint(ckpt_dir / "best.ckpt")["musicvae_monitor"]["value"]
    history = tmp_path / "history.json"
    callbacks = [{"class_path": "probes.ValHistory", "init_args": {"out": str(history), "checkpoint_dir": str(ckpt_dir)}}]
    result = train(["--ckpt_path", str(ckpt_dir / "last.ckpt"), "--model.lr", "0.3", "--trainer.max_epochs", "3",
                    "--trainer.callbacks", json.dumps(callbacks), "--trainer.logger.init_args.save_dir", "../first/logs"],
                   cwd=second)
    assert result.returncode == 0, result.stderr[-3000:]
    # Checkpoints beside the resumed file, not relative to the new cwd; the log folder the command names
    # is the stored one, so the TensorBoard curves continue in its version.
    assert not (second / "ckpt").exists() and not (second / "logs").exists()
    assert [p.name for p in (first / "logs" / "musicvae").iterdir()] == ["version_0"]
    assert len(list((first / "logs" / "musicvae" / "version_0").glob("events.out.tfevents.*"))) == 2
    rows = json.loads(history.read_text())
    assert [r["epoch"] for r in rows] == [2] and rows[0]["last"] == 2
    assert rows[0]["val"] > best_before, "test premise: the resumed epoch is worse"
    best_after = load_checkpoint(ckpt_dir / "best.ckpt")
    assert best_after["epoch"] <= 1 and best_after["musicvae_monitor"]["value"] == best_before


@pytest.mark.slow
def test_moved_run_folder_keeps_the_best_score(trained, tmp_path):
    run = copy_run(trained, tmp_path)  # the checkpoint's stored dirpath is the original folder
    ckpt_dir = run / "ckpt"
    best_before = torch.load(ckpt_dir / "best.ckpt", weights_only=True)["musicvae_monitor"]["value"]
    history = tmp_path / "history.json"
    callbacks = [{"class_path": "probes.ValHistory", "init_args": {"out": str(history), "checkpoint_dir": str(ckpt_dir)}}]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # A learning rate this large makes the resumed epochs worse than the stored best.
    result = train(["--ckpt_path", str(ckpt_dir / "last.ckpt"), "--checkpoint_dir", str(ckpt_dir),
                    "--model.lr", "0.3", "--trainer.max_epochs", "4", "--trainer.callbacks", json.dumps(callbacks)],
                   cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(history.read_text())
    assert [r["epoch"] for r in rows] == [2, 3]  # continues at the checkpoint's epoch + 1
    assert [r["last"] for r in rows] == [2, 3]
    assert all(r["val"] > best_before for r in rows), "test premise: the resumed epochs are worse"
    best_after = torch.load(ckpt_dir / "best.ckpt", weights_only=True)
    assert best_after["epoch"] <= 1 and best_after["musicvae_monitor"]["value"] == best_before
    assert "model.lr 0.001 -> 0.3" in result.stderr + result.stdout


@pytest.mark.slow
def test_ckpt_path_alone_recovers_the_whole_run(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    # max_epochs equal to the checkpoint's: the run is restored and stops at once.
    cli = cli_main(["fit", "--ckpt_path", str(run / "ckpt" / "last.ckpt"), "--checkpoint_dir", str(run / "ckpt"),
                    "--trainer.max_epochs", "2"])
    assert cli.model.hparams.latent_dim == 6 and cli.model.hparams.channels == [8, 16]
    assert cli.datamodule.frames == 32 and cli.datamodule.n_mels == 32 and cli.datamodule.val_split == 0.2
    # A place to write: the documented default, not the stored folder (docs/reliability.md, security).
    assert cli.datamodule.cache_dir != (trained / "cache").resolve()
    assert cli.trainer.log_every_n_steps == 1
    # Nothing explicit: the stored checkpoint_dir is absolute, so it points at the original run.
    stored = load_checkpoint(run / "ckpt" / "last.ckpt")["musicvae_run_config"]
    assert f"checkpoint_dir: {trained.resolve() / 'ckpt'}" in stored
    config_beside = (run / "ckpt" / "config.yaml").read_text()
    assert "latent_dim: 6" in config_beside


@pytest.mark.parametrize(
    "flag, value, field",
    [("--model.latent_dim", "12", "model.latent_dim"), ("--model.channels", "[8, 8]", "model.channels"),
     ("--data.mel.n_mels", "16", "model.n_mels"), ("--data.mel.hop_length", "128", "data.mel.hop_length")],
)
@pytest.mark.slow
def test_unresumable_change_fails_before_training(trained, tmp_path, flag, value, field):
    run = copy_run(trained, tmp_path)
    mtime = (run / "ckpt" / "last.ckpt").stat().st_mtime
    with pytest.raises(CheckpointError, match=f"cannot resume.*{field}"):
        cli_main(["fit", "--ckpt_path", str(run / "ckpt" / "last.ckpt"), "--checkpoint_dir", str(run / "ckpt"),
                  flag, value, "--trainer.max_epochs", "5"])
    assert (run / "ckpt" / "last.ckpt").stat().st_mtime == mtime


def test_bad_checkpoint_files_get_a_message(tmp_path):
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "text.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"hidden": 3}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="another model"):
        load_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.slow
def test_truncated_and_hostile_checkpoints_are_refused(tiny_run, tmp_path):
    data = (tiny_run["ckpt_dir"] / "last.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        load_checkpoint(tmp_path / "truncated.ckpt")

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {}, "x": Payload()}, tmp_path / "hostile.ckpt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "hostile.ckpt")
    with pytest.raises(CheckpointError, match="refused"):
        cli_main(["fit", "--ckpt_path", str(tmp_path / "hostile.ckpt")])
    assert not marker.exists()


@pytest.mark.slow
def test_fresh_run_refuses_a_used_checkpoint_dir(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    args = tiny_fit_args(run, "--trainer.max_epochs", "1")
    with pytest.raises(ConfigError, match="already holds best.ckpt, last.ckpt.*--ckpt_path.*--overwrite true"):
        cli_main(args)
    cli_main([*args, "--overwrite", "true"])
    assert torch.load(run / "ckpt" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert not list((run / "ckpt").glob("*-v1.ckpt"))


@pytest.mark.slow
def test_monitor_is_configurable_and_checked(tmp_path):
    cli = cli_main(tiny_fit_args(tmp_path, "--monitor", "val/mse", "--trainer.max_epochs", "1"))
    assert cli.trainer.checkpoint_callbacks[0].monitor == "val/mse"
    assert load_checkpoint(tmp_path / "ckpt" / "best.ckpt")["musicvae_monitor"]["name"] == "val/mse"
    with pytest.raises(ConfigError, match="not a logged validation metric"):
        cli_main(tiny_fit_args(tmp_path / "b", "--monitor", "val/mes"))


@pytest.mark.slow
def test_checkpoint_listing_script(tiny_run):
    table = run_command("checkpoints", [str(tiny_run["ckpt_dir"])])
    assert table.returncode == 0, table.stderr
    assert "best.ckpt" in table.stdout and "last.ckpt" in table.stdout and "val/loss" in table.stdout
    listed = run_command("checkpoints", [str(tiny_run["ckpt_dir"]), "--json"])
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    by_name = {row["file"]: row for row in rows}
    assert by_name["last.ckpt"]["last"] and by_name["best.ckpt"]["best"]
    assert by_name["last.ckpt"]["epoch"] == 1 and by_name["last.ckpt"]["global_step"] > 0
    assert rows == list_checkpoints(tiny_run["ckpt_dir"])


@pytest.mark.slow
def test_cli_resumes_a_checkpoint_written_by_the_python_api(mel_folder, tmp_path):
    from musicvae import MelDataModule, MusicVAEModule

    dm = MelDataModule(data_dir=str(mel_folder), frames=16, batch_size=4, val_split=0.3)
    model = MusicVAEModule(n_mels=16, frames=16, latent_dim=4, channels=[8, 16], lr=1e-3)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "api.ckpt")
    cli = cli_main(["fit", "--ckpt_path", str(tmp_path / "api.ckpt"), "--data.data_dir", str(mel_folder),
                    "--data.batch_size", "4", "--checkpoint_dir", str(tmp_path / "ckpt"), "--trainer.max_epochs", "2",
                    "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    assert cli.model.hparams.latent_dim == 4 and cli.model.hparams.lr == 1e-3 and cli.datamodule.frames == 16
    assert load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["epoch"] == 1


def test_ckpt_path_in_a_config_file_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text(f"ckpt_path: {tmp_path / 'x.ckpt'}\n")
    with pytest.raises(ConfigError, match="give it on the command line"):
        cli_main(["fit", "--config", str(tmp_path / "c.yaml")])
