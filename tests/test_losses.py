"""Tests for musicvae.losses: expected values are worked out by hand or with explicit loops."""

import cmath
import math

import pytest
import torch

from musicvae.losses import (
    DEFAULT_BANDS,
    band_bins,
    create_frequency_weights,
    kl_divergence,
    output_range_penalty,
    spectral_loss,
    vae_loss,
    vae_loss_spectral,
    weighted_mse,
)


def _mse_loop(a, b):
    """Element mean of squared differences, by plain Python loops over flat lists."""
    fa, fb = a.flatten().tolist(), b.flatten().tolist()
    return sum((p - q) ** 2 for p, q in zip(fa, fb)) / len(fa)


# --- frequency weights -------------------------------------------------------------------


def test_frequency_weights_128_bins_exact_table():
    expected = [1.5] * 26 + [1.0] * 12 + [2.0] * 52 + [1.0] * 12 + [0.8] * 26  # bins 0..127
    w = create_frequency_weights(128)
    assert w.shape == (128,) and w.dtype == torch.float32
    assert w.tolist() == pytest.approx(expected)
    assert band_bins(128, DEFAULT_BANDS) == [(0, 26), (38, 90), (102, 128)]


def test_frequency_weights_10_bins_and_default_weight():
    assert create_frequency_weights(10).tolist() == pytest.approx(
        [1.5, 1.5, 1.0, 2.0, 2.0, 2.0, 2.0, 1.0, 0.8, 0.8]
    )
    w = create_frequency_weights(10, default_weight=0.0, dtype=torch.float64)
    assert w.dtype == torch.float64 and w[2] == 0.0 and w[7] == 0.0


def test_band_edges_round_half_up_not_half_even():
    # 0.1*5 = 0.5 -> 1 and 0.5*5 = 2.5 -> 3; Python's round() would give 0 and 2.
    assert band_bins(5, [(0.1, 0.5, 3.0)]) == [(1, 3)]
    assert create_frequency_weights(5, [(0.1, 0.5, 3.0)]).tolist() == [1.0, 3.0, 3.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "bands, n_mels",
    [
        ([(0.5, 0.5, 1.0)], 8),  # empty band
        ([(0.6, 0.4, 1.0)], 8),  # reversed
        ([(-0.1, 0.4, 1.0)], 8),  # below 0
        ([(0.2, 1.1, 1.0)], 8),  # above 1
        ([(0.0, 0.4, -1.0)], 8),  # negative weight
        ([(0.0, 0.5, 1.0), (0.4, 0.8, 2.0)], 8),  # overlap
        ([(0.0, 0.5)], 8),  # not a triple
        ([(0.0, 0.5, 1.0)], 0),  # no bins
    ],
)
def test_bad_bands_raise(bands, n_mels):
    with pytest.raises(ValueError):
        create_frequency_weights(n_mels, bands)


def test_bad_band_error_names_the_band():
    with pytest.raises(ValueError, match=r"0\.4, 0\.8, 2\.0"):
        band_bins(8, [(0.0, 0.5, 1.0), (0.4, 0.8, 2.0)])


# --- KL ----------------------------------------------------------------------------------


def test_kl_divergence_hand_values():
    assert torch.equal(kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2, 3))
    assert kl_divergence(torch.ones(2, 3), torch.zeros(2, 3)).tolist() == [[0.5] * 3] * 2
    # mu=0, var=2: -0.5 * (1 + ln 2 - 0 - 2) = 0.5 * (1 - ln 2)
    kl = kl_divergence(torch.zeros(1, 1), torch.full((1, 1), math.log(2.0)))
    assert kl.item() == pytest.approx(0.5 * (1 - math.log(2.0)), rel=1e-6)


