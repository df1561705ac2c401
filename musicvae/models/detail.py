"""Detail the code does not carry, generated to match it: noise filling for an MSE-optimal decoder.

At 1/128 of the input's numbers no decoder is sharp in the MSE sense: the MSE-optimal output is the
conditional mean, and the residual ``x - x_hat`` (the detail the code lost) is what makes music
sound like music. Codecs face the same gap and fill it with noise shaped to what they did keep:
Opus/CELT's band energies with spectral folding, AAC's perceptual noise substitution, RAVE's noise
generator. Here:

- **Energy, predicted from the code.** Each example's mean square residual in each band of
  :func:`musicvae.metrics.band_edges` is predicted by a ridge regression on the log energy (closed
  form, fitted after training on the training windows), then calibrated per band so that the mean
  predicted energy over the training windows equals the mean residual energy there (the exponential
  of a mean log is below the mean; Jensen). The features are any function of the code; musicvae
  uses :func:`window_features`, each band's level and log variance in the window decoded from it:
  on music unlike the training albums they track the residual's energy where the code's own numbers
  do not (docs/quality.md, "Generated detail"), and they are the same few numbers for any decoder.
- **Texture, taken from the residuals** (``source``). ``"exemplar"`` (the default): a whole residual
  window of the training set, drawn at random and divided by its own band RMS, so its harmonic
  lines, onsets and sweeps are real music's: the codecs' spectral folding, or texture synthesis by
  copying whole patches (Efros & Freeman 2001, image quilting), with the code setting only the
  energy. ``"gaussian"``: noise with the residual's mel-bin covariance (each example's residual
  divided by its band's RMS first, so loud windows do not dominate the shape) and a first-order
  autoregression in time per bin with the residual's lag-1 correlation; it matches second moments
  only, and a classifier tells it from music more easily (docs/quality.md, "Generated detail").
- **Strength.** ``x_hat + beta * noise``. The noise is independent of the error, so at ``beta`` the
  MSE grows by ``beta^2`` times the residual energy: at 1 twice the MSE of an MSE-optimal decoder,
  with the input's variance restored, the point Blau & Michaeli 2018 (arXiv:1711.06077) and Freirich
  et al. 2021 (arXiv:2110.10262) show reaches full realism at most at that cost (for a Gaussian
  posterior). ``beta = 0`` returns ``x_hat`` itself.

Buffers only (plain tensors), so a model holding one loads with ``torch.load(weights_only=True)``;
their shapes follow from ``(features, n_mels, n_bands, exemplars, frames)``. Every draw takes a ``torch.Generator``.
Shapes: windows ``(B, [1,] M, T)``, features (codes) ``(B, D)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn

#: Ridge penalty per training window, on standardised features: shrinks the log-energy map towards
#: the mean energy when there are few windows per feature (at thousands of windows it barely acts).
RIDGE = 1e-2
#: Largest lag-1 correlation the noise keeps: a bin that never changes would otherwise be frozen noise.
MAX_RHO = 0.95
#: Added to every energy before its log, relative to the mean energy: a silent window's log stays finite.
ENERGY_FLOOR = 1e-6
#: Added to the bin covariance's diagonal, relative to its mean diagonal, before its Cholesky factor.
SHAPE_JITTER = 1e-5
#: Where the texture comes from (module docstring); the first is the default, the one that measures best.
SOURCES = ("exemplar", "gaussian")
#: Added to a band's variance before its log in window_features (normalised log-mel units): a flat band
#: of a decoded window stays finite, far below any band of music (~0.1 and up).
VARIANCE_FLOOR = 1e-4


def _bins(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], *t.shape[-2:]).double()  # (B, [1,] M, T) -> (B, M, T)


def band_index(edges: Sequence[tuple[int, int]], n_mels: int) -> Tensor:
    """``(M,)`` int64: the band of each mel bin."""
    index = torch.empty(n_mels, dtype=torch.int64)
    for b, (lo, hi) in enumerate(edges):
        index[lo:hi] = b
    return index


def band_energy(residual: Tensor, edges: Sequence[tuple[int, int]]) -> Tensor:
    """Each example's mean square in each band: ``(B, [1,] M, T)`` -> ``(B, n_bands)`` float64."""
    r = _bins(residual)
    return torch.stack([r[:, lo:hi].pow(2).mean(dim=(1, 2)) for lo, hi in edges], dim=1)


def window_features(x_hat: Tensor, edges: Sequence[tuple[int, int]]) -> Tensor:
    """Each decoded window's level and log variance in each band: ``(B, [1,] M, T)`` -> ``(B, 2 n_bands)`` float32."""
    x = _bins(x_hat)
    parts = [torch.stack([x[:, lo:hi].mean(dim=(1, 2)), (x[:, lo:hi].var(dim=(1, 2), correction=0) + VARIANCE_FLOOR).log()],
                         dim=1) for lo, hi in edges]
    return torch.cat(parts, dim=1).float()


