"""Loss functions for the spectrogram VAE: plain tensor functions, no Lightning.

Spectrograms are ``(B, 1, n_mels, T)`` or ``(B, n_mels, T)``: the mel axis is always
dim -2 and time dim -1. Latent statistics ``mu`` and ``logvar`` are ``(B, D)``.

Every function casts its inputs to float32 first: under bf16 autocast ``torch.fft``
rejects bf16 and sums over ~10^5 elements lose too many bits in bf16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Band = tuple[float, float, float]  # (start_frac, end_frac, weight)

# From the seed notebook: fundamentals sit low (1.5x), harmonics mid-high (2.0x),
# and the top 20 % of mel bins is mostly noise (0.8x). The gaps keep weight 1.0.
DEFAULT_BANDS: tuple[Band, ...] = ((0.0, 0.2, 1.5), (0.3, 0.7, 2.0), (0.8, 1.0, 0.8))


def _round_half_up(value: float) -> int:
    # Python's round() rounds half to even (round(2.5) == 2); band edges must not
    # depend on parity, so use floor(x + 0.5).
    return math.floor(value + 0.5)


def band_bins(n_mels: int, bands: Sequence[Band] = DEFAULT_BANDS) -> list[tuple[int, int]]:
    """Mel-bin ranges covered by each band.

    Args:
        n_mels: Number of mel bins, at least 1.
        bands: ``(start_frac, end_frac, weight)`` triples with
            ``0 <= start_frac < end_frac <= 1``, weights ``>= 0``, not overlapping.

    Returns:
        One half-open ``(start, stop)`` bin range per band, in the order given:
        ``[round_half_up(start_frac * n_mels), round_half_up(end_frac * n_mels))``.

    Raises:
        ValueError: If ``n_mels < 1`` or a band is malformed or overlaps another.
    """
    if int(n_mels) != n_mels or n_mels < 1:
        raise ValueError(f"n_mels must be a positive integer, got {n_mels!r}")
    for i, band in enumerate(bands):
        if len(band) != 3:
            raise ValueError(f"band {i} {band!r} must be (start_frac, end_frac, weight)")
        start, end, weight = band
        if not (0.0 <= start < end <= 1.0):
            raise ValueError(f"band {i} {band!r} needs 0 <= start_frac < end_frac <= 1")
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"band {i} {band!r} needs a finite weight >= 0")
        for j, other in enumerate(bands[:i]):
            if start < other[1] and other[0] < end:
                raise ValueError(f"band {i} {band!r} overlaps band {j} {tuple(other)!r}")
    # Rounding is monotonic, so bands disjoint as fractions stay disjoint as bins.
    return [(_round_half_up(s * n_mels), _round_half_up(e * n_mels)) for s, e, _ in bands]


def create_frequency_weights(
    n_mels: int = 128,
    bands: Sequence[Band] = DEFAULT_BANDS,
    default_weight: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-mel-bin loss weights that emphasise fundamentals and harmonics.

    For 128 bins and the default bands: bins 0-25 get 1.5, 38-89 get 2.0,
    102-127 get 0.8 and the rest ``default_weight``.

    Args:
        n_mels: Number of mel bins, at least 1.
        bands: ``(start_frac, end_frac, weight)`` triples; see :func:`band_bins`.
        default_weight: Weight of bins outside every band, ``>= 0``.
        device: Device of the returned tensor.
        dtype: Dtype of the returned tensor.

    Returns:
        Weights of shape ``(n_mels,)``.

    Raises:
        ValueError: If ``n_mels``, a band or ``default_weight`` is invalid.
    """
    if not (default_weight >= 0 and math.isfinite(default_weight)):
        raise ValueError(f"default_weight must be finite and >= 0, got {default_weight!r}")
    weights = torch.full((n_mels,), float(default_weight), device=device, dtype=dtype)
    for (start, stop), (_, _, weight) in zip(band_bins(n_mels, bands), bands):
        weights[start:stop] = weight
    return weights


