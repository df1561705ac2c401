"""ReconstructionScores (musicvae/training/scoring.py): the one scoring of validation, test, evaluate and
benchmark-quality gives exactly what the metrics it composes give on their own."""

from __future__ import annotations

import math

import pytest
import torch

from musicvae.losses import DEFAULT_BANDS
from musicvae.metrics import REALISM_VIEWS, GaussianFit, LatentDiagnostics, ReconstructionDiagnostics, gaussian_distance
from musicvae.training.scoring import LATENT_KEYS, ReconstructionScores, plain_values, scalars

N_MELS, FRAMES, LATENT, STD, RANGE = 32, 16, 6, 2.0, 6.0
# What MusicVAEModule logged under val/ before it scored through ReconstructionScores.
LOGGED_BEFORE = {"range_frac_outside", "recon_min", "recon_max", "input_min", "input_max", "featureless_frac",
                 "silent_frac", "mse", "weighted_mse", "spectral_convergence", "lsd_db", "ssim", "psnr",
                 "band_ratio/0-5", "band_ratio/6-9", "band_ratio/10-21", "band_ratio/22-25", "band_ratio/26-31",
                 "active_units", "active_frac", "realism_frames", "realism_differences", "band_ratio_error"}


def _batches(n: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Batches (x_hat, x, mu, logvar) whose bands are reconstructed too flat, too wide, and one (bins 0-5)
    against inputs without any variance there, so its ratio is NaN."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(4, 1, N_MELS, FRAMES, generator=g)
        x[..., 0:6, :] = -1.5  # silent low band in every input
        x_hat = x + 0.3 * torch.randn(x.shape, generator=g)
        x_hat[..., 10:22, :] *= 0.1  # worst band: ratio ~0.01, |log| ~4.5
        x_hat[..., 26:32, :] *= 2.0  # ratio ~4, log ~1.4: the largest log, not the largest |log|
        mu, logvar = torch.randn(4, LATENT, generator=g), 0.1 * torch.randn(4, LATENT, generator=g)
        out.append((x_hat, x, mu, logvar))
    return out


def _scored(batches, **kwargs) -> dict[str, torch.Tensor]:
    scores = ReconstructionScores(N_MELS, DEFAULT_BANDS, **kwargs)
    for batch in batches:
        scores.update(*batch if kwargs.get("latent_dim") else batch[:2])
    return scores.compute()


def test_scores_are_the_composed_metrics_values():
    batches = _batches()
    got = _scored(batches, latent_dim=LATENT, std=STD, data_range=RANGE)
    recon = ReconstructionDiagnostics(std=STD, n_mels=N_MELS, bands=DEFAULT_BANDS, data_range=RANGE)
    latent = LatentDiagnostics(LATENT)
    fits = {(view, side): GaussianFit(N_MELS) for view in REALISM_VIEWS for side in ("input", "output")}
    for x_hat, x, mu, logvar in batches:
        recon.update(x_hat, x)
        latent.update(mu, logvar)
        for view, rows in REALISM_VIEWS.items():
            fits[view, "input"].update(rows(x))
            fits[view, "output"].update(rows(x_hat))
    expected = {**recon.compute(), **latent.compute()}
    for view in REALISM_VIEWS:
        expected[f"realism_{view}"] = torch.tensor(gaussian_distance(fits[view, "input"], fits[view, "output"]),
                                                   dtype=torch.float64)
    ratios = [float(expected[f"band_ratio/{name}"]) for name in recon.band_names]
    assert math.isnan(ratios[0]) and ratios[2] < 0.05 and ratios[4] > 2  # the cases _batches means to make
    # The worst band's |log ratio|, a NaN ratio counted as a perfect 1.
    expected["band_ratio_error"] = torch.tensor(max(abs(math.log(r)) if math.isfinite(r) else 0.0 for r in ratios),
                                                dtype=torch.float64)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].shape == value.shape, key
        torch.testing.assert_close(got[key], value, rtol=1e-12, atol=0.0, equal_nan=True, msg=key)


def test_scalars_keep_every_logged_name_as_float32_scalars():
    values = _scored(_batches(1), latent_dim=LATENT)
    logged = scalars(values)
    assert LOGGED_BEFORE <= set(logged) and {"kl_per_dim", "mu_var"}.isdisjoint(logged)
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in logged.values())
    assert values["kl_per_dim"].shape == values["mu_var"].shape == (LATENT,)
    plain = plain_values(values)
    assert isinstance(plain["active_units"], int) and isinstance(plain["mse"], float)
    assert len(plain["kl_per_dim"]) == LATENT and set(LATENT_KEYS) <= set(plain)


def test_options_leave_out_their_keys():
    values = _scored(_batches(1), realism=False)
    assert not any(key.startswith("realism_") for key in values) and set(LATENT_KEYS).isdisjoint(values)


def test_std_set_after_construction_reaches_the_spectral_scores():
    batches = _batches(1)
    scores = ReconstructionScores(N_MELS, latent_dim=LATENT)
    scores.std = STD  # as the module does before a validation epoch
    for batch in batches:
        scores.update(*batch)
    got = scores.compute()
    want = _scored(batches, latent_dim=LATENT, std=STD)
    assert scores.std == STD
    for key in ("spectral_convergence", "lsd_db"):
        assert torch.equal(got[key], want[key]), key
    assert not torch.equal(got["lsd_db"], _scored(batches, latent_dim=LATENT)["lsd_db"])  # std 1 differs
    with pytest.raises(ValueError, match="std"):
        scores.std = 0.0


def test_reset_starts_a_new_set_and_realism_of_a_copy_is_zero():
    scores = ReconstructionScores(N_MELS, latent_dim=LATENT)
    for batch in _batches(2, seed=1):
        scores.update(*batch)
    scores.compute()
    scores.reset()
    batches = _batches(2)
    for batch in batches:
        scores.update(*batch)
    got, fresh = scores.compute(), _scored(batches, latent_dim=LATENT)
    for key in got:
        torch.testing.assert_close(got[key], fresh[key], rtol=0.0, atol=0.0, equal_nan=True, msg=key)
    scores.reset()
    x = batches[0][1]
    scores.update(x, x, *batches[0][2:])
    exact = scores.compute()
    assert float(exact["band_ratio_error"]) == 0.0  # NaN band counted as 1, every other ratio exactly 1
    for view in REALISM_VIEWS:  # paired sets: a perfect reconstruction is at distance 0
        assert abs(float(exact[f"realism_{view}"])) < 1e-9


def test_posterior_must_match_latent_dim():
    x_hat, x, mu, logvar = _batches(1)[0]
    with pytest.raises(ValueError, match="latent_dim"):
        ReconstructionScores(N_MELS).update(x_hat, x, mu, logvar)
    with pytest.raises(ValueError, match="latent_dim"):
        ReconstructionScores(N_MELS, latent_dim=LATENT).update(x_hat, x)