def test_vae_loss_parts_and_per_element_kl():
    x = torch.randn(2, 1, 2, 3)  # 6 elements per example
    x_hat = x + torch.tensor([0.5, -1.0, 2.0]).expand(2, 1, 2, 3)
    mu, logvar = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.zeros(2, 2)
    out = vae_loss(x_hat, x, mu, logvar, beta=0.3)
    assert set(out) == {"loss", "recon", "kl", "kl_nats", "mse"}
    assert all(v.dim() == 0 for v in out.values())
    mse = (0.25 + 1.0 + 4.0) / 3
    assert out["mse"].item() == pytest.approx(mse) and out["recon"].item() == pytest.approx(mse)
    assert out["kl_nats"].item() == pytest.approx(0.25)  # (0.5 + 0) / 2 examples
    assert out["kl"].item() == pytest.approx(0.25 / 6)
    assert out["loss"].item() == pytest.approx(mse + 0.3 * 0.25 / 6)
    # Without the channel axis the per-example element count (and so kl) is the same.
    assert vae_loss(x_hat[:, 0], x[:, 0], mu, logvar)["kl"].item() == pytest.approx(0.25 / 6)


# --- spectral ----------------------------------------------------------------------------


def test_spectral_loss_hand_values():
    x = torch.randn(2, 1, 4, 5)
    assert spectral_loss(x, x.clone()).item() == 0.0
    delta = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # ortho DFT of a unit impulse: 0.5 everywhere
    assert spectral_loss(torch.zeros(1, 1, 2, 2), delta).item() == pytest.approx(0.25)
    # A circular shift keeps every magnitude, so the loss is 0 though the MSE is not.
    shifted = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    assert spectral_loss(shifted, delta).item() == pytest.approx(0.0, abs=1e-7)


def test_spectral_loss_matches_explicit_dft():
    torch.manual_seed(0)
    a, b = torch.randn(1, 1, 2, 3), torch.randn(1, 1, 2, 3)

    def mags(t):
        v, (m, n) = t[0, 0].tolist(), t.shape[-2:]
        return [
            abs(sum(v[i][j] * cmath.exp(-2j * math.pi * (k * i / m + l * j / n))
                    for i in range(m) for j in range(n))) / math.sqrt(m * n)
            for k in range(m) for l in range(n)
        ]

    expected = sum((p - q) ** 2 for p, q in zip(mags(a), mags(b))) / 6
    assert spectral_loss(a, b).item() == pytest.approx(expected, rel=1e-5)


# --- output range ------------------------------------------------------------------------


def test_output_range_penalty_inside_and_outside_band():
    x = torch.tensor([[[[0.0, 1.0]]]])  # range 1 -> band [-0.5, 1.5]
    assert output_range_penalty(torch.tensor([[[[-0.5, 1.4]]]]), x).item() == 0.0
    # excesses 0.5 and 0.5 -> squares 0.25 each -> mean 0.25
    assert output_range_penalty(torch.tensor([[[[2.0, -1.0]]]]), x).item() == pytest.approx(0.25)
    # margin=0 shrinks the band to [0, 1]: excesses 0.4 and 0.5
    got = output_range_penalty(torch.tensor([[[[1.4, -0.5]]]]), x, margin=0.0).item()
    assert got == pytest.approx((0.16 + 0.25) / 2)


def test_output_range_penalty_is_per_example():
    x = torch.tensor([[[[-10.0, 10.0]]], [[[0.0, 1.0]]]])  # loud clip, quiet clip
    x_hat = torch.tensor([[[[-10.0, 10.0]]], [[[2.0, 0.0]]]])
    # Only the quiet clip's 2.0 leaves its band [-0.5, 1.5]: 0.5**2 over 4 elements.
    assert output_range_penalty(x_hat, x).item() == pytest.approx(0.0625)


def test_output_range_penalty_no_gradient_into_input():
    x = torch.tensor([[[[0.0, 1.0]]]], requires_grad=True)
    x_hat = torch.tensor([[[[2.0, 0.5]]]], requires_grad=True)
    output_range_penalty(x_hat, x).backward()
    assert x.grad is None
    assert x_hat.grad.flatten().tolist() == pytest.approx([0.5, 0.0])  # d/dv mean((v-1.5)^2) = 2*0.5/2


# --- weighted MSE ------------------------------------------------------------------------


def test_weighted_mse_non_uniform_weights_not_renormalised():
    x = torch.zeros(2, 1, 3, 2)
    x_hat = torch.arange(12.0).reshape(2, 1, 3, 2) / 4
    w = [1.0, 2.0, 0.5]
    expected = sum(
        w[m] * x_hat[b, 0, m, t].item() ** 2 for b in range(2) for m in range(3) for t in range(2)
    ) / 12
    assert weighted_mse(x_hat, x, torch.tensor(w)).item() == pytest.approx(expected)
    twice = weighted_mse(x_hat, x, torch.full((3,), 2.0)).item()
    assert twice == pytest.approx(2 * _mse_loop(x_hat, x))
    assert weighted_mse(x_hat[:, 0], x[:, 0], torch.tensor(w)).item() == pytest.approx(expected)