def _check_pair(x_hat: Tensor, x: Tensor) -> None:
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat shape {tuple(x_hat.shape)} != x shape {tuple(x.shape)}")
    if x.dim() < 3:
        raise ValueError(f"expected (B, [1,] n_mels, T) spectrograms, got shape {tuple(x.shape)}")


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL divergence of N(mu, exp(logvar)) from N(0, I), per example and dimension.

    Args:
        mu: Posterior means, ``(B, D)``.
        logvar: Posterior log-variances, ``(B, D)``.

    Returns:
        KL in nats, float32, ``(B, D)``.

    Raises:
        ValueError: If the shapes differ.
    """
    if mu.shape != logvar.shape:
        raise ValueError(f"mu shape {tuple(mu.shape)} != logvar shape {tuple(logvar.shape)}")
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())


def _kl_terms(mu: Tensor, logvar: Tensor, x: Tensor, free_bits: float = 0.0) -> tuple[Tensor, Tensor]:
    per_dim = kl_divergence(mu, logvar).mean(dim=0)  # (B, D) -> (D,), nats per example
    kl_nats = per_dim.sum()
    # Free bits (Kingma et al. 2016, arXiv:1606.04934, eq. 15): a dimension's KL below `free_bits`
    # nats is not penalised, so the optimiser has no reason to switch that dimension off.
    # kl_nats itself stays the true KL, for logging.
    penalised = per_dim.clamp_min(free_bits).sum() if free_bits > 0 else kl_nats
    # Normalised beta (Higgins et al. 2017, beta-VAE): divide by the elements per
    # example so beta weighs KL against a per-element mean reconstruction error.
    return penalised / x[0].numel(), kl_nats


def vae_loss(
    x_hat: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, beta: float = 0.1, free_bits: float = 0.0
) -> dict[str, Tensor]:
    """Plain VAE loss: element-mean MSE plus beta times per-element KL.

    Args:
        x_hat: Reconstruction, ``(B, 1, n_mels, T)`` or ``(B, n_mels, T)``.
        x: Input, same shape as ``x_hat``.
        mu: Posterior means, ``(B, D)``.
        logvar: Posterior log-variances, ``(B, D)``.
        beta: Weight of the KL term.
        free_bits: Nats per latent dimension (batch mean) below which its KL is not
            penalised (0: plain KL).

    Returns:
        0-dim float32 tensors: ``loss`` (= recon + beta * kl), ``recon`` and ``mse``
        (both the MSE over all elements), ``kl_nats`` (KL summed over latent dims,
        averaged over the batch) and ``kl`` (the penalised KL, i.e. ``kl_nats`` after
        free bits, divided by the number of elements per example).

    Raises:
        ValueError: If shapes do not match.
    """
    _check_pair(x_hat, x)
    mse = F.mse_loss(x_hat.float(), x.float())
    kl, kl_nats = _kl_terms(mu, logvar, x, free_bits)
    return {"loss": mse + beta * kl, "recon": mse, "kl": kl, "kl_nats": kl_nats, "mse": mse}


def spectral_loss(x_hat: Tensor, x: Tensor) -> Tensor:
    """MSE between 2-D FFT magnitudes over the (mel, time) axes.

    ``norm="ortho"`` makes the FFT unitary, so by Parseval its values are on the
    same per-element scale as the spectrogram MSE.

    Args:
        x_hat: Reconstruction, ``(B, 1, n_mels, T)`` or ``(B, n_mels, T)``.
        x: Input, same shape as ``x_hat``.

    Returns:
        0-dim float32 tensor.

    Raises:
        ValueError: If shapes do not match.
    """
    _check_pair(x_hat, x)
    mag_hat = torch.fft.fft2(x_hat.float(), dim=(-2, -1), norm="ortho").abs()
    mag = torch.fft.fft2(x.float(), dim=(-2, -1), norm="ortho").abs()
    return F.mse_loss(mag_hat, mag)


#: How far past an input's own range an output may go before it counts as out of range: half the
#: range on each side (the notebook's output-range penalty); the diagnostics judge by the same band.
RANGE_MARGIN = 0.5


def range_band(lo: Tensor, hi: Tensor, margin: float = RANGE_MARGIN) -> tuple[Tensor, Tensor]:
    """The band ``[lo - margin*(hi-lo), hi + margin*(hi-lo)]`` around an input range: the one rule
    the output-range penalty, the validation diagnostics and the prior-sample scores share."""
    spread = margin * (hi - lo)
    return lo - spread, hi + spread


def output_range_penalty(x_hat: Tensor, x: Tensor, margin: float = RANGE_MARGIN) -> Tensor:
    """Squared excess of ``x_hat`` outside each example's widened input range.

    Each example's band is ``[min - margin*range, max + margin*range]`` of its own
    input, so a quiet clip is not judged by the range of a loud one in the batch.

    Args:
        x_hat: Reconstruction, ``(B, 1, n_mels, T)`` or ``(B, n_mels, T)``.
        x: Input, same shape as ``x_hat``; no gradient flows into it.
        margin: Band widening as a fraction of the input's range.

    Returns:
        0-dim float32 tensor: mean of the squared excess over all elements.

    Raises:
        ValueError: If shapes do not match.
    """
    _check_pair(x_hat, x)
    x_hat = x_hat.float()
    with torch.no_grad():
        flat = x.float().flatten(1)  # (B, ...) -> (B, N)
        lo, hi = range_band(flat.amin(dim=1), flat.amax(dim=1), margin)  # (B,)
        view = (-1,) + (1,) * (x.dim() - 1)  # broadcast (B,) over the non-batch dims
        lo, hi = lo.view(view), hi.view(view)
    excess = F.relu(x_hat - hi) + F.relu(lo - x_hat)
    return excess.pow(2).mean()


def weighted_mse(x_hat: Tensor, x: Tensor, freq_weight: Tensor) -> Tensor:
    """MSE with each mel bin's squared error scaled by its weight.

    The weights are used as given, not renormalised, so a weight of 2.0 doubles a
    bin's contribution to the element mean.

    Args:
        x_hat: Reconstruction, ``(B, 1, n_mels, T)`` or ``(B, n_mels, T)``.
        x: Input, same shape as ``x_hat``.
        freq_weight: Per-bin weights, ``(n_mels,)``.

    Returns:
        0-dim float32 tensor.

    Raises:
        ValueError: If shapes do not match or ``freq_weight`` is not ``(n_mels,)``.
    """
    _check_pair(x_hat, x)
    n_mels = x.shape[-2]
    if freq_weight.dim() != 1 or freq_weight.shape[0] != n_mels:
        raise ValueError(
            f"freq_weight shape {tuple(freq_weight.shape)} != (n_mels,) = ({n_mels},)"
        )
    weight = freq_weight.to(device=x.device, dtype=torch.float32).unsqueeze(-1)  # (n_mels, 1)
    return ((x_hat.float() - x.float()).pow(2) * weight).mean()


def vae_loss_spectral(
    x_hat: Tensor,
    x: Tensor,
    mu: Tensor,
    logvar: Tensor,
    beta: float = 0.1,
    freq_weight: Tensor | None = None,
    spectral_weight: float = 0.1,
    output_reg_weight: float = 0.01,
    free_bits: float = 0.0,
) -> dict[str, Tensor]:
    """VAE loss of the seed notebook's improved training.

    ``loss = recon + beta*kl + spectral_weight*spectral + output_reg_weight*output_reg``.

    Args:
        x_hat: Reconstruction, ``(B, 1, n_mels, T)`` or ``(B, n_mels, T)``.
        x: Input, same shape as ``x_hat``.
        mu: Posterior means, ``(B, D)``.
        logvar: Posterior log-variances, ``(B, D)``.
        beta: Weight of the per-element KL term.
        freq_weight: Per-mel-bin weights ``(n_mels,)``; ``None`` uses
            :func:`create_frequency_weights` with the default bands.
        spectral_weight: Weight of :func:`spectral_loss`.
        output_reg_weight: Weight of :func:`output_range_penalty`.
        free_bits: As in :func:`vae_loss`.

    Returns:
        0-dim float32 tensors: ``loss``, ``recon`` (frequency-weighted MSE), ``kl``,
        ``kl_nats`` (as in :func:`vae_loss`), ``spectral``, ``output_reg`` and
        ``mse`` (unweighted, so runs with different losses share one number).

    Raises:
        ValueError: If shapes do not match.
    """
    _check_pair(x_hat, x)
    if freq_weight is None:
        freq_weight = create_frequency_weights(x.shape[-2], device=x.device)
    recon = weighted_mse(x_hat, x, freq_weight)
    kl, kl_nats = _kl_terms(mu, logvar, x, free_bits)
    spectral = spectral_loss(x_hat, x)
    output_reg = output_range_penalty(x_hat, x)
    loss = recon + beta * kl + spectral_weight * spectral + output_reg_weight * output_reg
    return {
        "loss": loss,
        "recon": recon,
        "kl": kl,
        "kl_nats": kl_nats,
        "spectral": spectral,
        "output_reg": output_reg,
        "mse": F.mse_loss(x_hat.float(), x.float()),
    }


# --- The adversarial stage (musicvae/training/sharpen.py) ----------------------------------------


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))`` (Lim & Ye 2017, arXiv:1705.02894)."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_generator_loss(fake_logits: Tensor) -> Tensor:
    """``-mean(D(fake))``: the decoder's side of the hinge game."""
    return -fake_logits.mean()


