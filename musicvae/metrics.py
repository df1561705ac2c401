"""Validation diagnostics for the failures seen by eye in the seed notebook: reconstructions
(1) wider in range than their inputs, (2) missing high-frequency detail, (3) sometimes flat;
beside standard reconstruction scores and latent-usage statistics.

Inputs are normalised log-mels ``x`` and reconstructions ``x_hat`` of shape
``(B, 1, n_mels, T)`` or ``(B, n_mels, T)`` (mel axis -2, time -1), and posterior
statistics ``mu``, ``logvar`` of shape ``(B, D)``. The functions return per-example
values or sums; the ``Metric`` classes only add them into states whose
``dist_reduce_fx`` (sum, min, max) makes the epoch result exact across batches and
DDP processes. Sums are float64: an epoch sums ~10^8 squared errors.

DDP: Lightning's default ``DistributedSampler`` pads the last round by repeating
examples, which these sums would count twice. Build the validation loader with
``lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler(dataset,
num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)`` when
``trainer.world_size > 1``: Lightning leaves a ``DistributedSampler`` subclass alone,
and ranks then differ by at most one batch, which is safe in validation as long as
``validation_step`` runs no collective per step (``Metric.update`` runs none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.image import peak_signal_noise_ratio as _psnr
from torchmetrics.functional.image import structural_similarity_index_measure as _ssim

from musicvae.losses import (DEFAULT_BANDS, RANGE_MARGIN, Band, band_bins, create_frequency_weights, kl_divergence,
                             range_band, weighted_mse)

# A reconstruction keeping under 10 % of its input's variance (a standard deviation
# under sqrt(0.1) ~ 32 % of the input's) spans under a third of the input's colour
# scale: on the shared scale of mel_comparison_figure it reads as one flat tone. A
# blurred but present reconstruction keeps far more, because most of a log-mel's
# variance is coarse (spectral tilt, loudness envelope), which a blur preserves. So
# 0.1 flags "no content", not "low quality"; the band ratios and scores grade quality.
# Chosen from this reasoning alone, before comparing training recipes.
FEATURELESS_THRESHOLD = 0.1

# Inputs whose variance is below this (normalised units, where the data's variance is
# 1) are silent: digital silence is a constant log(log_floor). Their reconstructions
# cannot be "featureless" relative to them, so they leave featureless_frac's denominator.
SILENT_VARIANCE = 1e-6

# Burda et al. 2016 (arXiv:1509.00519), section 5.2: a latent unit is active when the
# variance over the data of its posterior mean exceeds 0.01.
ACTIVE_UNIT_THRESHOLD = 0.01

# Normalised log-mels are z-scores; nearly all values lie in [-4, 4] (the notebook saw
# inputs in [-4.2, 3.1]). A fixed range keeps SSIM's constants and PSNR's peak the same
# for every batch, so epoch values do not depend on how examples were batched.
DEFAULT_DATA_RANGE = 8.0

_DB_PER_NEPER = 10.0 / math.log(10.0)  # 10*log10(P) = (10/ln 10) * ln(P)


def _check_pair(x_hat: Tensor, x: Tensor) -> None:
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat shape {tuple(x_hat.shape)} != x shape {tuple(x.shape)}")
    if x.dim() not in (3, 4) or (x.dim() == 4 and x.shape[1] != 1):
        raise ValueError(f"expected (B, 1, n_mels, T) or (B, n_mels, T), got {tuple(x.shape)}")


def _example_variance(t: Tensor) -> Tensor:
    """Population variance of each example over all its non-batch dims, float64: (B, ...) -> (B,)."""
    return t.detach().double().flatten(1).var(dim=1, correction=0)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, NaN where den is 0 (undefined rather than inf)."""
    return torch.where(den > 0, num / den, torch.nan)


def band_edges(n_mels: int, bands: Sequence[Band] = DEFAULT_BANDS) -> list[tuple[int, int]]:
    """Contiguous segments of the frequency-weight table: each band and each gap between them.

    For 128 bins and the default bands: ``[(0, 26), (26, 38), (38, 90), (90, 102), (102, 128)]``.
    Bands that round to no bins disappear.

    Args:
        n_mels: Number of mel bins.
        bands: ``(start_frac, end_frac, weight)`` triples; see :func:`musicvae.losses.band_bins`.

    Returns:
        Half-open ``(start, stop)`` bin ranges in increasing order, covering ``[0, n_mels)``.
    """
    cuts = sorted({0, n_mels, *(edge for pair in band_bins(n_mels, bands) for edge in pair)})
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]


