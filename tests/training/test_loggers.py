"""Any logger: MediaLogger's figures and audio reach TensorBoard (tests/training/test_cli.py), a CSV
logger's folder, W&B and MLflow; the end-of-run summary names each logger; a logger whose package is
missing is refused in one line (musicvae/training/logger_kinds.py).

wandb and mlflow are not installed here: Lightning's own WandbLogger and MLFlowLogger run against
fake `wandb` and `mlflow` modules put in sys.modules, which record what they are handed.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from lightning.pytorch.loggers import Logger
from matplotlib.figure import Figure

from conftest import TINY_FLAGS, tiny_fit_args
from helpers import run_command, train
from musicvae.training.resume import resume_command


class Recorder(Logger):
    """A logger of a kind musicvae sends no media to."""

    name, version = "recorder", "0"

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def fake_module(monkeypatch, name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec finds it
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, name, module)
    return module


class Handed:
    """wandb.Image / wandb.Audio, and MLflow's entities: what they were given."""

    def __init__(self, data=None, **kwargs) -> None:
        self.data, self.kwargs = data, kwargs


class FakeWandbRun:
    id, name, url = "run-1", "fake", None

    def __init__(self) -> None:
        self.logged: list[dict] = []
        self.config = SimpleNamespace(update=lambda *args, **kwargs: None)

    def log(self, metrics: dict) -> None:
        self.logged.append(metrics)

    def define_metric(self, *args, **kwargs) -> None:
        pass


class FakeMlflowClient:
    def __init__(self, tracking_uri=None) -> None:
        self.figures: list[tuple] = []
        self.artifacts: list[tuple] = []
        self.status = None
        CLIENTS.append(self)

    def get_experiment_by_name(self, name):
        return None

    def create_experiment(self, name, artifact_location=None):
        return "exp-1"

    def create_run(self, experiment_id, tags=None):
        return SimpleNamespace(info=SimpleNamespace(run_id="run-1"))

    def log_batch(self, run_id, metrics=(), params=(), **kwargs) -> None:
        pass

    def log_figure(self, run_id, figure, artifact_file) -> None:
        self.figures.append((run_id, artifact_file, isinstance(figure, Figure)))

    def log_artifact(self, run_id, local_path, artifact_path=None) -> None:
        info = sf.info(local_path)  # read now: the file is a temporary one
        self.artifacts.append((run_id, artifact_path, Path(local_path).name, info.samplerate, info.frames))

    def get_run(self, run_id):
        return True

    def set_terminated(self, run_id, status) -> None:
        self.status = status


CLIENTS: list[FakeMlflowClient] = []


@pytest.fixture
def fake_wandb_and_mlflow(monkeypatch) -> dict:
    runs: list[FakeWandbRun] = []
    init = lambda **kwargs: runs.append(FakeWandbRun()) or runs[-1]  # noqa: E731
    fake_module(monkeypatch, "wandb", init=init, run=None, Image=type("Image", (Handed,), {}),
                Audio=type("Audio", (Handed,), {}))
    fake_module(monkeypatch, "wandb.sdk")
    fake_module(monkeypatch, "wandb.sdk.lib", RunDisabled=type("RunDisabled", (), {}))
    fake_module(monkeypatch, "wandb.wandb_run", Run=FakeWandbRun)
    monkeypatch.setattr("lightning.pytorch.loggers.wandb._WANDB_AVAILABLE", True)
    CLIENTS.clear()
    context = fake_module(monkeypatch, "mlflow.tracking.context", resolve_tags=lambda tags: tags or {})
    fake_module(monkeypatch, "mlflow", set_tracking_uri=lambda uri: None)
    fake_module(monkeypatch, "mlflow.tracking", MlflowClient=FakeMlflowClient, context=context)
    fake_module(monkeypatch, "mlflow.entities", Param=Handed, Metric=Handed)
    monkeypatch.setattr("lightning.pytorch.loggers.mlflow._MLFLOW_AVAILABLE", True)
    return {"wandb_runs": runs, "mlflow_clients": CLIENTS}


