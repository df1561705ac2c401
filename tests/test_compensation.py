"""Tests for musicvae.compensation and the realism measure (musicvae.metrics, musicvae.evaluation.realism):
the exact curve against direct computation, hand-made cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from musicvae.compensation import (CompensationStats, band_centres, compensate, compensation_curve,
                                   compensation_sums, fit_gain, perceptual_alpha)
from musicvae.evaluation.realism import TradeOff, prior_realism, recording_halves
from musicvae.metrics import (GaussianFit, band_edges, band_variance_ratio, frame_differences, frechet_distance,
                              gaussian_distance, mel_frames)

N_MELS, FRAMES = 128, 16
EDGES = band_edges(N_MELS)


def _mels(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, N_MELS, FRAMES, generator=torch.Generator().manual_seed(seed))


def _blurred(x: torch.Tensor, keep: float = 0.6, seed: int = 1) -> torch.Tensor:
    """A reconstruction keeping `keep` of each deviation from the band mean, plus a little noise."""
    centre = band_centres(x, EDGES).reshape(x.shape[0], 1, N_MELS, 1)
    noise = 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return centre + keep * (x - centre) + noise


def test_alpha_zero_is_the_decoder_output_and_the_shape_is_kept():
    x_hat = _mels()
    gain = torch.full((N_MELS,), 1.7)
    assert compensate(x_hat, gain, 0.0, EDGES) is x_hat
    assert compensate(x_hat[:, 0], gain, 0.5, EDGES).shape == x_hat[:, 0].shape
    with pytest.raises(ValueError, match="alpha"):
        compensate(x_hat, gain, 1.5, EDGES)


def test_a_uniform_shrink_is_undone_exactly_at_alpha_one():
    x = _mels()
    centre = band_centres(x, EDGES).reshape(x.shape[0], 1, N_MELS, 1)
    x_hat = centre + 0.5 * (x - centre)
    gain = fit_gain(*(compensation_sums(x_hat, x, EDGES)[k] for k in ("recon_energy", "input_energy")))
    assert torch.allclose(gain, torch.full((N_MELS,), 2.0), atol=1e-5)
    assert torch.allclose(compensate(x_hat, gain, 1.0, EDGES), x, atol=1e-5)


def test_the_curve_matches_decoding_at_each_strength():
    """The band ratios and MSE from the sums equal those of compensated outputs, for a gain that varies
    inside bands (so the band mean moves) and over two batches (so the sums add)."""
    x, x2 = _mels(seed=0), _mels(seed=5)
    x_hat, x2_hat = _blurred(x), _blurred(x2, keep=0.4, seed=7)
    gain = 1.0 + 0.5 * torch.sin(torch.arange(N_MELS) / 7.0).abs()
    stats = CompensationStats(N_MELS, EDGES)
    stats.update(x_hat, x)
    stats.update(x2_hat, x2)
    alphas = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    curve = compensation_curve(stats.compute(), gain, EDGES, alphas)
    both, both_hat = torch.cat([x, x2]).double(), torch.cat([x_hat, x2_hat]).double()
    for i, alpha in enumerate(alphas.tolist()):
        out = compensate(both_hat, gain, alpha, EDGES)
        assert torch.allclose(curve["band_ratio"][i], band_variance_ratio(out, both, EDGES), rtol=1e-9)
        assert math.isclose(float(curve["mse"][i]), float((out - both).pow(2).mean()), rel_tol=1e-9)
    assert math.isclose(float(curve["bound_mse"][0]), float(curve["mse"][0]), rel_tol=1e-12)


def test_the_bound_is_the_cost_of_a_band_gain_on_an_orthogonal_output():
    """When the output is uncorrelated with its error (as an MSE-optimal one is), a gain constant in each
    band costs exactly the bound (sqrt(t) - sqrt(r))^2 V: here the output keeps the even frames'
    deviations and the error is the odd frames', each with zero mean in every band."""
    d = _mels(n=3).double()
    even = torch.zeros(FRAMES, dtype=torch.float64)
    even[::2] = 1
    parts = [(d * m) - band_centres(d * m, EDGES).reshape(3, 1, N_MELS, 1) * m * 2 for m in (even, 1 - even)]
    x_hat, x = parts[0], parts[0] + parts[1]
    assert torch.allclose(band_centres(x_hat, EDGES), torch.zeros(3, N_MELS, 1, dtype=torch.float64), atol=1e-12)
    stats = CompensationStats(N_MELS, EDGES)
    stats.update(x_hat, x)
    curve = compensation_curve(stats.compute(), torch.full((N_MELS,), 1.3), EDGES,
                               torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert torch.allclose(curve["mse"], curve["bound_mse"], rtol=1e-9)
    assert float(curve["mse"][2]) > float(curve["mse"][0])


def test_perceptual_alpha_is_the_smallest_strength_reaching_the_target():
    curve = {"alpha": torch.tensor([0.0, 0.5, 1.0]),
             "band_ratio": torch.tensor([[0.7, 0.95, math.nan], [0.9, 1.2, math.nan], [1.0, 1.4, math.nan]])}
    assert perceptual_alpha(curve, 0.9) == (0.5, True)
    assert perceptual_alpha(curve, 0.99) == (1.0, True)
    assert perceptual_alpha(curve, 1.5) == (1.0, False)


def test_fit_gain_is_smooth_bounded_and_neutral_where_nothing_is_known():
    recon = torch.rand(N_MELS, generator=torch.Generator().manual_seed(0)) + 0.2
    recon[10] = 0.0  # a dead bin: no energy to scale
    target = torch.ones(N_MELS)
    raw = fit_gain(recon, target, smooth_bins=0)
    smooth = fit_gain(recon, target)
    assert raw[10] == 1.0 and (raw <= 4.0).all() and (raw >= 0.25).all()
    assert smooth.log().diff().abs().max() < raw.log().diff().abs().max()


def test_frechet_distance_of_known_gaussians():
    mean, cov = torch.zeros(3), torch.eye(3)
    assert frechet_distance(mean, cov, mean, cov) == pytest.approx(0.0, abs=1e-9)
    # N(0, I) vs N(m, 4 I): |m|^2 + 3 + 12 - 2 * 3 * 2
    assert frechet_distance(mean, cov, torch.ones(3), 4 * cov) == pytest.approx(3 + 15 - 12)


def test_gaussian_fit_and_frame_views():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4)
    assert mel_frames(x).shape == (8, 3) and torch.equal(mel_frames(x)[1], x[0, 0, :, 1])
    assert frame_differences(x).shape == (6, 3) and torch.equal(frame_differences(x), torch.ones(6, 3))
    fit_a, fit_b = GaussianFit(3), GaussianFit(3)
    rows = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    fit_a.update(rows[:200])
    fit_a.update(rows[200:])
    fit_b.update(rows)
    assert gaussian_distance(fit_a, fit_b) == pytest.approx(0.0, abs=1e-9)
    assert torch.allclose(fit_b.compute()["cov"], torch.cov(rows.T.double(), correction=0))