class DetailStats:
    """One pass over (features, residual) batches: what :meth:`DetailModel.fit` needs, in float64.

    Keeps every example's features and band energies (small: ``N x (D + n_bands)``) and sums over
    examples and frames for the bin covariance and the lag-1 correlation of the band-normalised residual;
    with `exemplars`, also every band-normalised residual (float16: 32 KiB per 128 x 128 window).
    """

    def __init__(self, n_mels: int, edges: Sequence[tuple[int, int]], exemplars: bool = False) -> None:
        self.edges, self.index = list(edges), band_index(edges, n_mels)
        self.features: list[Tensor] = []
        self.energies: list[Tensor] = []
        self.exemplars: Optional[list[Tensor]] = [] if exemplars else None
        self.outer = torch.zeros(n_mels, n_mels, dtype=torch.float64)
        self.lag = torch.zeros(n_mels, 2, dtype=torch.float64)  # (M, [sum r_t r_{t-1}, sum r_{t-1}^2])
        self.count = 0

    def update(self, features: Tensor, residual: Tensor) -> None:
        r = _bins(residual).cpu()
        energy = band_energy(r, self.edges)  # (B, n_bands)
        self.features.append(features.detach().double().cpu().flatten(1))
        self.energies.append(energy)
        scale = energy.clamp_min(1e-300).sqrt()[:, self.index, None]  # (B, n_bands) -> (B, M, 1)
        unit = torch.where(scale > 0, r / scale, torch.zeros_like(r))
        if self.exemplars is not None:
            self.exemplars.append(unit.half())
        self.outer += torch.einsum("bit,bjt->ij", unit, unit)
        self.lag[:, 0] += (unit[:, :, 1:] * unit[:, :, :-1]).sum(dim=(0, 2))
        self.lag[:, 1] += unit[:, :, :-1].pow(2).sum(dim=(0, 2))
        self.count += r.shape[0] * r.shape[2]