def feature_matching_loss(real_features: list[Tensor], fake_features: list[Tensor]) -> Tensor:
    """Mean over the discriminator's stages of the L1 distance between its features of each real
    segment and of its reconstruction (Larsen et al. 2016; MelGAN, Kumar et al. 2019): a paired
    loss, so it pulls each output toward its own input's texture, not any texture."""
    return torch.stack([(f - r.detach()).abs().mean() for r, f in zip(real_features, fake_features)]).mean()


def adaptive_weight(rec_loss: Tensor, adv_loss: Tensor, last_weight: Tensor, max_weight: float = 1e4
                    ) -> tuple[Tensor, Tensor]:
    """``|grad rec| / (|grad adv| + 1e-4)`` at the decoder's last layer, clamped to [0, max_weight], detached.

    Balances the adversarial term against the reconstruction at the weights they both move, so one
    setting works across data and model sizes (Esser et al. 2021, arXiv:2012.09841, eq. 7).

    Returns:
        ``(weight, adv_grad_norm)``: the weight and ``|grad adv|`` (detached).
    """
    rec_grad = torch.autograd.grad(rec_loss, last_weight, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv_loss, last_weight, retain_graph=True)[0]
    adv_norm = adv_grad.norm().detach()
    return (rec_grad.norm() / (adv_norm + 1e-4)).clamp(0.0, max_weight).detach(), adv_norm