class _Windows(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, files: list[int]) -> None:
        self.x, self.items = x, np.array([[f, 0, 0, 0] for f in files])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def test_recording_halves_are_disjoint_recordings_with_equal_counts():
    files = [0] * 5 + [1] * 3 + [2] * 4 + [3] * 1
    a, b = recording_halves(_Windows(torch.zeros(len(files), 1, 2, 2), files))
    assert len(a) == len(b) and not ({files[i] for i in a} & {files[i] for i in b})
    with pytest.raises(ValueError, match="two\nrecordings|at least two recordings"):
        recording_halves(_Windows(torch.zeros(3, 1, 2, 2), [0, 0, 0]))


def _music_like(n: int, n_mels: int, seed: int) -> torch.Tensor:
    """Windows with spectral and temporal structure: a sloped spectrum whose bins switch on and off."""
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(2, -2, n_mels)[:, None] + 0.3 * torch.randn(n, 1, n_mels, 1, generator=g)
    onsets = (torch.rand(n, 1, 1, FRAMES, generator=g) < 0.2).float().cumsum(-1) % 2
    return base + onsets * torch.randn(n, 1, n_mels, 1, generator=g)


def test_realism_ranks_real_music_over_a_blur_and_a_gain_does_not_reach_the_floor():
    n_mels = 16
    edges = band_edges(n_mels)
    x = _music_like(512, n_mels, seed=0)
    data = _Windows(x, [i // 64 for i in range(512)])
    # A blur along time (what MSE decoding does to onsets), then a per-band gain that restores variance.
    kernel = torch.ones(1, 1, 1, 5) / 5
    blur = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (2, 2, 0, 0), mode="replicate"), kernel)
    stats = CompensationStats(n_mels, edges)
    stats.update(blur, x)
    sums = stats.compute()
    gain = fit_gain(sums["recon_energy"], sums["input_energy"])
    result = TradeOff(n_mels, edges, gain, (0.0, 1.0))
    a, b = recording_halves(data)
    for half, idx in enumerate((a, b)):
        result.update(blur[idx], x[idx], half)
    out = result.compute()
    floor, plain, gained = out["floor"], out["rows"][0], out["rows"][1]
    assert plain["realism"]["differences"] > 3 * floor["differences"]
    assert min(gained["band_ratio"]) > max(plain["band_ratio"])
    assert gained["realism"]["differences"] > 3 * floor["differences"]  # variance back, onsets still smeared
    oracle = out["oracle"]  # a curve fitted on these windows reaches the target, at a cost in MSE
    assert oracle["reached"] and min(oracle["band_ratio"]) >= 0.9 and oracle["mse"] > plain["mse"]
    samples = prior_realism(x[a], data)
    assert samples["windows"] == len(a) and samples["realism"]["frames"] < 3 * samples["floor"]["frames"] + 0.1
