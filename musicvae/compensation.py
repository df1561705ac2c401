"""Variance compensation: a per-bin gain that gives blurred reconstructions their detail back,
at a known cost in MSE.

A decoder trained for MSE outputs the conditional mean of the input given its code. Its
within-band variance is the input's minus the error, so at this compression every band keeps
only a fraction r of its detail (the band variance ratio of ``musicvae.metrics``). Scaling each
example's deviations from its own band mean by ``g`` raises that ratio to ``g^2 r`` and, because
the MSE-optimal output is uncorrelated with its error, costs exactly ``(g - 1)^2 r V`` of squared
error (V: the band's input variance): the cheapest way to a ratio t at a fixed code, paying
``(sqrt(t) - sqrt(r))^2 V`` (Blau & Michaeli 2018, arXiv:1711.06077; Freirich et al. 2021,
arXiv:2110.10262: restoring the variance costs at most twice the minimum MSE).

The output at strength ``alpha`` is ``m + (1 + alpha (g - 1)) (x_hat - m)``, with ``m`` each
example's mean of ``x_hat`` over its band's bins and frames, the centring of the band ratio.
``alpha = 0`` is the plain decoder output. The gain curve ``g`` (one value per mel bin, smooth
across bins) is fitted on validation recordings by :func:`fit_gain`; :class:`CompensationStats`
gathers, in one pass, sums from which the band ratios and the MSE at every alpha follow exactly
(:func:`compensation_curve`), so the perceptual point (the smallest alpha putting every band at
``target`` or more, :func:`perceptual_alpha`) is chosen without decoding again.

Shapes: reconstructions and inputs are ``(B, 1, n_mels, T)`` or ``(B, n_mels, T)``; ``edges``
are the half-open bin ranges of :func:`musicvae.metrics.band_edges`, covering every bin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

#: The band ratio every validation band must reach at the perceptual point (the lower end of the
#: quality goal [0.9, 1.1] of docs/quality.md).
PERCEPTUAL_TARGET = 0.9
#: Strengths tried for the perceptual point: steps of 0.01 (the curve is exact and cheap).
ALPHA_GRID = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
#: Gaussian smoothing of the log-gain across mel bins, in bins: neighbouring mel bins overlap by
#: half a filter, so a gain that jumps from bin to bin would be fitting noise in the ratio.
SMOOTH_BINS = 2.0
#: Gains are kept within [1 / MAX_GAIN, MAX_GAIN]: a bin whose reconstruction is nearly flat (a
#: silent band, a dead output) would otherwise get an enormous gain of its noise.
MAX_GAIN = 4.0


def _bins(t: Tensor) -> Tensor:
    """``(B, [1,] M, T)`` -> ``(B, M, T)`` float64 view of the values."""
    return t.detach().double().reshape(t.shape[0], *t.shape[-2:])


def band_centres(x: Tensor, edges: Sequence[tuple[int, int]]) -> Tensor:
    """Each example's mean over each band's bins and frames, repeated per bin: ``(B, M, 1)``."""
    x = x.reshape(x.shape[0], *x.shape[-2:])  # (B, [1,] M, T) -> (B, M, T)
    parts = [x[:, a:b].mean(dim=(1, 2), keepdim=True).expand(-1, b - a, 1) for a, b in edges]
    return torch.cat(parts, dim=1)


def strength_gain(gain: Tensor, alpha: float | Tensor) -> Tensor:
    """The per-bin gain at strength ``alpha``: ``1 + alpha (gain - 1)``."""
    return 1.0 + alpha * (gain - 1.0)


def compensate(x_hat: Tensor, gain: Tensor, alpha: float, edges: Sequence[tuple[int, int]]) -> Tensor:
    """``x_hat`` with each example's deviations from its band means scaled per bin.

    Args:
        x_hat: decoded normalised log-mels, ``(B, 1, M, T)`` or ``(B, M, T)``.
        gain: ``(M,)`` gain curve from :func:`fit_gain`.
        alpha: strength in [0, 1]; 0 returns ``x_hat`` itself.
        edges: band edges (:func:`musicvae.metrics.band_edges`) for the centring.

    Returns:
        A tensor shaped and typed like ``x_hat``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if alpha == 0.0:
        return x_hat
    flat = x_hat.reshape(x_hat.shape[0], *x_hat.shape[-2:])  # (B, M, T)
    centre = band_centres(flat, edges)
    g = strength_gain(gain.to(flat), alpha)[:, None]  # (M,) -> (M, 1)
    return (centre + g * (flat - centre)).reshape(x_hat.shape)


