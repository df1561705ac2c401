"""The picture of one held-out window through every decoding (benchmark-quality's issue_mels.png): the input,
alpha 0, the stochastic decoding, and prior samples under N(0, I) and the learned prior, on one colour scale."""

from __future__ import annotations

import torch

from conftest import load_script, write_mel_folder
from musicvae.benchmarks.decodings_figure import decodings_figure, decodings_panels
from musicvae.models.detail import DetailModel, DetailStats, window_features

EDGES = [(0, 6), (6, 16)]
M, T = 16, 24


def detail_model() -> DetailModel:
    g = torch.Generator().manual_seed(0)
    x_hat, residual = torch.randn(8, 1, M, T, generator=g), torch.randn(8, 1, M, T, generator=g)
    stats = DetailStats(M, EDGES, exemplars=True)
    stats.update(window_features(x_hat, EDGES), residual)
    return DetailModel(2 * len(EDGES), M, len(EDGES), 8, T).fit(stats)


def test_panels_show_every_decoding_and_both_priors_on_one_colour_scale():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, M, T, generator=g)
    priors = {"standard": torch.randn(3, 1, M, T, generator=g), "learned": torch.randn(3, 1, M, T, generator=g)}
    panels, titles = decodings_panels(x, lambda y: 0.5 * y, torch.full((M,), 1.5), 0.9, EDGES, detail_model(), 1.0,
                                      priors)
    assert panels.shape == (12, M, T) and len(titles) == 12
    assert titles[:4] == ["input (held out)", "reconstruction, alpha 0", "alpha 0 + detail 1", "alpha 0.90 + detail 1"]
    assert torch.equal(panels[0], x[0, 0]) and torch.equal(panels[1], 0.5 * x[0, 0])
    assert not torch.equal(panels[2], panels[1])  # the stochastic decoding adds detail to the alpha-0 output
    assert titles[4:8] == ["N(0, I) sample 0", "N(0, I) sample 0 + detail 1", "N(0, I) sample 1",
                           "N(0, I) sample 1 + detail 1"]
    assert titles[8] == "learned prior sample 0" and torch.equal(panels[8], priors["learned"][0, 0])
    fig = decodings_figure(panels, titles, "t")
    limits = {image.get_clim() for ax in fig.axes for image in ax.get_images()}
    assert len(limits) == 1  # one colour scale for every panel


def test_without_detail_or_a_learned_prior_the_rows_hold_what_exists():
    x = torch.randn(1, 1, M, T, generator=torch.Generator().manual_seed(2))
    panels, titles = decodings_panels(x, lambda y: y, torch.ones(M), 0.5, EDGES, None, 0.0,
                                      {"standard": torch.zeros(2, 1, M, T)})
    assert titles == ["input (held out)", "reconstruction, alpha 0", "reconstruction, alpha 0.50", "",
                      "N(0, I) sample 0", "N(0, I) sample 1"]
    fig = decodings_figure(panels, titles, "t")
    assert not fig.axes[3].get_images()  # the blank panel is left empty


def test_benchmark_quality_writes_the_issue_figure(tiny_run, tmp_path):
    for name, seed in (("train", 0), ("test", 1)):
        write_mel_folder(tmp_path / name, n_files=5, frames=320, n_mels=32, seed=seed)
    out = tmp_path / "out"
    code = load_script("benchmark_quality").main([
        "--train_dir", str(tmp_path / "train"), "--test_dir", str(tmp_path / "test"), "--out", str(out),
        "--ckpt_path", str(tiny_run["ckpt_dir"] / "best.ckpt"), "--prior_samples", "4", "--fit_prior",
        "--detail_strengths", "0,1"])
    assert code == 0
    assert (out / "issue_mels.png").stat().st_size > 0 and (out / "detail_plane.png").stat().st_size > 0
