"""`musicvae test` and `musicvae predict` through the real command: in-process, and under DDP in a
real `python -m musicvae` (Lightning starts the second rank from the command line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, write_mel_folder
from helpers import run_command

pytestmark = pytest.mark.slow


def musicvae(*args: str, cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m musicvae ARGS` with the checkout first on the path, as an installed user runs it."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), **env}
    return subprocess.run([sys.executable, "-m", "musicvae", *args], cwd=cwd, env=environment,
                           capture_output=True, text=True, timeout=timeout)


def command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`musicvae ARGS` run in this process from `cwd`."""
    return run_command("musicvae", args, cwd=cwd)


def scalars(log_dir: Path) -> dict[str, float]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}, events.Tags()["images"]


def test_test_scores_the_validation_split_under_test(tiny_run, tmp_path):
    ckpt = tiny_run["ckpt_dir"] / "best.ckpt"
    logs = tmp_path / "logs"
    run = command("test", "--ckpt_path", str(ckpt), "--trainer.logger.init_args.save_dir", str(logs), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    found, images = scalars(next(logs.rglob("events.out.tfevents.*")).parent)
    for key in ("test/loss", "test/mse", "test/kl", "test/featureless_frac", "test/range_frac_outside",
                "test/active_units"):
        assert key in found, sorted(found)
    assert not any(key.startswith("val/") for key in found)
    assert "test/reconstructions" in images and "test/band_variance_ratio" in images
    # The same numbers as validation of the same checkpoint on the same split.
    run = command("validate", "--ckpt_path", str(ckpt), "--trainer.logger.init_args.save_dir",
                   str(tmp_path / "vlogs"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    validated, _ = scalars(next((tmp_path / "vlogs").rglob("events.out.tfevents.*")).parent)
    assert validated["val/mse"] == pytest.approx(found["test/mse"], rel=1e-5)


def test_test_on_another_folder_scores_every_recording(tiny_run, tmp_path):
    folder = tmp_path / "other"
    write_mel_folder(folder, n_files=3, frames=80, n_mels=32, seed=5)
    logs = tmp_path / "logs"
    run = command("test", "--ckpt_path", str(tiny_run["ckpt_dir"] / "best.ckpt"), "--data.data_dir", str(folder),
                   "--trainer.logger.init_args.save_dir", str(logs), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    found, _ = scalars(next(logs.rglob("events.out.tfevents.*")).parent)
    # Every recording of the folder, as `musicvae evaluate --data.data_dir` scores it (not a split).
    from musicvae.evaluation.report import evaluate_checkpoint

    every = evaluate_checkpoint(tiny_run["ckpt_dir"] / "best.ckpt", tmp_path / "report", folder)
    assert every["data"]["split"] == "every recording" and every["metrics"]["n_examples"] == 6  # 3 files x 2 windows
    assert found["test/mse"] == pytest.approx(every["metrics"]["mse"], rel=1e-4)


def _predict(tiny_run, cwd: Path, out: Path, folder: Path, *extra: str, run=command) -> subprocess.CompletedProcess:
    return run("predict", "--ckpt_path", str(tiny_run["ckpt_dir"] / "best.ckpt"), "--data.data_dir", str(folder),
                    "--predict_dir", str(out), "--trainer.logger", "false", *extra, cwd=cwd)


@pytest.fixture(scope="module")
def predicted(tiny_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    folder = tmp / "mels"
    write_mel_folder(folder, n_files=5, frames=100, n_mels=32, seed=3)
    (folder / "album").mkdir()
    np.save(folder / "album" / "deep.npy", np.load(folder / "track_00.npy")[:, :70])
    one = _predict(tiny_run, tmp, tmp / "one", folder, "--predict_reconstructions", "true")
    return {"tmp": tmp, "folder": folder, "one": one, "out": tmp / "one"}


def test_predict_writes_one_latent_file_per_recording(predicted):
    assert predicted["one"].returncode == 0, predicted["one"].stderr[-3000:]
    files = sorted(p.relative_to(predicted["out"]).as_posix() for p in predicted["out"].rglob("*.pt"))
    assert files == ["album/deep.npy.pt"] + [f"track_{i:02d}.npy.pt" for i in range(5)]
    item = torch.load(predicted["out"] / "track_01.npy.pt", weights_only=True)
    assert item["source"] == "track_01.npy" and item["n_frames"] == 100 and item["frames"] == 32
    assert item["mu"].shape == (4, 8) and item["logvar"].shape == (4, 8)  # windows at 0, 32, 64 and the tail's
    assert item["start_frames"].tolist() == [0, 32, 64, 68]  # the last window ends at the end: no frame dropped
    hop_s = item["mel"]["hop_length"] / item["mel"]["sample_rate"]
    assert item["start_seconds"].tolist() == pytest.approx([0.0, 32 * hop_s, 64 * hop_s, 68 * hop_s])
    assert item["reconstruction"].shape == (4, 32, 32)
    assert item["mel"]["n_mels"] == 32
    deep = torch.load(predicted["out"] / "album" / "deep.npy.pt", weights_only=True)
    assert deep["start_frames"].tolist() == [0, 32, 38]


def test_predicted_codes_are_the_models_encoding(predicted, tiny_run):
    from musicvae.inference.loading import load_module

    module, _ = load_module(tiny_run["ckpt_dir"] / "best.ckpt")
    item = torch.load(predicted["out"] / "track_02.npy.pt", weights_only=True)
    mel = np.load(predicted["folder"] / "track_02.npy")
    window = torch.from_numpy(mel[:, 32:64]).float()
    x = ((window - item["mean"]) / item["std"])[None, None]
    with torch.no_grad():
        mu, logvar = module.vae.encode(x)
    assert torch.allclose(item["mu"][1], mu[0], atol=1e-5)
    assert torch.allclose(item["logvar"][1], logvar[0], atol=1e-5)


def test_predict_under_two_processes_matches_one(predicted, tiny_run):
    """Each recording is encoded by exactly one rank: the files are those of a 1-process run."""
    tmp = predicted["tmp"]
    ranks = tmp / "ranks"
    two = _predict(tiny_run, tmp, tmp / "two", predicted["folder"], "--predict_reconstructions", "true",
                   "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                   "--trainer.callbacks+=probes.PredictedSources", f"--trainer.callbacks.out={ranks}",
                   "--data.num_workers", "1", run=musicvae)
    assert two.returncode == 0, two.stderr[-3000:]
    # Each recording encoded by exactly one of the two ranks, every recording by one.
    seen = [json.loads((ranks / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(p.relative_to(tmp / "one").as_posix().removesuffix(".pt")
                                               for p in (tmp / "one").rglob("*.pt"))
    one_files = sorted(p.relative_to(tmp / "one") for p in (tmp / "one").rglob("*.pt"))
    two_files = sorted(p.relative_to(tmp / "two") for p in (tmp / "two").rglob("*.pt"))
    assert one_files == two_files
    for rel in one_files:
        a = torch.load(tmp / "one" / rel, weights_only=True)
        b = torch.load(tmp / "two" / rel, weights_only=True)
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), (rel, key)
            else:
                assert a[key] == b[key], (rel, key)


@pytest.mark.parametrize("stage", ["predict", "test"])
def test_predict_and_test_need_a_checkpoint(stage, tmp_path):
    run = command(stage, "--data.synthetic_pieces", "4", "--trainer.logger", "false", cwd=tmp_path)
    assert run.returncode == 2
    assert "give --ckpt_path" in run.stderr
    assert "Traceback" not in run.stderr