def compensation_sums(x_hat: Tensor, x: Tensor, edges: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
    """One batch's sums for :func:`compensation_curve` (float64).

    With ``d = x_hat - m(x_hat)`` and ``e = x - m(x)`` (deviations from each example's band means):
    ``recon_energy`` (M,) = sum of ``d^2``; ``input_energy`` (M,) = sum of ``e^2``; ``cross`` (M,) =
    sum of ``(x_hat - x) d``; ``gram`` (M, M) = sum over examples of ``D D^T`` where ``D`` (M,) is the
    example's sum of ``d`` over frames; ``sse`` = sum of ``(x_hat - x)^2``; ``n_examples``, ``n_values``.
    """
    x_hat, x = _bins(x_hat), _bins(x)
    d = x_hat - band_centres(x_hat, edges)
    e = x - band_centres(x, edges)
    frame_sums = d.sum(dim=2)  # (B, M, T) -> (B, M)
    return {"recon_energy": d.pow(2).sum(dim=(0, 2)), "input_energy": e.pow(2).sum(dim=(0, 2)),
            "cross": ((x_hat - x) * d).sum(dim=(0, 2)), "gram": frame_sums.T @ frame_sums,
            "sse": (x_hat - x).pow(2).sum(), "n_examples": torch.tensor(float(x.shape[0]), dtype=torch.float64),
            "n_values": torch.tensor(float(x.numel()), dtype=torch.float64)}


def fit_gain(recon_energy: Tensor, input_energy: Tensor, smooth_bins: float = SMOOTH_BINS,
             max_gain: float = MAX_GAIN) -> Tensor:
    """The gain curve that restores each bin's energy about its band means: ``(M,)`` float32.

    ``sqrt(input_energy / recon_energy)`` per bin, smoothed as a log-gain with a Gaussian of
    ``smooth_bins`` bins (edges reflected) and clamped to ``[1/max_gain, max_gain]``; 1 where a
    bin has no energy on either side.
    """
    recon, target = recon_energy.double(), input_energy.double()
    known = (recon > 0) & (target > 0)
    log_gain = torch.where(known, 0.5 * (target.clamp_min(1e-300).log() - recon.clamp_min(1e-300).log()),
                           torch.zeros_like(recon))
    log_gain = log_gain.clamp(-math.log(max_gain), math.log(max_gain))
    if smooth_bins > 0 and len(log_gain) > 1:
        radius = min(int(math.ceil(3 * smooth_bins)), len(log_gain) - 1)
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (offsets / smooth_bins) ** 2)
        padded = torch.nn.functional.pad(log_gain[None, None], (radius, radius), mode="reflect")
        log_gain = torch.nn.functional.conv1d(padded, (kernel / kernel.sum())[None, None])[0, 0]
    return log_gain.exp().float()


def compensation_curve(sums: dict[str, Tensor], gain: Tensor, edges: Sequence[tuple[int, int]],
                       alphas: Tensor = ALPHA_GRID) -> dict[str, Tensor]:
    """Band ratios and MSE of the compensated output at each strength, exactly, from the sums.

    With ``g`` the gain at a strength: a band's summed output variance is
    ``(sum_f g_f^2 S_f - g^T G g / n_b) / n_b`` (the second term is the shift of the band mean when
    ``g`` varies inside the band) against the input's ``sum_f E_f / n_b``; the squared error is
    ``sse + 2 sum_f (g_f - 1) C_f + sum_f (g_f - 1)^2 S_f``.

    Args:
        sums: :func:`compensation_sums` added over a data set (or ``CompensationStats.compute()``).
        gain: ``(M,)`` gain curve.
        edges: band edges.
        alphas: ``(A,)`` strengths.

    Returns:
        ``alpha`` (A,), ``band_ratio`` (A, n_bands) (NaN for a band without input variance),
        ``mse`` (A,), and ``bound_mse`` (A,): the least MSE any per-band gain on the alpha = 0
        output can reach at those band ratios, ``mse(0) + sum_b (sqrt(t_b) - sqrt(r_b))^2 V_b / n``,
        which an MSE-optimal decoder meets exactly.
    """
    alphas = alphas.double()
    recon, target, cross, gram = (sums[k].double() for k in ("recon_energy", "input_energy", "cross", "gram"))
    n_values, n_examples = float(sums["n_values"]), float(sums["n_examples"])
    frames = n_values / (n_examples * len(recon))
    g = strength_gain(gain.double()[None, :], alphas[:, None])  # (A, M)
    ratios = []
    for a, b in edges:
        n_b = (b - a) * frames
        gb = g[:, a:b]
        out = (gb.pow(2) * recon[a:b]).sum(dim=1) - torch.einsum("ai,ij,aj->a", gb, gram[a:b, a:b], gb) / n_b
        den = target[a:b].sum()
        ratios.append(out / den if den > 0 else torch.full_like(out, math.nan))
    band_ratio = torch.stack(ratios, dim=1)  # (A, n_bands)
    sse = sums["sse"].double() + 2 * ((g - 1) * cross).sum(dim=1) + ((g - 1).pow(2) * recon).sum(dim=1)
    mse = sse / n_values
    base = band_ratio[0:1] if float(alphas[0]) == 0.0 else compensation_curve(sums, gain, edges, alphas[:1] * 0)["band_ratio"]
    band_input = torch.stack([target[a:b].sum() for a, b in edges])  # (n_bands,) V_b * n
    extra = ((band_ratio.clamp_min(0).sqrt() - base.clamp_min(0).sqrt()).pow(2) * band_input).nan_to_num().sum(dim=1)
    bound = (sums["sse"].double() + extra) / n_values
    return {"alpha": alphas, "band_ratio": band_ratio, "mse": mse, "bound_mse": bound}


