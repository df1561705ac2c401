"""Checkpoint evaluation: verdict thresholds on hand-made metrics, then evaluate end to end on the
shared tiny run, as a function and as the `scripts/evaluate.py` command (in-process)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import matplotlib.image
import pytest
import torch

from conftest import load_script, write_mel_folder
from helpers import run_command
from musicvae.evaluation import report as evaluation
from musicvae.evaluation.waveform import NOT_AUDIO
from musicvae.inference.loading import datamodule_for, load_module
from musicvae.evaluation.report import (FEATURELESS_FRAC_THRESHOLD, HF_RATIO_THRESHOLD, RANGE_OUTSIDE_THRESHOLD,
                                 evaluate_checkpoint, json_safe, upper_band_names, verdicts)

REPO = Path(__file__).resolve().parents[2]
PROBLEMS = ("output range", "high frequencies", "featureless outputs")



def run_script(*args: str) -> subprocess.CompletedProcess:
    return run_command("evaluate", args, cwd=REPO)


def metrics_128(range_frac=0.0, upper=(1.0, 1.0), lower=(1.0, 1.0, 1.0), featureless=0.0) -> dict:
    """Hand-made metrics of a 128-bin model: five bands, the last two above bin 64."""
    names = ("0-25", "26-37", "38-89", "90-101", "102-127")
    return {"n_mels": 128, "range_frac_outside": range_frac, "recon_min": -3.0, "recon_max": 3.0,
            "input_min": -4.0, "input_max": 3.5, "featureless_frac": featureless, "silent_frac": 0.0,
            **{f"band_ratio/{n}": r for n, r in zip(names, (*lower, *upper))}}


def by_problem(metrics: dict) -> dict:
    return {v.problem: v for v in verdicts(metrics)}


def test_upper_bands_are_those_starting_in_the_top_half():
    assert upper_band_names(metrics_128()) == ["90-101", "102-127"]
    assert upper_band_names({"n_mels": 32, "band_ratio/0-5": 1, "band_ratio/10-21": 1, "band_ratio/22-25": 1,
                             "band_ratio/26-31": 1}) == ["22-25", "26-31"]


def test_range_verdict_flips_at_its_threshold():
    assert by_problem(metrics_128(range_frac=RANGE_OUTSIDE_THRESHOLD))["output range"].present is False
    flagged = by_problem(metrics_128(range_frac=RANGE_OUTSIDE_THRESHOLD * 1.01))["output range"]
    assert flagged.present is True and flagged.threshold == RANGE_OUTSIDE_THRESHOLD
    assert "[-3.00, 3.00]" in flagged.detail and "[-4.00, 3.50]" in flagged.detail  # recon vs input range


def test_high_frequency_verdict_looks_at_the_upper_bands_only():
    assert by_problem(metrics_128(upper=(HF_RATIO_THRESHOLD, 1.0)))["high frequencies"].present is False
    missing = by_problem(metrics_128(upper=(1.0, HF_RATIO_THRESHOLD - 0.01)))["high frequencies"]
    assert missing.present is True and missing.value == pytest.approx(HF_RATIO_THRESHOLD - 0.01)
    # A blurred low band is not missing high-frequency content.
    assert by_problem(metrics_128(lower=(0.1, 0.1, 0.1)))["high frequencies"].present is False
    # Gained variance (noise) is not missing content either.
    assert by_problem(metrics_128(upper=(1.5, 1.3)))["high frequencies"].present is False
    assert by_problem(metrics_128(upper=(math.nan, math.nan)))["high frequencies"].present is None


def test_featureless_verdict_flags_any_featureless_output():
    assert by_problem(metrics_128(featureless=FEATURELESS_FRAC_THRESHOLD))["featureless outputs"].present is False
    assert by_problem(metrics_128(featureless=1 / 500))["featureless outputs"].present is True
    undefined = by_problem(metrics_128(featureless=math.nan))["featureless outputs"]
    assert undefined.present is None and undefined.status == "not measurable"


def test_json_safe_turns_non_finite_into_null():
    assert json_safe({"a": [1.0, math.nan], "b": math.inf, "c": "x"}) == {"a": [1.0, None], "b": None, "c": "x"}


@pytest.mark.slow
def test_evaluate_checkpoint_writes_metrics_report_and_figures(tiny_run, tmp_path):
    ckpt = tiny_run["ckpt_dir"] / "best.ckpt"
    out = tmp_path / "report"
    result = evaluate_checkpoint(ckpt, out)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["checkpoint"]["path"] == str(ckpt.resolve())
    assert isinstance(saved["checkpoint"]["epoch"], int) and isinstance(saved["checkpoint"]["global_step"], int)
    assert saved["data"]["folder"] and saved["data"]["split"].startswith("validation split")
    metrics = saved["metrics"]
    # The run's own validation split, rebuilt from the checkpoint: the same windows as in training.
    assert metrics["n_examples"] == len(tiny_run["datamodule"].val_set) > 0
    for key in ("range_frac_outside", "recon_min", "recon_max", "input_min", "input_max", "featureless_frac",
                "silent_frac", "mse", "weighted_mse", "spectral_convergence", "lsd_db", "ssim", "psnr",
                "kl_nats", "active_units", "active_frac", "upper_band_ratio_min"):
        assert key in metrics, key
    assert sum(k.startswith("band_ratio/") for k in metrics) == 5
    assert len(metrics["kl_per_dim"]) == len(metrics["mu_var"]) == 8  # TINY_FLAGS latent_dim
    assert metrics["kl_nats"] == pytest.approx(sum(metrics["kl_per_dim"]))
    assert set(saved["examples"]) == {"best", "median", "worst"}
    assert saved["examples"]["best"]["mse"] <= saved["examples"]["median"]["mse"] <= saved["examples"]["worst"]["mse"]
    assert [v["problem"] for v in saved["verdicts"]] == list(PROBLEMS)
    assert result["metrics"]["mse"] == pytest.approx(metrics["mse"])

    # Scores are of posterior-mean reconstructions: the module's own reconstruct() gives the same MSE.
    module, loaded = load_module(ckpt)
    dataset = datamodule_for(loaded).evaluation_set("val")
    x = torch.stack([dataset[i] for i in range(len(dataset))])
    assert torch.mean((module.reconstruct(x) - x) ** 2).item() == pytest.approx(metrics["mse"], rel=1e-5)

    report = (out / "report.md").read_text()
    for verdict in saved["verdicts"]:
        row = next(line for line in report.splitlines() if verdict["problem"] in line and "|" in line)
        assert verdict["status"] in ("present", "absent") and f"**{verdict['status']}**" in row
        assert verdict["rule"] in row  # the rule names the threshold used
    assert "0.1%" in report and f"under {HF_RATIO_THRESHOLD:g}" in report and "exceeds 0" in report
    assert f"{metrics['range_frac_outside']:.3%}" in report
    assert f"{metrics['featureless_frac']:.2%}" in report
    assert f"{metrics[f'band_ratio/{upper_band_names(metrics)[-1]}']:.3f}" in report
    for name in evaluation.FIGURES:
        image = matplotlib.image.imread(out / name)  # a valid PNG, not just a file
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"]({name})" in report


@pytest.mark.slow
def test_evaluate_script_on_a_folder_and_on_mismatched_data(tiny_run, tmp_path):
    ckpt = str(tiny_run["ckpt_dir"] / "best.ckpt")
    good = tmp_path / "good"
    write_mel_folder(good, n_files=4, frames=64, n_mels=32)  # the tiny run's 32 mel bins
    done = run_script("--ckpt_path", ckpt, "--data_dir", str(good), "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["data"]["folder"] == str(good.resolve()) and saved["data"]["split"] == "every recording"
    assert saved["metrics"]["n_examples"] == 4 * 2 and saved["data"]["n_files"] == 4  # 2 windows of 32 frames each
    assert saved["metrics"]["waveform"] == {"clips": 0, "not_available": NOT_AUDIO}  # arrays: no audio to compare
    assert "Not available (the data folder holds mel arrays, not audio)" in (tmp_path / "r" / "report.md").read_text()
    for problem in PROBLEMS:
        assert problem in done.stdout

    wrong = tmp_path / "wrong"
    write_mel_folder(wrong, n_mels=16)
    failed = run_script("--ckpt_path", ckpt, "--data_dir", str(wrong), "--out", str(tmp_path / "w"))
    assert failed.returncode == 2
    assert "evaluate: error:" in failed.stderr and "match the checkpoint, which expects n_mels 32" in failed.stderr
    assert "n_mels" in failed.stderr and "Traceback" not in failed.stderr
    assert not (tmp_path / "w" / "metrics.json").exists()


@pytest.mark.slow
def test_evaluate_main_reports_unusable_arrays_and_missing_checkpoints(tiny_run, tmp_path, capsys):
    main = load_script("evaluate").main
    no_sidecar = tmp_path / "no_sidecar"
    write_mel_folder(no_sidecar, n_mels=16, sidecar=False)  # no mel.json: every file fails its scan
    with pytest.warns(UserWarning, match="16 mel bins, expected 32"):
        code = main(["--ckpt_path", str(tiny_run["ckpt_dir"] / "best.ckpt"), "--data_dir", str(no_sidecar),
                     "--out", str(tmp_path / "a")])
    assert code == 2 and "evaluate: error:" in capsys.readouterr().err

    assert main(["--ckpt_path", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("musicvae evaluate: error:") and "nope.ckpt: no such checkpoint file" in err