def range_stats(x_hat: Tensor, x: Tensor, margin: float = RANGE_MARGIN) -> dict[str, Tensor]:
    """Value-range statistics of one batch.

    A value is outside when it lies beyond its own example's band
    ``[min - margin*range, max + margin*range]`` of the input, the band of
    :func:`musicvae.losses.output_range_penalty`.

    Returns:
        0-dim float64 tensors: ``n_outside`` and ``n_values`` (sum over batches),
        ``recon_min``, ``recon_max``, ``input_min``, ``input_max`` (min/max over batches).
    """
    _check_pair(x_hat, x)
    flat_hat, flat = x_hat.detach().double().flatten(1), x.detach().double().flatten(1)  # (B, N)
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)  # (B, 1)
    low, high = range_band(lo, hi, margin)
    outside = (flat_hat < low) | (flat_hat > high)
    return {
        "n_outside": outside.sum().double(),
        "n_values": torch.tensor(float(flat.numel()), dtype=torch.float64, device=x.device),
        "recon_min": flat_hat.min(),
        "recon_max": flat_hat.max(),
        "input_min": lo.min(),
        "input_max": hi.max(),
    }


def band_variances(x_hat: Tensor, x: Tensor, edges: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """Per-example variance within each band, of the reconstruction and of the input.

    Each example is centred on its own band mean: the variance runs over the band's
    bins x time of that example, so a level offset does not count as detail.

    Returns:
        ``(recon_var, input_var)``, float64, each ``(B, n_bands)``.
    """
    _check_pair(x_hat, x)
    recon = torch.stack([_example_variance(x_hat[..., a:b, :]) for a, b in edges], dim=1)
    target = torch.stack([_example_variance(x[..., a:b, :]) for a, b in edges], dim=1)
    return recon, target


def band_variance_ratio(x_hat: Tensor, x: Tensor, edges: Sequence[tuple[int, int]]) -> Tensor:
    """Sum over examples of the reconstruction's band variance over the same sum for the input.

    1.0 is perfect; well below 1 means detail is missing: a blur keeps a band's energy
    but not its variance. A ratio of sums, so adding sums across batches is exact.

    Returns:
        ``(n_bands,)`` float64; NaN for a band with no input variance at all.
    """
    recon, target = band_variances(x_hat, x, edges)
    return _ratio(recon.sum(dim=0), target.sum(dim=0))


def silent_mask(x: Tensor, eps: float = SILENT_VARIANCE) -> Tensor:
    """``(B,)`` bool: inputs whose variance over frequency and time is at most ``eps``."""
    return _example_variance(x) <= eps


def featureless_mask(x_hat: Tensor, x: Tensor, threshold: float = FEATURELESS_THRESHOLD) -> Tensor:
    """``(B,)`` bool: reconstructions whose variance over frequency and time is below
    ``threshold`` times their input's (see :data:`FEATURELESS_THRESHOLD`).

    Silent inputs (:func:`silent_mask`) are never flagged: a flat copy of silence is right.
    """
    _check_pair(x_hat, x)
    return (_example_variance(x_hat) < threshold * _example_variance(x)) & ~silent_mask(x)


def spectral_convergence(x_hat: Tensor, x: Tensor, std: float) -> Tensor:
    """``||S - S_hat||_F / ||S||_F`` per example, on linear mel magnitudes ``S = exp(log_power / 2)``.

    ``log_power = x * std + mean``; a scalar ``mean`` is a common gain ``exp(mean / 2)``
    of both magnitudes and cancels, so only ``std`` is needed. Each example is also
    scaled by ``exp(-max)`` of its input's half log power, which cancels too but keeps
    ``exp`` from overflowing.

    Returns:
        ``(B,)`` float64; the metric class averages it over examples (Arik et al. 2019
        report it per utterance).
    """
    _check_pair(x_hat, x)
    half = x.detach().double().flatten(1) * (std / 2)  # (B, N) half log power, less mean/2
    half_hat = x_hat.detach().double().flatten(1) * (std / 2)
    shift = half.amax(dim=1, keepdim=True)
    mag, mag_hat = (half - shift).exp(), (half_hat - shift).exp()
    return torch.linalg.vector_norm(mag - mag_hat, dim=1) / torch.linalg.vector_norm(mag, dim=1)


def log_spectral_distance(x_hat: Tensor, x: Tensor, std: float) -> Tensor:
    """Log-spectral distance in dB, per example: the mean over frames of each frame's
    ``sqrt(mean over bins of (10 log10 P - 10 log10 P_hat)^2)``.

    ``10 log10 P = (10 / ln 10) * (x * std + mean)``: ``mean`` cancels in the difference.

    Returns:
        ``(B,)`` float64.
    """
    _check_pair(x_hat, x)
    diff_db = (x.detach().double() - x_hat.detach().double()) * (std * _DB_PER_NEPER)
    diff_db = diff_db.reshape(x.shape[0], *x.shape[-2:])  # (B, [1,] n_mels, T) -> (B, n_mels, T)
    return diff_db.pow(2).mean(dim=1).sqrt().mean(dim=1)  # (B, n_mels, T) -> (B, T) -> (B,)


def band_ratio_error(ratios: Tensor) -> Tensor:
    """The worst band's distance from 1 on a log scale, ``max |log ratio|``: a ratio of 0.5 and one of 2
    are equally wrong. A NaN ratio (a band without input variance) counts as 1, a ratio of 0 as 1e-12.

    Args:
        ratios: ``(n_bands,)`` band variance ratios (:func:`band_variance_ratio`).

    Returns:
        0-dim, in the dtype of `ratios`.
    """
    return ratios.nan_to_num(nan=1.0).clamp_min(1e-12).log().abs().max()


def posterior_mean_variance(mu_sum: Tensor, mu_sq_sum: Tensor, count: Tensor | float) -> Tensor:
    """Variance over the data of each posterior mean, ``E[mu^2] - E[mu]^2``: float64 ``(D,)``."""
    mean = mu_sum.double() / count
    return (mu_sq_sum.double() / count - mean.pow(2)).clamp_min(0.0)  # rounding can dip below 0


def active_units(mu_sum: Tensor, mu_sq_sum: Tensor, count: Tensor | float,
                 threshold: float = ACTIVE_UNIT_THRESHOLD) -> Tensor:
    """0-dim int64 count of latent dims whose posterior-mean variance exceeds ``threshold``
    (Burda et al. 2016), from the sums over examples of ``mu`` and ``mu ** 2`` (each ``(D,)``).
    """
    return (posterior_mean_variance(mu_sum, mu_sq_sum, count) > threshold).sum()


class ReconstructionDiagnostics(Metric):
    """Epoch diagnostics of reconstructions against their inputs; ``update(x_hat, x)``.

    ``compute()`` returns 0-dim float64 tensors:
    ``range_frac_outside``, ``recon_min``, ``recon_max``, ``input_min``, ``input_max``
    (:func:`range_stats`); ``featureless_frac`` (featureless reconstructions among
    non-silent inputs, NaN if all are silent) and ``silent_frac``; ``mse`` and
    ``weighted_mse`` (element means; weights of ``create_frequency_weights(n_mels, bands)``);
    ``spectral_convergence`` and ``lsd_db`` (means over examples); ``ssim`` (torchmetrics,
    Gaussian 11x11 window; needs ``n_mels, T >= 6``) and ``psnr`` in dB (torchmetrics, per
    example, then the mean; +inf once any example is reconstructed exactly), both with the
    fixed ``data_range``; and ``band_ratio/{start}-{stop}`` per :func:`band_edges` segment.

    Args:
        std: The data's z-score standard deviation (natural-log power per normalised unit).
        n_mels: Number of mel bins.
        bands: Frequency-weight bands; see :func:`band_edges`.
        data_range: Value range for SSIM and PSNR in normalised units, the same for every batch.
        margin: Band widening of :func:`range_stats`.
        featureless_threshold: Variance fraction of :func:`featureless_mask`.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    _SUMS = ("n_examples", "n_values", "n_outside", "n_silent", "n_featureless", "sse", "wse",
             "sc_sum", "lsd_sum", "ssim_sum", "psnr_sum")

    def __init__(self, std: float, n_mels: int = 128, bands: Sequence[Band] = DEFAULT_BANDS,
                 data_range: float = DEFAULT_DATA_RANGE, margin: float = RANGE_MARGIN,
                 featureless_threshold: float = FEATURELESS_THRESHOLD, **kwargs) -> None:
        super().__init__(**kwargs)
        if not (std > 0 and math.isfinite(std)):
            raise ValueError(f"std must be finite and > 0, got {std!r}")
        if not (data_range > 0 and math.isfinite(data_range)):
            raise ValueError(f"data_range must be finite and > 0, got {data_range!r}")
        self.std, self.n_mels, self.data_range = float(std), int(n_mels), float(data_range)
        self.margin, self.featureless_threshold = float(margin), float(featureless_threshold)
        self.edges = band_edges(n_mels, bands)
        self.band_names = [f"{a}-{b - 1}" for a, b in self.edges]  # inclusive bins: (0, 26) -> "0-25"
        self.register_buffer("freq_weight", create_frequency_weights(n_mels, bands), persistent=False)
        zero = torch.tensor(0.0, dtype=torch.float64)
        for name in self._SUMS:
            self.add_state(name, default=zero.clone(), dist_reduce_fx="sum")
        for name, fx, start in (("recon_min", "min", math.inf), ("input_min", "min", math.inf),
                                ("recon_max", "max", -math.inf), ("input_max", "max", -math.inf)):
            self.add_state(name, default=torch.tensor(start, dtype=torch.float64), dist_reduce_fx=fx)
        for name in ("band_num", "band_den"):  # summed recon / input band variances, (n_bands,)
            self.add_state(name, default=torch.zeros(len(self.edges), dtype=torch.float64),
                           dist_reduce_fx="sum")

    def update(self, x_hat: Tensor, x: Tensor) -> None:
        _check_pair(x_hat, x)
        if x.shape[-2] != self.n_mels:
            raise ValueError(f"expected {self.n_mels} mel bins, got {x.shape[-2]}")
        x_hat, x = x_hat.detach().float(), x.detach().float()  # bf16 under autocast -> float32
        stats = range_stats(x_hat, x, self.margin)
        self.n_examples += x.shape[0]
        self.n_values += stats["n_values"]
        self.n_outside += stats["n_outside"]
        for name, pick in (("recon_min", torch.minimum), ("input_min", torch.minimum),
                           ("recon_max", torch.maximum), ("input_max", torch.maximum)):
            setattr(self, name, pick(getattr(self, name), stats[name]))
        self.n_silent += silent_mask(x).sum()
        self.n_featureless += featureless_mask(x_hat, x, self.featureless_threshold).sum()
        self.sse += (x_hat.double() - x.double()).pow(2).sum()
        self.wse += weighted_mse(x_hat, x, self.freq_weight).double() * x.numel()  # batch mean -> sum
        self.sc_sum += spectral_convergence(x_hat, x, self.std).sum()
        self.lsd_sum += log_spectral_distance(x_hat, x, self.std).sum()
        images_hat, images = x_hat.reshape(-1, 1, *x.shape[-2:]), x.reshape(-1, 1, *x.shape[-2:])
        ssim = _ssim(images_hat, images, data_range=self.data_range, reduction="none")  # (B,)
        psnr = _psnr(images_hat, images, data_range=self.data_range, reduction="none", dim=(1, 2, 3))
        self.ssim_sum += ssim.double().sum()
        self.psnr_sum += psnr.double().sum()
        recon_var, input_var = band_variances(x_hat, x, self.edges)  # (B, n_bands) each
        self.band_num += recon_var.sum(dim=0)
        self.band_den += input_var.sum(dim=0)

    def compute(self) -> dict[str, Tensor]:
        n = self.n_examples
        out = {
            "range_frac_outside": self.n_outside / self.n_values,
            "recon_min": self.recon_min,
            "recon_max": self.recon_max,
            "input_min": self.input_min,
            "input_max": self.input_max,
            "featureless_frac": _ratio(self.n_featureless, n - self.n_silent),
            "silent_frac": self.n_silent / n,
            "mse": self.sse / self.n_values,
            "weighted_mse": self.wse / self.n_values,
            "spectral_convergence": self.sc_sum / n,
            "lsd_db": self.lsd_sum / n,
            "ssim": self.ssim_sum / n,
            "psnr": self.psnr_sum / n,
        }
        ratios = _ratio(self.band_num, self.band_den)
        out.update({f"band_ratio/{name}": ratios[i] for i, name in enumerate(self.band_names)})
        return out


class LatentDiagnostics(Metric):
    """Epoch latent usage; ``update(mu, logvar)`` with ``(B, D)`` posterior statistics.

    ``compute()`` returns ``kl_per_dim`` (``(D,)``, nats, mean over examples of
    :func:`musicvae.losses.kl_divergence`), ``kl_nats`` (its sum: nats per example),
    ``mu_var`` (``(D,)``, :func:`posterior_mean_variance`), ``active_units`` (int64,
    :func:`active_units`) and ``active_frac`` (``active_units / D``); float64 but the count.

    Args:
        latent_dim: D.
        active_threshold: Posterior-mean variance a unit must exceed to be active.
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, latent_dim: int, active_threshold: float = ACTIVE_UNIT_THRESHOLD, **kwargs) -> None:
        super().__init__(**kwargs)
        self.latent_dim, self.active_threshold = int(latent_dim), float(active_threshold)
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        zeros = torch.zeros(self.latent_dim, dtype=torch.float64)
        for name in ("kl_sum", "mu_sum", "mu_sq_sum"):
            self.add_state(name, default=zeros.clone(), dist_reduce_fx="sum")

    def update(self, mu: Tensor, logvar: Tensor) -> None:
        if mu.dim() != 2 or mu.shape[1] != self.latent_dim:
            raise ValueError(f"expected mu of shape (B, {self.latent_dim}), got {tuple(mu.shape)}")
        mu, logvar = mu.detach(), logvar.detach()
        self.count += mu.shape[0]
        self.kl_sum += kl_divergence(mu, logvar).double().sum(dim=0)  # (B, D) -> (D,)
        self.mu_sum += mu.double().sum(dim=0)
        self.mu_sq_sum += mu.double().pow(2).sum(dim=0)

    def compute(self) -> dict[str, Tensor]:
        kl_per_dim = self.kl_sum / self.count
        active = active_units(self.mu_sum, self.mu_sq_sum, self.count, self.active_threshold)
        return {
            "kl_per_dim": kl_per_dim,
            "kl_nats": kl_per_dim.sum(),
            "mu_var": posterior_mean_variance(self.mu_sum, self.mu_sq_sum, self.count),
            "active_units": active,
            "active_frac": active.double() / self.latent_dim,
        }


