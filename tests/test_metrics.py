"""Tests for musicvae.metrics (and its figures in musicvae.plots): hand-made cases with known answers."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from musicvae.losses import DEFAULT_BANDS, band_bins
from musicvae.metrics import (
    FEATURELESS_THRESHOLD,
    LatentDiagnostics,
    ReconstructionDiagnostics,
    active_units,
    band_edges,
    band_variance_ratio,
    featureless_mask,
    log_spectral_distance,
    range_stats,
    spectral_convergence,
)

N_MELS, FRAMES, STD = 128, 16, 2.0
NAMES_128 = ["0-25", "26-37", "38-89", "90-101", "102-127"]


def _mels(n: int = 6, seed: int = 0, frames: int = FRAMES) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, N_MELS, frames, generator=g)


def _run(x_hat: torch.Tensor, x: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    metric = ReconstructionDiagnostics(std=STD, n_mels=x.shape[-2], **kwargs)
    metric.update(x_hat, x)
    return metric.compute()


def _ratios(out: dict[str, torch.Tensor]) -> list[float]:
    return [float(out[f"band_ratio/{name}"]) for name in NAMES_128]


# --- bands ---------------------------------------------------------------------------------


def test_band_edges_128_bins_are_the_weight_table_segments():
    assert band_edges(128) == [(0, 26), (26, 38), (38, 90), (90, 102), (102, 128)]
    assert ReconstructionDiagnostics(std=1.0).band_names == NAMES_128


@pytest.mark.parametrize("n_mels", [1, 2, 3, 5, 10, 16, 33, 64, 80, 129])
def test_band_edges_cover_every_bin_once_and_contain_each_band(n_mels):
    edges = band_edges(n_mels)
    assert edges[0][0] == 0 and edges[-1][1] == n_mels
    assert all(a < b for a, b in edges) and all(e[1] == f[0] for e, f in zip(edges, edges[1:]))
    for start, stop in band_bins(n_mels, DEFAULT_BANDS):
        assert start == stop or (start, stop) in edges


def test_band_edges_without_gaps():
    assert band_edges(10, [(0.0, 0.5, 2.0), (0.5, 1.0, 1.0)]) == [(0, 5), (5, 10)]
    assert band_edges(10, [(0.2, 0.4, 2.0)]) == [(0, 2), (2, 4), (4, 10)]


# --- the notebook's three failures ---------------------------------------------------------


def test_perfect_reconstruction():
    x = _mels()
    out = _run(x.clone(), x)
    assert _ratios(out) == [1.0] * 5
    zero_keys = ("featureless_frac", "range_frac_outside", "mse", "weighted_mse",
                 "spectral_convergence", "lsd_db")
    for key in zero_keys:
        assert float(out[key]) == 0.0, key
    assert float(out["ssim"]) == pytest.approx(1.0, abs=1e-6)
    assert math.isinf(float(out["psnr"])) and float(out["psnr"]) > 0
    assert float(out["recon_min"]) == float(out["input_min"]) == float(x.min())
    assert float(out["recon_max"]) == float(out["input_max"]) == float(x.max())


def test_constant_output_is_featureless_with_zero_band_ratios():
    x = _mels()
    x_hat = torch.full_like(x, 0.25)
    out = _run(x_hat, x)
    assert float(out["featureless_frac"]) == 1.0
    assert _ratios(out) == [0.0] * 5
    assert float(out["recon_min"]) == float(out["recon_max"]) == 0.25
    assert float(out["range_frac_outside"]) == 0.0  # flat, yet inside every input's range
    assert featureless_mask(x_hat, x).tolist() == [True] * 6


def test_featureless_threshold_is_relative_to_each_input():
    x = _mels(4) * torch.tensor([1.0, 1.0, 5.0, 0.2]).view(-1, 1, 1, 1)  # inputs of different variance
    centre = x.mean(dim=(1, 2, 3), keepdim=True)
    # Variance fractions 0.05 (flat) and 0.2 (kept), each example scaled around its own mean.
    kept = torch.tensor([0.05, 0.2, 0.05, 0.2]).sqrt().view(-1, 1, 1, 1)
    x_hat = centre + kept * (x - centre)
    assert featureless_mask(x_hat, x).tolist() == [True, False, True, False]
    assert FEATURELESS_THRESHOLD == 0.1
    assert featureless_mask(x_hat, x, threshold=0.3).tolist() == [True] * 4
    assert float(_run(x_hat, x)["featureless_frac"]) == 0.5


def test_silent_inputs_are_never_featureless_and_leave_the_denominator():
    x = _mels(4)
    x[0] = math.log(1e-5) + 1e-4 * x[0]  # near-silence: the log floor with a trace of noise
    x_hat = x.clone()
    x_hat[0] = -3.0  # flat reconstruction of silence: right, not featureless
    x_hat[1] = 0.0  # flat reconstruction of music: featureless
    assert featureless_mask(x_hat, x).tolist() == [False, True, False, False]
    out = _run(x_hat, x)
    assert float(out["featureless_frac"]) == pytest.approx(1 / 3)
    assert float(out["silent_frac"]) == 0.25
    all_silent = _run(torch.zeros(2, 1, N_MELS, FRAMES), torch.ones(2, 1, N_MELS, FRAMES))
    assert math.isnan(float(all_silent["featureless_frac"]))


def test_range_fraction_uses_each_examples_own_band():
    x = torch.rand(2, 1, N_MELS, FRAMES)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = 0.0, 1.0
    x[1] *= 10.0  # example 0 spans [0, 1] -> band [-0.5, 1.5]; example 1 spans [0, 10] -> [-5, 15]
    x_hat = x.clone()
    x_hat[0, 0, 5, :3] = 2.0  # 3 above example 0's band
    x_hat[0, 0, 6, :2] = -0.75  # 2 below it
    x_hat[0, 0, 7, :4] = 1.5  # 4 on the edge: inside
    x_hat[1, 0, 5, :3] = 2.0  # inside example 1's band, though outside example 0's
    x_hat[1, 0, 6, :1] = 15.5  # 1 above example 1's band
    n = x.numel()
    assert float(range_stats(x_hat, x)["n_outside"]) == 6
    out = _run(x_hat, x)
    assert float(out["range_frac_outside"]) == 6 / n
    assert float(out["recon_max"]) == 15.5 and float(out["recon_min"]) == -0.75
    assert float(out["input_min"]) == 0.0 and float(out["input_max"]) == 10.0
    assert float(range_stats(x_hat, x, margin=0.0)["n_outside"]) == 3 + 2 + 4 + 1


def test_blurred_high_bands_lose_variance_and_low_bands_stay_exact():
    x = _mels(4, frames=32)
    x_hat = x.clone()
    # A 5x5 moving average over frequency and time in bins >= 90 only.
    x_hat[..., 90:, :] = F.avg_pool2d(x[..., 90:, :], 5, stride=1, padding=2, count_include_pad=False)
    ratios = _ratios(_run(x_hat, x))
    assert ratios[:3] == [1.0, 1.0, 1.0]
    assert ratios[3] < 0.5 and ratios[4] < 0.5
    # Same detail lost, but the blurred bands keep their level: a level offset is no detail.
    assert band_variance_ratio(x_hat + 3.0, x, band_edges(N_MELS)).tolist() == pytest.approx(ratios)


def test_band_ratio_is_a_ratio_of_sums_over_examples():
    x = _mels(1).repeat(2, 1, 1, 1)
    x[1] *= 3.0  # input band variances v and 9v in every band
    x_hat = x.clone()
    x_hat[1] = 0.0  # example 1 flat: ratio of sums v / (v + 9v); a mean of ratios would be 0.5
    ratios = band_variance_ratio(x_hat, x, band_edges(N_MELS))
    assert ratios.tolist() == pytest.approx([0.1] * 5, rel=1e-6)


# --- reconstruction scores -----------------------------------------------------------------


def test_spectral_convergence_and_lsd_hand_values():
    # std = 2: S = exp(x * 2 / 2) = exp(x) up to a common gain. Input 0 everywhere.
    x = torch.zeros(2, 1, 8, 6)
    x_hat = torch.zeros_like(x)
    x_hat[0] = math.log(1.5)  # example 0: S_hat = 1.5 S everywhere -> SC 0.5
    x_hat[1, 0, :, 0] = math.log(1.5)  # example 1: only frame 0 off
    sc = spectral_convergence(x_hat, x, std=2.0)
    assert sc[0].item() == pytest.approx(0.5)
    assert sc[1].item() == pytest.approx(0.5 / math.sqrt(6))  # one of 6 frames: ||0.5 * 1|| / ||1|| over 8*6
    # P_hat / P = 1.5^2 -> 10 log10(2.25) dB in every bin of an affected frame.
    db = 10 * math.log10(2.25)
    lsd = log_spectral_distance(x_hat, x, std=2.0)
    assert lsd[0].item() == pytest.approx(db)
    assert lsd[1].item() == pytest.approx(db / 6)  # mean of per-frame RMS, not RMS over all frames
    out = _run(x_hat, x)
    assert float(out["spectral_convergence"]) == pytest.approx((0.5 + 0.5 / math.sqrt(6)) / 2)
    assert float(out["lsd_db"]) == pytest.approx((db + db / 6) / 2)


def test_spectral_convergence_is_finite_for_loud_inputs():
    # exp(200 * 8 / 2) overflows float64 without the per-example shift.
    x = torch.full((1, 1, 8, 6), 200.0, dtype=torch.float64)
    sc = spectral_convergence(x + 0.1, x, std=8.0)
    assert torch.isfinite(sc).all() and sc.item() == pytest.approx(math.exp(0.4) - 1)


def test_mse_weighted_mse_psnr_ssim_hand_values():
    x = _mels(3)
    x_hat = x.clone()
    x_hat[..., :26, :] += 0.5  # error only in the 1.5x band
    out = _run(x_hat, x)
    mse = 0.25 * 26 / 128
    assert float(out["mse"]) == pytest.approx(mse)
    assert float(out["weighted_mse"]) == pytest.approx(1.5 * mse)
    assert float(out["psnr"]) == pytest.approx(10 * math.log10(8.0**2 / mse), rel=1e-6)  # data_range 8
    psnr_4 = float(_run(x_hat, x, data_range=4.0)["psnr"])
    assert psnr_4 == pytest.approx(10 * math.log10(4.0**2 / mse), rel=1e-6)
    assert 0.0 < float(out["ssim"]) < 1.0


def test_rejects_mismatched_shapes_and_bins():
    metric = ReconstructionDiagnostics(std=1.0, n_mels=N_MELS)
    with pytest.raises(ValueError):
        metric.update(_mels(2), _mels(3))
    with pytest.raises(ValueError):
        metric.update(torch.zeros(2, 1, 64, FRAMES), torch.zeros(2, 1, 64, FRAMES))
    with pytest.raises(ValueError):
        ReconstructionDiagnostics(std=0.0)


# --- latent usage --------------------------------------------------------------------------


def test_collapsed_encoder_has_no_active_units():
    mu = torch.full((50, 8), 0.7)
    latent = LatentDiagnostics(8)
    latent.update(mu, torch.zeros_like(mu))
    out = latent.compute()
    assert int(out["active_units"]) == 0 and float(out["active_frac"]) == 0.0


def test_active_units_counts_exactly_the_varying_dims():
    g = torch.Generator().manual_seed(1)
    mu = torch.full((64, 8), -1.3)
    signs = torch.randint(0, 2, (64,), generator=g) * 2.0 - 1.0  # +-1
    mu[:, 2] += 0.2 * signs  # variance ~0.04: active
    mu[:, 5] += torch.randn(64, generator=g)  # variance ~1: active
    mu[:, 6] += 0.05 * signs  # variance ~0.0025: below 0.01
    latent = LatentDiagnostics(8)
    latent.update(mu, torch.zeros_like(mu))
    out = latent.compute()
    assert int(out["active_units"]) == 2 and float(out["active_frac"]) == 2 / 8
    assert (out["mu_var"] > 0.01).nonzero().flatten().tolist() == [2, 5]
    assert int(active_units(mu.sum(0), mu.pow(2).sum(0), 64, threshold=0.001)) == 3


def test_kl_per_dim_hand_values():
    mu = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0, math.log(2.0)], [0.0, 0.0, math.log(2.0)]])
    latent = LatentDiagnostics(3)
    latent.update(mu, logvar)
    out = latent.compute()
    # KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1 - ln s^2) / 2: m = 1, 3 -> 0.5, 4.5 (mean 2.5);
    # m = 0, s = 1 -> 0; s^2 = 2 -> (1 - ln 2) / 2.
    expected = [2.5, 0.0, (1 - math.log(2.0)) / 2]
    assert out["kl_per_dim"].tolist() == pytest.approx(expected)
    assert float(out["kl_nats"]) == pytest.approx(sum(expected))


# --- aggregation ---------------------------------------------------------------------------


def _dataset(n: int = 10):
    """Inputs and reconstructions with every failure present, and latent statistics."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 1, N_MELS, FRAMES, generator=g) * torch.linspace(0.5, 2.0, n).view(-1, 1, 1, 1)
    x_hat = x + 0.3 * torch.randn(x.shape, generator=g)
    x[3] = math.log(1e-5)  # silent input
    x_hat[1] = 0.1  # featureless
    x_hat[4, 0, 100:, :] = F.avg_pool2d(x[4:5, 0, 100:, :], 3, stride=1, padding=1)  # blurred top band
    x_hat[6, 0, :4, :4] = 40.0  # far outside the band
    x_hat[8] -= 20.0  # global minimum
    mu = torch.randn(n, 6, generator=g) * torch.tensor([0.0, 0.05, 0.3, 1.0, 2.0, 0.0])
    logvar = torch.randn(n, 6, generator=g) * 0.5
    return x_hat, x, mu, logvar


