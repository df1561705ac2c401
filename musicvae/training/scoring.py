"""The one scoring of reconstructions: validation, `test`, `musicvae evaluate` and `benchmark-quality` all
score a set of windows through :class:`ReconstructionScores`.

It only composes the metrics of :mod:`musicvae.metrics`, where their math lives: ReconstructionDiagnostics,
LatentDiagnostics of the posterior, and paired realism (Gaussian fits of the inputs' and the
reconstructions' mel frames and frame differences, compared by Fréchet distance; paired sets, so 0 is
reachable). Every state is a torchmetrics state with a sum/min/max reduction, so an epoch's result is exact
across batches and DDP processes (see musicvae/metrics.py for the sampler that needs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torchmetrics import Metric

from musicvae.losses import DEFAULT_BANDS, Band
from musicvae.metrics import (DEFAULT_DATA_RANGE, REALISM_VIEWS, GaussianFit, LatentDiagnostics,
                              ReconstructionDiagnostics, band_ratio_error, gaussian_distance)

#: The keys LatentDiagnostics adds to the scores; every other key scores the reconstructions themselves.
LATENT_KEYS = ("kl_per_dim", "kl_nats", "mu_var", "active_units", "active_frac")


class ReconstructionScores(torch.nn.Module):
    """Scores of reconstructions of a set of windows, exact under DDP (torchmetrics states).

    ``update(x_hat, x, mu, logvar)`` per batch, ``compute()`` once per set, ``reset()`` before the next.
    ``compute()`` returns every key of ReconstructionDiagnostics (``band_ratio/<name>`` included) and
    ``band_ratio_error`` (:func:`musicvae.metrics.band_ratio_error` of those ratios); with `realism`,
    ``realism_<view>`` per REALISM_VIEWS view (``realism_frames``, ``realism_differences``); with
    `latent_dim`, the keys of LatentDiagnostics (:data:`LATENT_KEYS`). Scalars are 0-dim tensors,
    ``kl_per_dim`` and ``mu_var`` ``(latent_dim,)``.

    Args:
        n_mels: Mel bins of the windows.
        bands: Frequency-weight bands (:func:`musicvae.metrics.band_edges`).
        latent_dim: D of the posterior to score; None: no posterior (a linear code, say).
        std: The data's z-score standard deviation (spectral convergence, LSD); settable later as `std`.
        data_range: SSIM and PSNR range in normalised units (None: DEFAULT_DATA_RANGE).
        realism: Also fit the paired realism distances (two ``(n_mels, n_mels)`` sums per view).
    """

    def __init__(self, n_mels: int, bands: Sequence[Band] = DEFAULT_BANDS, latent_dim: Optional[int] = None,
                 std: float = 1.0, data_range: Optional[float] = None, realism: bool = True) -> None:
        super().__init__()
        self.diagnostics = ReconstructionDiagnostics(std=std, n_mels=n_mels, bands=bands,
                                                     data_range=DEFAULT_DATA_RANGE if data_range is None else data_range)
        self.latent = LatentDiagnostics(latent_dim) if latent_dim else None
        self.realism = torch.nn.ModuleDict({f"{view}_{side}": GaussianFit(n_mels) for view in REALISM_VIEWS
                                            for side in ("input", "output")}) if realism else None

    @property
    def std(self) -> float:
        return self.diagnostics.std

    @std.setter
    def std(self, value: float) -> None:
        # The data module's scale arrives after construction (before each validation epoch).
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"std must be finite and > 0, got {value!r}")
        self.diagnostics.std = float(value)

    @property
    def band_names(self) -> list[str]:
        """Names of the ``band_ratio/<name>`` keys, e.g. ``"0-25"`` (inclusive mel bins)."""
        return self.diagnostics.band_names

    def update(self, x_hat: Tensor, x: Tensor, mu: Optional[Tensor] = None, logvar: Optional[Tensor] = None) -> None:
        """One batch: reconstructions and inputs ``(B, [1,] n_mels, T)``; the posterior ``(B, D)`` when the
        scorer has a `latent_dim` (then required)."""
        if (mu is None) != (self.latent is None) or (mu is None) != (logvar is None):
            raise ValueError("ReconstructionScores.update: give mu and logvar exactly when the scorer was built "
                             f"with latent_dim (it has latent_dim={getattr(self.latent, 'latent_dim', None)})")
        self.diagnostics.update(x_hat, x)
        if self.latent is not None:
            self.latent.update(mu, logvar)
        if self.realism is not None:
            for view, rows in REALISM_VIEWS.items():
                self.realism[f"{view}_input"].update(rows(x))
                self.realism[f"{view}_output"].update(rows(x_hat))

    def compute(self) -> dict[str, Tensor]:
        out = dict(self.diagnostics.compute())  # reduced across processes, as is every compute() below
        ratios = torch.stack([out[f"band_ratio/{name}"] for name in self.band_names])
        out["band_ratio_error"] = band_ratio_error(ratios)
        if self.realism is not None:
            for view in REALISM_VIEWS:
                distance = gaussian_distance(self.realism[f"{view}_input"], self.realism[f"{view}_output"])
                out[f"realism_{view}"] = torch.tensor(distance, dtype=torch.float64, device=ratios.device)
        if self.latent is not None:
            out.update(self.latent.compute())
        return out

    def reset(self) -> None:
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()


def scalars(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """The 0-dim entries of `values` as float32 (what ``LightningModule.log_dict`` takes)."""
    return {key: value.float() for key, value in values.items() if value.dim() == 0}


def plain_values(values: dict[str, Tensor]) -> dict[str, Any]:
    """`values` as JSON-ready Python values: floats, ints for integer counts, lists for vectors."""
    return {key: value.tolist() if value.dim() else int(value) if not value.is_floating_point() else float(value)
            for key, value in values.items()}