# --- Realism: how far a set of outputs is, as a distribution, from real music --------------------
# A per-band gain can match every band's variance without making a single frame more like music,
# so realism is judged on distributions, the way FID judges images (Heusel et al. 2017,
# arXiv:1706.08500): Gaussian fits of 128-bin mel frames, and of their frame-to-frame differences,
# where a smeared onset shows up as too little and wrongly shaped change. torchmetrics'
# FrechetInceptionDistance computes the same distance but only on features of its image network;
# the formula itself is a few lines.


def mel_frames(x: Tensor) -> Tensor:
    """Every frame of every example as a row: ``(B, [1,] M, T)`` -> ``(B * T, M)``."""
    x = x.reshape(x.shape[0], *x.shape[-2:])
    return x.transpose(1, 2).reshape(-1, x.shape[1])


def frame_differences(x: Tensor) -> Tensor:
    """Frame-to-frame changes ``x[..., t + 1] - x[..., t]`` as rows: ``(B, [1,] M, T)`` -> ``(B * (T-1), M)``."""
    x = x.reshape(x.shape[0], *x.shape[-2:])
    return mel_frames(x[..., 1:] - x[..., :-1])


#: The two views realism is measured on, by name (val/realism_frames, val/realism_differences).
REALISM_VIEWS = {"frames": mel_frames, "differences": frame_differences}