@pytest.mark.slow
def test_media_go_to_every_logger_that_takes_them(tmp_path, monkeypatch, fake_wandb_and_mlflow):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # W&B's default save_dir, ".": where Lightning's log_dir is when it comes first
    loggers = ("[{class_path: WandbLogger}, "
               f"{{class_path: CSVLogger, init_args: {{save_dir: {tmp_path / 'csv'}, name: run}}}}, "
               f"{{class_path: MLFlowLogger, init_args: {{save_dir: {tmp_path / 'mlruns'}}}}}, "
               "{class_path: test_loggers.Recorder}]")
    args = ["fit", *TINY_FLAGS, "--trainer.max_epochs", "1", "--data.cache_dir", str(tmp_path / "cache"),
            "--checkpoint_dir", str(tmp_path / "ckpt"), "--trainer.logger", loggers]
    result = run_command("musicvae", args)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr

    # CSV: PNG and WAV files in the version folder; a clip reads back at the run's sample rate.
    epoch = tmp_path / "csv" / "run" / "version_0" / "media" / "val" / "epoch_000"
    for name in ("reconstructions", "band_variance_ratio", "kl_per_dim"):
        assert (epoch / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    wave, rate = sf.read(epoch / "audio" / "0_input.wav")
    assert rate == 22050 and len(wave) > 0 and np.abs(wave).max() > 0
    assert sf.info(epoch / "audio" / "0_reconstruction.wav").samplerate == 22050

    # W&B: each figure as an RGB image and each clip with its sample rate, at the validation's step.
    (run,) = fake_wandb_and_mlflow["wandb_runs"]
    media = {key: (value[0], entry["trainer/global_step"]) for entry in run.logged for key, value in entry.items()
             if isinstance(value, list)}
    image, step = media["val/reconstructions"]
    assert type(image).__name__ == "Image" and image.data.dtype == np.uint8 and image.data.shape[2] == 3
    assert step == 8  # one epoch of the tiny run: 8 training batches
    audio, _ = media["val/audio/0_input"]
    assert type(audio).__name__ == "Audio" and audio.kwargs == {"sample_rate": 22050} and audio.data.ndim == 1
    assert {"val/band_variance_ratio", "val/kl_per_dim", "val/audio/0_reconstruction"} <= set(media)

    # MLflow: figures and clips as the run's artifacts, in the same layout as the CSV folder.
    (client,) = fake_wandb_and_mlflow["mlflow_clients"]
    assert ("run-1", "media/val/epoch_000/reconstructions.png", True) in client.figures
    assert ("run-1", "media/val/epoch_000/audio", "0_input.wav", 22050, len(wave)) in client.artifacts
    assert client.status == "FINISHED"

    # The logger of another kind gets the metrics only, said once; the summary names every logger.
    assert out.count("no figures or audio for Recorder") == 1
    version = tmp_path / "csv" / "run" / "version_0"
    assert f"CSV logs: {version}/metrics.csv, figures and audio in {version}/media" in out
    assert "W&B: project lightning_logs, run run-1" in out
    assert f"MLflow: run run-1 of experiment exp-1, figures and audio as its artifacts under media/, in " \
           f"{tmp_path / 'mlruns'}  (view: mlflow ui --backend-store-uri {tmp_path / 'mlruns'})" in out
    assert "Recorder: metrics only" in out and "TensorBoard logs" not in out  # no TensorBoard in this run
    # Started as `musicvae fit`, the run says how to resume it with the same command.
    assert f"resume: musicvae fit --ckpt_path {tmp_path / 'ckpt' / 'last.ckpt'}" in out
    # The run's config.yaml goes to the first logger's folder only where it has one (TensorBoard, CSV).
    assert list((tmp_path / "cwd").iterdir()) == []


@pytest.mark.parametrize(("logger", "package"), [("WandbLogger", "wandb"), ("MLFlowLogger", "mlflow")])
def test_a_logger_without_its_package_is_refused_in_one_line(tmp_path, monkeypatch, logger, package):
    monkeypatch.setitem(sys.modules, package, None)  # not installed, even where it is
    monkeypatch.chdir(tmp_path)
    result = train(tiny_fit_args(tmp_path / "run", "--trainer.logger", logger))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("musicvae: error:")]
    assert errors == [f"musicvae: error: --trainer.logger {logger} needs the {package} package, which is not "
                      f"installed: pip install {package} (uv pip install {package} in a uv environment), or choose "
                      "TensorBoardLogger or CSVLogger"]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2  # and "Seed set to 0"
    assert list(tmp_path.iterdir()) == []  # nothing built or written


def test_the_resume_command_names_the_subcommand_musicvae_needs(tmp_path):
    last = tmp_path / "last.ckpt"
    assert resume_command(["musicvae", "fit", "--ckpt_path", "old.ckpt", "--x", "1"], last) == \
        f"musicvae fit --x 1 --ckpt_path {last}"
    # scripts/train.py takes no subcommand to mean fit; the hint says it, and works for both.
    assert resume_command(["python scripts/train.py", "--config", "a b.yaml"], last) == \
        f"python scripts/train.py fit --config 'a b.yaml' --ckpt_path {last}"
    assert resume_command([], last) == f"musicvae fit --ckpt_path {last}"


def test_prior_samples_decode_standard_draws_and_a_gaussian_fitted_to_the_codes():
    """The preview's second row comes from the epoch's codes: codes gathered around 5 give draws
    around 5, while the first row stays N(0, I) with the same seed every epoch."""
    from musicvae.training.media import MediaLogger

    seen = []

    def decode(z):
        seen.append(z.clone())
        return z[:, None, :, None].expand(-1, 1, -1, 3)  # (B, 1, dim, 3): any image-shaped output

    module = SimpleNamespace(vae=SimpleNamespace(decode=decode), device=torch.device("cpu"))
    codes = 5.0 + 0.1 * torch.randn(200, 6, generator=torch.Generator().manual_seed(1))
    logger = MediaLogger(n_samples=3)
    figure = logger._prior_samples(module, codes, "t")
    z = seen[0]
    assert z.shape == (6, 6) and len(figure.axes) >= 6
    assert torch.equal(z[:3], torch.randn(3, 6, generator=torch.Generator().manual_seed(0)))
    assert (z[3:] - 5.0).abs().max() < 1.0 and z[:3].abs().mean() < 2.0
    logger._prior_samples(module, codes, "t")
    assert torch.equal(seen[1], z)  # the same draws every epoch