def perceptual_alpha(curve: dict[str, Tensor], target: float = PERCEPTUAL_TARGET) -> tuple[float, bool]:
    """The smallest strength at which every band's ratio is at least ``target``.

    Bands without input variance (NaN) are ignored. Returns ``(alpha, reached)``; when no
    strength of the curve reaches the target, the strength with the highest lowest-band ratio and
    ``False``.
    """
    ratios = curve["band_ratio"].nan_to_num(nan=math.inf)
    lowest = ratios.min(dim=1).values  # (A,)
    ok = (lowest >= target).nonzero()
    if len(ok):
        return float(curve["alpha"][int(ok[0])]), True
    return float(curve["alpha"][int(lowest.argmax())]), False


def fit_compensation_curve(sums: dict[str, Tensor], edges: Sequence[tuple[int, int]],
                           target: float = PERCEPTUAL_TARGET) -> dict:
    """From a validation pass's sums: the gain curve, its perceptual point and the exact curve.

    Returns:
        ``gain`` (M,), ``alpha`` (rounded to the grid's 0.01), ``reached`` (every band at `target`)
        and ``curve`` (:func:`compensation_curve` on ALPHA_GRID).
    """
    gain = fit_gain(sums["recon_energy"], sums["input_energy"])
    curve = compensation_curve(sums, gain, edges)
    alpha, reached = perceptual_alpha(curve, target)
    return {"gain": gain, "alpha": round(alpha, 6), "reached": reached, "curve": curve}


class CompensationStats(Metric):
    """The sums of :func:`compensation_sums` over an epoch; ``update(x_hat, x)``, exact under DDP.

    ``compute()`` returns the summed dict, ready for :func:`fit_gain` and :func:`compensation_curve`.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, n_mels: int, edges: Sequence[tuple[int, int]], **kwargs) -> None:
        super().__init__(**kwargs)
        self.edges = list(edges)
        vector = torch.zeros(n_mels, dtype=torch.float64)
        for name in ("recon_energy", "input_energy", "cross"):
            self.add_state(name, default=vector.clone(), dist_reduce_fx="sum")
        self.add_state("gram", default=torch.zeros(n_mels, n_mels, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("sse", "n_examples", "n_values"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x_hat: Tensor, x: Tensor) -> None:
        for name, value in compensation_sums(x_hat, x, self.edges).items():
            setattr(self, name, getattr(self, name) + value.to(self.sse.device))

    def compute(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in
                ("recon_energy", "input_energy", "cross", "gram", "sse", "n_examples", "n_values")}


def compensation_defaults(n_mels: int) -> dict[str, torch.Tensor]:
    """The compensation buffers of a model that has not been validated yet: no gain, strength 0."""
    return {"output_gain": torch.ones(n_mels), "output_alpha": torch.tensor(0.0), "gain_fitted": torch.tensor(False)}


def with_compensation_defaults(state_dict: dict, n_mels: int) -> dict:
    """`state_dict` with the compensation buffers added where a checkpoint predates them (in place)."""
    for name, value in compensation_defaults(n_mels).items():
        state_dict.setdefault(name, value)
    return state_dict
