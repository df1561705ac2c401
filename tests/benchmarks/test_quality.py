"""The quality benchmark: LinearCode at the VAE's code size, and scripts/benchmark_quality.py end to end."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_command
from musicvae.losses import DEFAULT_BANDS
from musicvae.benchmarks.quality import (PathShares, fit_pca, goal_rows, linear_references, markdown_table,
                              prior_diagnostics, reference_statistics)

REPO = Path(__file__).resolve().parents[2]


def low_rank(n: int, d: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d, generator=g, dtype=torch.float64) + 3.0


def decaying(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Rows with a decaying spectrum (singular values 1/i), like mels: a few directions dominate."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, min(n, d), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, min(n, d), generator=g, dtype=torch.float64))
    s = 50.0 / torch.arange(1, min(n, d) + 1, dtype=torch.float64)
    return (u * s) @ v.T


def full_svd_explained(data: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(data - data.mean(dim=0))
    return float(s[:k].pow(2).sum() / s.pow(2).sum())


@pytest.mark.parametrize("shape", [(40, 100), (100, 30)])  # the Gram and the covariance branch
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_pca_reconstructs_rank_k_data_exactly(shape, method):
    data = low_rank(*shape, rank=5)
    pca = fit_pca(data.float(), k=5, method=method)
    assert pca.n_components == 5
    assert torch.allclose(pca.reconstruct(data.float()), data.float(), atol=1e-3, rtol=1e-4)
    assert pca.explained_variance_ratio == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("shape", [(60, 200), (200, 50)])
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_pca_explained_variance_matches_full_svd(shape, method):
    data = decaying(*shape)
    k = 8
    pca = fit_pca(data.float(), k=k, method=method)
    assert pca.explained_variance_ratio == pytest.approx(full_svd_explained(data, k), rel=1e-4)
    # The same subspace as the top-k right singular vectors: projections agree.
    _, _, vh = torch.linalg.svd(data - data.mean(dim=0), full_matrices=False)
    top = vh[:k].float()
    assert torch.allclose(pca.components @ pca.components.T, torch.eye(k), atol=1e-4)
    assert torch.allclose((pca.components.T @ pca.components), top.T @ top, atol=1e-3)


def test_pca_component_count_is_k_and_bad_k_is_refused():
    data = decaying(30, 64)
    assert fit_pca(data.float(), 12).components.shape == (12, 64)
    with pytest.raises(ValueError, match="components"):
        fit_pca(data.float(), 31)


def test_prior_diagnostics_flag_flat_and_out_of_range_samples():
    g = torch.Generator().manual_seed(0)
    test = torch.randn(16, 1, 32, 32, generator=g)
    reference = reference_statistics(list(test), 32, DEFAULT_BANDS)
    good = prior_diagnostics(torch.randn(16, 1, 32, 32, generator=g), reference, 32, DEFAULT_BANDS)
    assert good["featureless_frac"] == 0 and good["range_frac_outside"] == 0
    assert all(0.8 < v < 1.2 for k, v in good.items() if k.startswith("band_ratio/"))
    flat = prior_diagnostics(torch.full((4, 1, 32, 32), 20.0), reference, 32, DEFAULT_BANDS)
    assert flat["featureless_frac"] == 1 and flat["range_frac_outside"] == 1


def test_goal_rows_report_gaps():
    base = {"mse": 0.5, "weighted_mse": 0.5, "spectral_convergence": 0.3, "ssim": 0.6, "featureless_frac": 0.0,
            "range_frac_outside": 0.0, "band_ratio/0-9": 0.5}
    vae = {**base, "active_units": 2, "kl_nats": 10.0}
    pca = {**base, "mse": 1.0}
    prior = {"featureless_frac": 0.25, "range_frac_outside": 0.0, "band_ratio/0-9": 1.0}
    rows = {r["metric"]: r for r in goal_rows(vae, pca, prior, latent_dim=8)}
    assert rows["MSE ratio VAE / PCA"]["met"] and rows["MSE"]["met"]
    assert rows["variance ratio bins 0-9"]["gap"] == pytest.approx(0.4)
    assert rows["active units"]["gap"] == 2 and not rows["active units"]["met"]
    assert rows["prior: featureless fraction"]["gap"] == 0.25
    assert "| active units | 2 | — | >= 4 of 8 | 2 |" in markdown_table(list(rows.values()))


def write_wavs(folder: Path, seed: int, base_hz: float, n_files: int = 5, seconds: float = 3.0, sr: int = 22050):
    import soundfile as sf

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    for i in range(n_files):
        f0 = base_hz * (1 + 0.1 * i)
        wave = sum(np.sin(2 * np.pi * f0 * h * t * (1 + 0.02 * np.sin(2 * np.pi * 0.5 * t))) / h for h in range(1, 5))
        wave = wave * (0.5 + 0.5 * np.sin(2 * np.pi * (1 + i) * t) ** 2) + 0.02 * rng.standard_normal(t.size)
        sf.write(folder / f"piece_{i}.wav", (0.2 * wave).astype(np.float32), sr)


TINY_CONFIG = """\
seed_everything: 0
model:
  channels: [8, 16]
  latent_dim: 8
  lr: 1.0e-3
