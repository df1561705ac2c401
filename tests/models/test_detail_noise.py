"""Detail generated to match the code (musicvae.models.detail): strength 0 is the decoder output
itself, the noise has the fitted per-band energy on average, it follows the code, and a seed fixes it."""

import math

import pytest
import torch

from musicvae.models.detail import DetailModel, DetailStats, add_detail, band_energy, exemplar_texture, window_features

EDGES = [(0, 4), (4, 10), (10, 16)]
M, T, D = 16, 32, 6


def synthetic(n: int = 400, seed: int = 0):
    """Codes and residuals whose band energies are exp(linear in the code): the law the model assumes."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(n, D, generator=g)
    log_energy = torch.stack([0.8 * codes[:, 0], -0.5 * codes[:, 1], 0.3 * codes[:, 2] - 1.0], dim=1)  # (n, 3)
    scale = torch.cat([log_energy[:, b:b + 1].expand(-1, hi - lo) for b, (lo, hi) in enumerate(EDGES)], 1)
    residual = torch.randn(n, M, T, generator=g) * (0.5 * scale).exp()[:, :, None]
    residual = residual + 0.6 * residual.roll(1, dims=2)  # some correlation in time
    return codes, residual[:, None]


def fitted(codes, residual) -> DetailModel:
    stats = DetailStats(M, EDGES)
    for c, r in zip(codes.split(100), residual.split(100)):
        stats.update(c, r)
    return DetailModel(D, M, len(EDGES)).fit(stats)


def test_strength_zero_is_the_decoder_output_itself():
    codes, residual = synthetic(50)
    x_hat = torch.randn(50, 1, M, T)
    model = fitted(codes, residual)
    out = add_detail(x_hat, codes, model, 0.0, torch.Generator().manual_seed(0))
    assert out is x_hat
    assert not torch.equal(add_detail(x_hat, codes, model, 0.5, torch.Generator().manual_seed(0)), x_hat)


def test_detail_has_the_fitted_band_energy_and_follows_the_code():
    codes, residual = synthetic()
    model = fitted(codes, residual)
    # Calibration: over the training codes, the mean predicted energy is the mean residual energy.
    assert torch.allclose(model.energy(codes).double().mean(0), band_energy(residual, EDGES).mean(0), rtol=1e-4)
    # The map recovers the law: predicted log energy correlates with the true one in every band.
    truth = band_energy(residual, EDGES).log()
    predicted = model.energy(codes).double().log()
    for b in range(len(EDGES)):
        assert torch.corrcoef(torch.stack([truth[:, b], predicted[:, b]]))[0, 1] > 0.8
    # The generated noise has, on average, the energy predicted for each code. Each band's mean square
    # over n draws has a relative sd of sqrt(2 / n_eff); n_eff counts windows x frames, shrunk by the
    # lag-1 correlation ((1 - rho) / (1 + rho)), bins counted once (they are correlated): 4 sd.
    n = 200
    noise = add_detail(torch.zeros(n, 1, M, T), codes[:n], model, 1.0, torch.Generator().manual_seed(1))
    rho = float(model.rho.max())
    n_eff = n * T * (1 - rho) / (1 + rho)
    tolerance = 4 * math.sqrt(2 / n_eff)
    ratio = band_energy(noise, EDGES).mean(0) / model.energy(codes[:n]).double().mean(0)
    assert ((ratio - 1).abs() < tolerance).all(), (ratio, tolerance)
    # Strength scales the amplitude: at 0.5 a quarter of the energy.
    half = add_detail(torch.zeros(n, 1, M, T), codes[:n], model, 0.5, torch.Generator().manual_seed(1))
    assert torch.allclose(half, 0.5 * noise)


def test_seeded_detail_is_deterministic():
    codes, residual = synthetic(100)
    model = fitted(codes, residual)
    x_hat = torch.zeros(4, 1, M, T)
    a = add_detail(x_hat, codes[:4], model, 1.0, torch.Generator().manual_seed(7))
    b = add_detail(x_hat, codes[:4], model, 1.0, torch.Generator().manual_seed(7))
    c = add_detail(x_hat, codes[:4], model, 1.0, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_window_features_are_each_bands_level_and_log_variance():
    x = torch.zeros(2, 1, M, T)
    x[0, 0, 4:10] = torch.randn(6, T, generator=torch.Generator().manual_seed(0)) * 2 + 3
    features = window_features(x, EDGES)  # (2, 2 * 3): level, log variance per band
    assert features.shape == (2, 6) and torch.isfinite(features).all()  # a flat band stays finite
    band = x[0, 0, 4:10].double()
    assert features[0, 2] == pytest.approx(float(band.mean()), rel=1e-5)
    assert features[0, 3] == pytest.approx(math.log(float(band.var(correction=0)) + 1e-4), rel=1e-5)
    assert features[1, 1] == pytest.approx(math.log(1e-4))


def test_exemplar_detail_is_a_training_residual_at_the_predicted_band_energy():
    codes, residual = synthetic(120)
    stats = DetailStats(M, EDGES, exemplars=True)
    for c, r in zip(codes.split(50), residual.split(50)):
        stats.update(c, r)
    model = DetailModel(D, M, len(EDGES), exemplars=120, frames=T).fit(stats)
    assert model.source == "exemplar" and fitted(codes, residual).source == "gaussian"
    x_hat = torch.zeros(6, 1, M, T)
    assert add_detail(x_hat, codes[:6], model, 0.0) is x_hat  # strength 0: the decoder output itself
    noise = add_detail(x_hat, codes[:6], model, 1.0, torch.Generator().manual_seed(3))[:, 0]
    # Each window's detail is one training residual, whole, rescaled band by band: its band energy is exactly
    # the energy predicted for that window's code (float16 storage: 1e-3), and its shape is the residual's.
    assert torch.allclose(band_energy(noise, EDGES), model.energy(codes[:6]).double(), rtol=3e-3)
    unit = noise / model.bin_scale(codes[:6])[:, :, None]
    bank = residual[:, 0].double() / band_energy(residual, EDGES).sqrt()[:, model.band_of_bin, None]
    nearest = torch.cdist(unit.flatten(1).double(), bank.flatten(1)).min(dim=1).values
    assert (nearest < 1e-2 * bank[0].norm()).all()
    again = add_detail(x_hat, codes[:6], model, 1.0, torch.Generator().manual_seed(3))[:, 0]
    assert torch.equal(noise, again)


def test_exemplar_texture_of_any_length_keeps_unit_energy():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(40, M, T, generator=g)
    bank = (bank / bank.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()).half()  # unit energy per window
    assert torch.equal(exemplar_texture(bank, 3, T, torch.Generator().manual_seed(1)),
                       bank[torch.randint(40, (3,), generator=torch.Generator().manual_seed(1))].float())
    for frames in (T // 3, 5 * T + 7):  # a short tail, a piece: cross-faded windows
        texture = exemplar_texture(bank, 2, frames, g)
        assert texture.shape == (2, M, frames) and torch.isfinite(texture).all()
        # Independent unit-energy draws cross-faded with squares summing to one: unit energy on average
        # (M x frames x 2 nearly independent values, 5 standard deviations of their mean square).
        assert abs(float(texture.pow(2).mean()) - 1) < 5 * math.sqrt(2 / texture.numel()) * 2