def frechet_distance(mean_a: Tensor, cov_a: Tensor, mean_b: Tensor, cov_b: Tensor) -> float:
    """Squared Fréchet (2-Wasserstein) distance between two Gaussians, float64.

    ``|m_a - m_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2)``; the last trace from the
    eigenvalues of a symmetric PSD matrix, so no complex square root is needed.
    """
    mean_a, cov_a, mean_b, cov_b = (t.double() for t in (mean_a, cov_a, mean_b, cov_b))
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


class GaussianFit(Metric):
    """Mean and covariance of the rows given to ``update(rows)`` (``(N, D)``), from float64 sums.

    ``compute()`` returns ``(mean (D,), cov (D, D))`` (population covariance) and ``count`` rows.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, dim: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("outer", default=torch.zeros(dim, dim, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, rows: Tensor) -> None:
        rows = rows.detach().double()
        self.count += rows.shape[0]
        self.total += rows.sum(dim=0)
        self.outer += rows.T @ rows

    def compute(self) -> dict[str, Tensor]:
        mean = self.total / self.count
        return {"mean": mean, "cov": self.outer / self.count - torch.outer(mean, mean), "count": self.count}


def gaussian_distance(a: GaussianFit, b: GaussianFit) -> float:
    """:func:`frechet_distance` between two fits."""
    fa, fb = a.compute(), b.compute()
    return frechet_distance(fa["mean"], fa["cov"], fb["mean"], fb["cov"])