data:
  frames: 32
  batch_size: 8
  val_split: 0.2
  mel:
    n_mels: 32
trainer:
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
"""


def run_script(*args: str) -> subprocess.CompletedProcess:
    """`python scripts/benchmark_quality.py ARGS`, in this process."""
    return run_command("benchmark-quality", args, cwd=REPO)


def test_detail_strengths_are_checked():
    from musicvae.benchmarks.detail_plane import parse_strengths

    assert parse_strengths("1,0, 0.5") == (0.0, 0.5, 1.0)
    for bad in ("", "2", "0,x", "-0.1"):
        with pytest.raises(ValueError, match="--detail_strengths"):
            parse_strengths(bad)


def test_bad_folders_are_refused_in_one_line(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    result = run_script("--train_dir", str(tmp_path / "a"), "--test_dir", str(tmp_path / "a" / "b"),
                        "--config", str(REPO / "configs" / "improved.yaml"), "--steps", "1", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "overlap" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run_script("--test_dir", str(tmp_path / "missing"), "--ckpt_path", str(tmp_path / "x.ckpt"),
                        "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "no such folder" in result.stderr
    result = run_script("--test_dir", str(tmp_path / "a"), "--ckpt_path", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "no such checkpoint" in result.stderr
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    result = run_script("--test_dir", str(tmp_path / "a"), "--ckpt_path", str(tmp_path / "junk.ckpt"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "not a readable checkpoint" in result.stderr
    (tmp_path / "c").mkdir()
    result = run_script("--train_dir", str(tmp_path / "a" / "b"), "--test_dir", str(tmp_path / "c"), "--config",
                        str(REPO / "configs" / "improved.yaml"), "--steps", "1", "--out", str(tmp_path / "o"),
                        "--", "--data.data_dir", str(tmp_path / "c"))
    assert result.returncode == 2 and "--data.data_dir: set by benchmark_quality" in result.stderr


def _all_finite(section: dict) -> bool:
    return all(math.isfinite(v) for v in section.values() if isinstance(v, (int, float)) and not isinstance(v, bool))


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["best", "last"])
def test_the_benchmark_scores_the_checkpoint_it_is_asked_for(choice, tmp_path, monkeypatch):
    import argparse

    import musicvae.training.cli
    from conftest import load_script

    def fake_training(cli_args):  # writes what a run writes: both checkpoints
        folder = Path(cli_args[cli_args.index("--checkpoint_dir") + 1])
        folder.mkdir(parents=True)
        (folder / "best.ckpt").write_text("best")
        (folder / "last.ckpt").write_text("last")

    monkeypatch.setattr(musicvae.training.cli, "cli_main", fake_training)
    args = argparse.Namespace(config="c.yaml", train_dir="t", out=str(tmp_path), minutes=None, steps=5, cache_dir=None,
                              checkpoint=choice)
    assert load_script("benchmark_quality").train(args, []) == tmp_path / "ckpt" / f"{choice}.ckpt"


@pytest.mark.slow
def test_benchmark_end_to_end(tmp_path):
    write_wavs(tmp_path / "train", seed=0, base_hz=220.0)
    write_wavs(tmp_path / "test", seed=1, base_hz=330.0, n_files=2)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    out = tmp_path / "bench"
    result = run_script("--train_dir", str(tmp_path / "train"), "--test_dir", str(tmp_path / "test"),
                        "--config", str(config), "--steps", "10", "--out", str(out), "--checkpoint", "last",
                        "--cache_dir", str(tmp_path / "cache"), "--prior_samples", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert (out / "results.md").is_file() and "| metric | VAE | PCA | goal | gap |" in result.stdout
    assert data["pca"]["n_components"] == data["checkpoint"]["latent_dim"] == 8
    assert data["checkpoint"]["global_step"] == 10 and data["checkpoint"]["path"].endswith("last.ckpt")
    for section in ("vae", "pca_scores", "prior"):
        assert _all_finite(data[section]) and data[section]
    for key in ("mse", "weighted_mse", "spectral_convergence", "ssim", "featureless_frac", "range_frac_outside"):
        assert math.isfinite(data["vae"][key]) and math.isfinite(data["pca_scores"][key])
    assert {"kl_nats", "active_units"} <= set(data["vae"])
    assert math.isfinite(data["mse_ratio"]) and 0 < data["pca"]["explained_variance_ratio"] <= 1
    assert any(r["metric"] == "MSE ratio VAE / PCA" for r in data["goals"])
    # Variance compensation: the VAE's curve came from training's validation, PCA's was fitted on the same
    # recordings; the plane's alpha-0 row is the plain decoder's MSE (two computations agree), and every
    # strength of the curve is scored with a realism distance above zero.
    assert data["compensation"]["vae"]["source"].startswith("the checkpoint")
    assert len(data["compensation"]["pca"]["gain"]) == 32 and 0 <= data["compensation"]["pca"]["alpha"] <= 1
    for scores in (data["vae"], data["pca_scores"]):
        rows = {r["alpha"]: r for r in scores["plane"]["rows"]}
        assert rows[0.0]["mse"] == pytest.approx(scores["mse"], rel=1e-6)
        assert rows[1.0]["mse"] >= rows[0.0]["bound_mse"] and all(r["realism"]["frames"] > 0 for r in rows.values())
        sharp = scores["perceptual"]
        assert sharp["mse"] == pytest.approx(min(rows.values(), key=lambda r: abs(r["alpha"] - sharp["alpha"]))["mse"],
                                             rel=1e-5)
    assert data["vae"]["plane"]["floor"]["frames"] > 0 and data["prior_perceptual"]["realism"]["frames"] > 0
    assert data["vae"]["plane"]["oracle"]["mse"] >= data["vae"]["mse"]
    assert any(r["metric"].startswith("perceptual point: MSE") for r in data["goals"])
    assert (out / "trade_off.png").stat().st_size > 0 and (out / "mels.png").stat().st_size > 0
    assert "## Distortion-perception plane" in (out / "results.md").read_text()
    # Benchmarking the checkpoint again without training gives the same numbers.
    again = run_script("--train_dir", str(tmp_path / "train"), "--test_dir", str(tmp_path / "test"),
                       "--ckpt_path", str(out / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "again"),
                       "--cache_dir", str(tmp_path / "cache"), "--prior_samples", "16", "--references",
                       "--also", str(out / "ckpt" / "last.ckpt"), "--two_sample_seeds", "1", "--fit_prior",
                       "--detail_strengths", "0,1")
    assert again.returncode == 0, again.stderr[-3000:]
    again_data = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again_data["vae"] == data["vae"]
    # --two_sample_seeds / --fit_prior: the two-sample tests on the test album, a learned prior chosen on validation.
    two = again_data["two_sample"]
    assert len(two["floor"]["accuracies"]) == 1 and 0 <= two["control"]["accuracy"] <= 1
    assert "alpha_0" in two["reconstructions"] and set(two["samples"]) == {"standard", "learned"}
    learned = again_data["learned_prior"]
    assert learned["table"][0]["kind"] == "standard" and learned["best"]["components"] >= 1
    assert max(r["val_log_likelihood"] for r in learned["table"]) >= learned["table"][0]["val_log_likelihood"]
    assert set(learned["nearest_neighbour"]) == {"standard", "learned"}
    # The training folder's validation split is one recording here: nothing to split by, so not measured.
    assert again_data["two_sample_training_music"] is None and again_data["prior"]["c2st_vs_reconstructions"] is None
    text = (tmp_path / "again" / "results.md").read_text()
    assert "## Classifier two-sample test: held-out music" in text and "## Learned prior" in text
    # --also with the same checkpoint puts the same curve on the plane, beside it in the figure.
    (point,) = again_data["extra_points"]
    assert point["rows"] == data["vae"]["plane"]["rows"] and point["mark"] == data["vae"]["perceptual"]["alpha"]
    assert point["label"].endswith("ckpt/last.ckpt")
    # --references: nested training PCAs, and the oracle at least as good as the training PCA on the test set.
    refs = {r["fitted_on"] + str(r["components"]): r["mse"] for r in again_data["linear_references"] if r["basis"] == "pca"}
    assert refs["train32"] <= refs["train16"] <= data["pca_scores"]["mse"] * (1 + 1e-5)
    assert refs["test8"] <= data["pca_scores"]["mse"] * (1 + 1e-5)
    assert "## Linear references" in (tmp_path / "again" / "results.md").read_text()
    # --detail_strengths: the same detail generator on both decoders; strength 0 is the plain output (its MSE is
    # the decoder's own), strength 1 adds the detail's energy to the error, and every point has a two-sample accuracy.
    detail = {(r["decoder"], r["alpha"], r["beta"]): r for r in again_data["detail"]["rows"]}
    assert detail[("VAE", 0.0, 0.0)]["mse"] == pytest.approx(data["vae"]["mse"], rel=1e-6)
    assert detail[("PCA", 0.0, 0.0)]["mse"] == pytest.approx(data["pca_scores"]["mse"], rel=1e-5)
    for name in ("VAE", "PCA"):
        assert detail[(name, 0.0, 1.0)]["mse"] > detail[(name, 0.0, 0.0)]["mse"]
        assert min(detail[(name, 0.0, 1.0)]["band_ratio"]) > min(detail[(name, 0.0, 0.0)]["band_ratio"])
    assert all(0 <= r["two_sample"]["accuracy"] <= 1 for r in detail.values())
    assert "## Generated detail" in (tmp_path / "again" / "results.md").read_text()
    assert again_data["detail"]["source"] == "exemplar" and "prior_windows" not in again_data
    assert (tmp_path / "again" / "issue_mels.png").stat().st_size > 0


def test_linear_references_bracket_the_training_pca():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(12, 40, generator=g)
    train = torch.randn(300, 12, generator=g) @ basis
    test = torch.randn(100, 12, generator=g) @ (basis + 0.3 * torch.randn(12, 40, generator=g))  # another "album"
    rows = {(r["fitted_on"], r["components"]): r["mse"] for r in linear_references(train, test, latent_dim=4)}
    base = fit_pca(train, 4)
    base_mse = float((base.reconstruct(test) - test).pow(2).mean())
    assert set(rows) == {("train", 8), ("train", 16), ("test", 4)}
    assert rows[("train", 16)] <= rows[("train", 8)] <= base_mse
    assert rows[("test", 4)] < base_mse  # the oracle fits the test set's own directions


def test_linear_references_add_the_separable_basis_when_given_a_shape():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 8 * 8, generator=g), torch.randn(20, 8 * 8, generator=g)
    rows = linear_references(train, test, latent_dim=4, shape=(8, 8))
    for basis in ("separable", "dct"):
        got = {r["components"]: r["mse"] for r in rows if r["basis"] == basis}
        assert set(got) == {4, 8, 16}
        assert got[16] <= got[8] <= got[4]  # nested: the top-k by variance


def test_path_shares_split_a_linear_path_models_output():
    shares = PathShares()
    linear = torch.tensor([[1.0, -1.0, 1.0, -1.0]])  # std 1
    nonlinear = torch.tensor([[0.5, 0.5, -0.5, -0.5]])  # std 0.5
    shares.update(linear, linear + nonlinear)
    out = shares.compute()
    assert out["linear_output_std"] == pytest.approx(1.0) and out["nonlinear_output_std"] == pytest.approx(0.5)