def _diagnostics(batches) -> dict[str, torch.Tensor]:
    recon, latent = ReconstructionDiagnostics(std=STD), LatentDiagnostics(6)
    for x_hat, x, mu, logvar in batches:
        recon.update(x_hat, x)
        latent.update(mu, logvar)
    return {**recon.compute(), **latent.compute()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        # weighted_mse sums float32 batch means (losses.weighted_mse); everything else sums float64.
        rtol = 1e-6 if key == "weighted_mse" else 1e-12
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=0.0, equal_nan=True, msg=key)


def _split(data, sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [tuple(t[s:s + n] for t in data) for s, n in zip(starts, sizes)]


def test_batch_splitting_does_not_change_the_epoch_result():
    data = _dataset()
    whole = _diagnostics([data])
    assert 0 < float(whole["featureless_frac"]) < 1 and float(whole["range_frac_outside"]) > 0
    assert 0 < int(whole["active_units"]) < 6
    _assert_same(whole, _diagnostics(_split(data, [5, 1, 4])))
    _assert_same(whole, _diagnostics(_split(data, [1] * 10)))


def test_reset_starts_a_new_epoch():
    data = _dataset()
    recon = ReconstructionDiagnostics(std=STD)
    recon.update(data[0] * 3.0, data[1])
    recon.reset()
    recon.update(data[0], data[1])
    fresh = ReconstructionDiagnostics(std=STD)
    fresh.update(data[0], data[1])
    _assert_same(recon.compute(), fresh.compute())


def test_unrepeated_sampler_gives_every_example_to_exactly_one_rank():
    # What the validation loader must use under DDP: DistributedSampler pads by repeating examples.
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
    from torch.utils.data.distributed import DistributedSampler

    dataset = list(range(11))
    shards = [list(UnrepeatedDistributedSampler(dataset, num_replicas=3, rank=r, shuffle=False))
              for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == dataset
    padded = [list(DistributedSampler(dataset, num_replicas=3, rank=r, shuffle=False)) for r in range(3)]
    assert sum(map(len, padded)) == 12  # one example twice: the double count this avoids


def _ddp_worker(rank: int, world: int, port: int, data, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # Disjoint shards of uneven size, and a different batching on each rank.
        shards = {0: _split(data, [7])[0], 1: _split(data, [7, 3])[1]}
        sizes = {0: [4, 3], 1: [1, 2]}[rank]
        result = _diagnostics(_split(shards[rank], sizes))
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    data = _dataset()
    mp.spawn(_ddp_worker, args=(2, _free_port(), data, str(tmp_path)), nprocs=2, join=True)
    single = _diagnostics([data])
    for rank in range(2):
        _assert_same(torch.load(tmp_path / f"rank{rank}.pt"), single)


# --- figures -------------------------------------------------------------------------------


def test_band_ratio_and_kl_figures():
    import matplotlib.pyplot as plt

    from musicvae.plots import band_ratio_figure, kl_per_dim_figure

    fig = band_ratio_figure(NAMES_128, torch.tensor([1.0, 0.9, 0.8, 0.3, float("nan")]))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES_128
    assert [p.get_height() for p in ax.patches][:4] == pytest.approx([1.0, 0.9, 0.8, 0.3])
    assert any(list(line.get_ydata()) == [1.0, 1.0] for line in ax.lines)
    plt.close(fig)
    fig = kl_per_dim_figure(torch.tensor([0.1, 2.0, 0.0, 0.7]), mu_var=torch.tensor([0.5, 1.0, 0.0, 0.005]))
    ax = fig.axes[0]
    assert [p.get_height() for p in ax.patches] == pytest.approx([2.0, 0.7, 0.1, 0.0])
    active = [p.get_facecolor() == ax.patches[0].get_facecolor() for p in ax.patches]
    assert active == [True, False, True, False]  # dims 1 and 0 active; 3 and 2 not
    plt.close(fig)