def test_weighted_mse_wrong_weight_length_raises():
    x = torch.zeros(1, 1, 3, 2)
    with pytest.raises(ValueError, match="n_mels"):
        weighted_mse(x, x, torch.ones(4))


# --- combined loss -----------------------------------------------------------------------


def test_vae_loss_spectral_total_is_formula_of_parts():
    torch.manual_seed(1)
    x, x_hat = torch.randn(3, 1, 10, 4), 3 * torch.randn(3, 1, 10, 4)  # x_hat spills out of range
    mu, logvar = torch.randn(3, 5), torch.randn(3, 5)
    out = vae_loss_spectral(x_hat, x, mu, logvar, beta=0.2, spectral_weight=0.3, output_reg_weight=0.7)
    assert set(out) == {"loss", "recon", "kl", "kl_nats", "spectral", "output_reg", "mse"}
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in out.values())
    assert out["output_reg"].item() > 0 and out["spectral"].item() > 0
    expected = out["recon"] + 0.2 * out["kl"] + 0.3 * out["spectral"] + 0.7 * out["output_reg"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    # Default weights are the 10-bin band table; mse stays unweighted.
    default_w = torch.tensor([1.5, 1.5, 1.0, 2.0, 2.0, 2.0, 2.0, 1.0, 0.8, 0.8])
    w_expected = sum(
        default_w[m].item() * (x_hat[b, 0, m, t] - x[b, 0, m, t]).item() ** 2
        for b in range(3) for m in range(10) for t in range(4)
    ) / 120
    assert out["recon"].item() == pytest.approx(w_expected, rel=1e-5)
    assert out["mse"].item() == pytest.approx(_mse_loop(x_hat, x), rel=1e-5)
    kl_nats = sum(kl_divergence(mu, logvar).sum(1).tolist()) / 3
    assert out["kl_nats"].item() == pytest.approx(kl_nats, rel=1e-6)
    assert out["kl"].item() == pytest.approx(kl_nats / 40, rel=1e-6)
    ones = vae_loss_spectral(x_hat, x, mu, logvar, freq_weight=torch.ones(10))
    assert ones["recon"].item() == pytest.approx(ones["mse"].item())


def test_gradients_flow_and_are_finite():
    x = torch.randn(2, 1, 8, 6)
    x_hat = (2 * torch.randn(2, 1, 8, 6)).requires_grad_()
    mu, logvar = torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    vae_loss_spectral(x_hat, x, mu, logvar)["loss"].backward()
    for t in (x_hat, mu, logvar):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_bf16_inputs_give_float32_outputs():
    x = torch.randn(2, 1, 8, 6).bfloat16()
    x_hat, mu, logvar = (x * 1.5), torch.randn(2, 4).bfloat16(), torch.randn(2, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [
            *vae_loss(x_hat, x, mu, logvar).values(),
            *vae_loss_spectral(x_hat, x, mu, logvar).values(),
            kl_divergence(mu, logvar),
        ]
    for v in outs:
        assert v.dtype == torch.float32 and torch.isfinite(v).all()


@pytest.mark.parametrize(
    "fn",
    [
        lambda a, b: vae_loss(a, b, torch.zeros(1, 2), torch.zeros(1, 2)),
        lambda a, b: vae_loss_spectral(a, b, torch.zeros(1, 2), torch.zeros(1, 2)),
        spectral_loss,
        output_range_penalty,
        lambda a, b: weighted_mse(a, b, torch.ones(4)),
    ],
)
def test_shape_mismatch_raises_with_both_shapes(fn):
    with pytest.raises(ValueError, match=r"\(1, 1, 4, 5\).*\(1, 1, 4, 6\)"):
        fn(torch.zeros(1, 1, 4, 5), torch.zeros(1, 1, 4, 6))


def test_mismatched_latent_shapes_raise():
    with pytest.raises(ValueError, match="logvar"):
        kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4))