class DetailModel(nn.Module):
    """Per-band detail energy predicted from a code, and noise shaped like the residual.

    Buffers: ``feature_mean (D,)``, ``feature_std (D,)``, ``weights (D, n_bands)``, ``bias (n_bands,)``,
    ``log_range (2, n_bands)`` (the training log energies' extent, widened by one: predictions are
    clamped into it), ``band_of_bin (M,)``, ``scale_tril (M, M)`` (Cholesky factor of the bin
    covariance of the band-normalised residual), ``rho (M,)`` (lag-1 correlation per bin), ``exemplars
    (K, M, frames)`` float16 (band-normalised training residuals; K = 0: the Gaussian source).
    """

    def __init__(self, features: int, n_mels: int, n_bands: int, exemplars: int = 0, frames: int = 0) -> None:
        super().__init__()
        self.register_buffer("exemplars", torch.zeros(exemplars, n_mels, frames, dtype=torch.float16))
        self.register_buffer("feature_mean", torch.zeros(features))
        self.register_buffer("feature_std", torch.ones(features))
        self.register_buffer("weights", torch.zeros(features, n_bands))
        self.register_buffer("bias", torch.zeros(n_bands))
        self.register_buffer("log_range", torch.tensor([[-1.0], [1.0]]).repeat(1, n_bands))
        self.register_buffer("band_of_bin", torch.zeros(n_mels, dtype=torch.int64))
        self.register_buffer("scale_tril", torch.eye(n_mels))
        self.register_buffer("rho", torch.zeros(n_mels))

    @torch.no_grad()
    def fit(self, stats: DetailStats, ridge: float = RIDGE) -> "DetailModel":
        """Closed form from one pass of :class:`DetailStats` (module docstring). Returns self."""
        f, e = torch.cat(stats.features), torch.cat(stats.energies)  # (N, D), (N, n_bands)
        if f.shape[1] != self.weights.shape[0] or e.shape[1] != self.bias.shape[0] or len(f) < 2:
            raise ValueError(f"{len(f)} examples of {f.shape[1]} features and {e.shape[1]} bands; this model takes "
                             f"{self.weights.shape[0]} features, {self.bias.shape[0]} bands and two examples or more")
        mean, std = f.mean(dim=0), f.std(dim=0).clamp_min(1e-12)
        x = (f - mean) / std
        y = (e + ENERGY_FLOOR * e.mean(dim=0).clamp_min(1e-300)).log()  # (N, n_bands)
        gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
        weights = torch.linalg.solve(gram, x.T @ (y - y.mean(dim=0)))  # (D, n_bands)
        fitted = x @ weights + y.mean(dim=0)
        bias = y.mean(dim=0) + (e.mean(dim=0) / fitted.exp().mean(dim=0)).log()  # calibrated: mean energy kept
        cov = stats.outer / stats.count
        jitter = SHAPE_JITTER * float(torch.diagonal(cov).mean().clamp_min(1e-12))
        for name, value in (("feature_mean", mean), ("feature_std", std), ("weights", weights), ("bias", bias),
                            ("log_range", torch.stack([y.min(dim=0).values - 1, y.max(dim=0).values + 1])),
                            ("scale_tril", torch.linalg.cholesky(cov + jitter * torch.eye(len(cov), dtype=cov.dtype))),
                            ("rho", (stats.lag[:, 0] / stats.lag[:, 1].clamp_min(1e-300)).clamp(0.0, MAX_RHO))):
            getattr(self, name).copy_(value)
        self.band_of_bin.copy_(stats.index)
        if len(self.exemplars):
            bank = torch.cat(stats.exemplars or [])
            if bank.shape != self.exemplars.shape:
                raise ValueError(f"{tuple(bank.shape)} exemplars for a model of {tuple(self.exemplars.shape)}")
            self.exemplars.copy_(bank)
        return self

    @property
    def source(self) -> str:
        """Where the texture comes from: "exemplar" (a bank of training residuals) or "gaussian"."""
        return "exemplar" if len(self.exemplars) else "gaussian"

    def energy(self, features: Tensor) -> Tensor:
        """Predicted mean square residual per band: ``(B, D)`` -> ``(B, n_bands)`` float32."""
        x = (features.detach().float().flatten(1).to(self.weights) - self.feature_mean) / self.feature_std
        log = torch.maximum(torch.minimum(x @ self.weights + self.bias, self.log_range[1]), self.log_range[0])
        return log.exp()

    def bin_scale(self, features: Tensor) -> Tensor:
        """Standard deviation of the noise per bin: ``(B, D)`` -> ``(B, M)``."""
        return self.energy(features)[:, self.band_of_bin].sqrt()

    def unit_noise(self, batch: int, frames: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``(batch, M, frames)`` texture of unit energy per band on average: training residuals (the exemplar
        source, see :func:`exemplar_texture`) or stationary noise with the residual's bin covariance and lag-1
        correlation (drawn on the CPU from `generator`, so the same seed gives the same noise on every device)."""
        if len(self.exemplars):
            return exemplar_texture(self.exemplars.detach().cpu(), batch, frames, generator)
        m = self.rho.shape[0]
        tril, rho = self.scale_tril.detach().cpu().float(), self.rho.detach().cpu().float()[None, :]
        # Innovations of the AR(1) carry sqrt(1 - rho^2) of each bin's variance, so every frame has the
        # covariance of the first (exact on the diagonal; off it, close while neighbouring rho are alike).
        w = torch.randn(batch, frames, m, generator=generator) @ tril.T  # (B, T, M)
        out = torch.empty(batch, m, frames)
        state = w[:, 0]
        out[:, :, 0] = state
        for t in range(1, frames):
            state = rho * state + (1 - rho.pow(2)).sqrt() * w[:, t]
            out[:, :, t] = state
        return out

    def noise(self, features: Tensor, frames: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Detail for windows of codes `features`: ``(B, D)`` -> ``(B, M, frames)``, on the features' device."""
        unit = self.unit_noise(features.shape[0], frames, generator).to(features.device)
        return unit * self.bin_scale(features).to(unit)[:, :, None]


def exemplar_texture(bank: Tensor, batch: int, frames: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """``batch`` textures of `frames` frames from a bank ``(K, M, T)`` of unit-energy residual windows.

    At ``frames = T`` each is one window of the bank, drawn at random (with replacement): its structure is
    a real residual's, whole. Longer (a piece) or shorter: windows drawn at random every ``T // 2`` frames,
    cross-faded with a sine window whose squares sum to one, so independent draws keep unit energy.

    Returns:
        ``(batch, M, frames)`` float32 on the CPU.
    """
    k, m, t = bank.shape
    if frames == t:
        return bank[torch.randint(k, (batch,), generator=generator)].float()
    hop = max(t // 2, 1)
    count = frames // hop + 2  # the first starts half a window early, so every frame is covered twice
    picks = torch.randint(k, (count, batch), generator=generator)
    window = torch.sin(torch.pi * (torch.arange(t) + 0.5) / t)  # sin^2 at a half-window hop sums to one
    out, weight = torch.zeros(batch, m, (count + 1) * hop + t), torch.zeros((count + 1) * hop + t)
    for i in range(count):  # one window at a time: a three-hour piece is ~14,000 of them
        out[:, :, i * hop:i * hop + t] += bank[picks[i]].float() * window
        weight[i * hop:i * hop + t] += window.pow(2)
    return (out / weight.clamp_min(1e-12).sqrt())[:, :, hop:hop + frames]


def add_detail(x_hat: Tensor, features: Tensor, model: Optional[DetailModel], beta: float,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """``x_hat + beta * noise`` for windows ``(B, [1,] M, T)`` with features ``(B, D)``.

    Args:
        x_hat: decoded windows (normalised log-mels).
        features: what the model predicts their detail energy from (e.g. window_features of the
            alpha-0 output, or the codes themselves).
        model: a fitted DetailModel (may be None at ``beta = 0``).
        beta: strength in [0, 1]; 0 returns `x_hat` itself, untouched.
        generator: seeds the noise.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"detail strength must lie in [0, 1], got {beta}")
    if beta == 0.0:
        return x_hat
    if model is None:
        raise ValueError("a detail strength above 0 needs a fitted detail model")
    noise = model.noise(features, x_hat.shape[-1], generator).to(x_hat)
    return x_hat + beta * noise.reshape(x_hat.shape)
