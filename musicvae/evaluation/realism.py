"""The distortion-perception plane: MSE against realism, at every strength of variance compensation.

Realism is a distance between distributions (``musicvae.metrics.frechet_distance`` of Gaussian
fits of mel frames and of frame-to-frame differences), measured without pairing: the held-out
recordings are split into two halves by recording, and reconstructions of half A are compared
with the inputs of half B (and B with A; the two distances are averaged), at equal window
counts. Real music against real music, inputs A against inputs B, is the floor: no model can be
told from music that the measure scores at the floor. A per-band gain alone moves frames'
variances, not their shape across bins or their changes in time, so it cannot reach the floor.

``TradeOff`` gathers all of it in one pass over the windows; ``prior_realism`` scores prior samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from musicvae.compensation import CompensationStats, compensate, compensation_curve, fit_compensation_curve
from musicvae.metrics import REALISM_VIEWS as _VIEWS
from musicvae.metrics import GaussianFit, gaussian_distance

#: Strengths at which the plane is drawn.
PLANE_ALPHAS = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 11))


def half_labels(dataset: Dataset) -> Optional[Tensor]:
    """``(len(dataset),)`` int64: 0 or 1 for the windows of :func:`recording_halves`, -1 for the others;
    None when the dataset has fewer than two recordings (realism cannot be measured)."""
    try:
        half_a, half_b = recording_halves(dataset)
    except ValueError:
        return None
    labels = torch.full((len(dataset),), -1, dtype=torch.int64)
    labels[half_a], labels[half_b] = 0, 1
    return labels


def even_subset(indices: Sequence[int], count: int) -> list[int]:
    """``count`` of ``indices``, evenly spaced (all of them when there are no more)."""
    if count >= len(indices):
        return list(indices)
    picks = np.linspace(0, len(indices) - 1, count).round().astype(np.int64)
    return [int(indices[i]) for i in picks]


def recording_halves(dataset: Dataset) -> tuple[list[int], list[int]]:
    """Window indices of two halves of `dataset`'s recordings, with equal window counts.

    Recordings go, longest first, to the half with fewer windows so far; the larger half is then
    thinned evenly to the smaller one's count. A dataset without recording ids (``items[:, 0]`` of
    a SegmentDataset) is split by position: the first half of the windows against the second.

    Raises:
        ValueError: fewer than two recordings or windows, so there is nothing to compare.
    """
    items = getattr(dataset, "items", None)
    n = len(dataset)
    if items is None:
        if n < 2:
            raise ValueError("realism needs at least two windows")
        return list(range(n // 2)), list(range(n // 2, 2 * (n // 2)))
    by_file: dict[int, list[int]] = {}
    for index, file_index in enumerate(np.asarray(items)[:, 0].tolist()):
        by_file.setdefault(int(file_index), []).append(index)
    if len(by_file) < 2:
        raise ValueError("realism compares two halves of the recordings: the held-out folder needs at least two "
                         f"recordings, it has {len(by_file)}")
    halves: tuple[list[int], list[int]] = ([], [])
    for file_index in sorted(by_file, key=lambda f: (-len(by_file[f]), f)):
        min(halves, key=len).extend(by_file[file_index])
    count = min(len(h) for h in halves)
    return even_subset(halves[0], count), even_subset(halves[1], count)


class _Fits:
    """Gaussian fits of frames and differences of one set of windows."""

    def __init__(self, n_mels: int) -> None:
        self.fits = {view: GaussianFit(n_mels) for view in _VIEWS}

    def update(self, x: Tensor) -> None:
        for view, rows in _VIEWS.items():
            self.fits[view].update(rows(x))


def _distance(a: _Fits, b: _Fits) -> dict[str, float]:
    return {view: gaussian_distance(a.fits[view], b.fits[view]) for view in _VIEWS}


def _mean(*ds: dict[str, float]) -> dict[str, float]:
    return {view: sum(d[view] for d in ds) / len(ds) for view in _VIEWS}


class TradeOff:
    """MSE, band ratios and realism of a decoder's outputs at several compensation strengths.

    ``update(x_hat, x, half)`` with ``half`` 0 or 1 (a window of a realism half) or None (scored
    for MSE and ratios only). ``compute()`` returns the floor and one row per strength.

    Args:
        n_mels: mel bins.
        edges: band edges (musicvae.metrics.band_edges).
        gain: ``(n_mels,)`` gain curve (ones: only alpha = 0 is meaningful).
        alphas: strengths to score.
    """

    def __init__(self, n_mels: int, edges: Sequence[tuple[int, int]], gain: Tensor,
                 alphas: Sequence[float] = PLANE_ALPHAS) -> None:
        self.edges, self.gain, self.alphas = list(edges), gain.detach().cpu().float(), [float(a) for a in alphas]
        self.stats = CompensationStats(n_mels, self.edges)
        self.inputs = (_Fits(n_mels), _Fits(n_mels))
        self.outputs = [(_Fits(n_mels), _Fits(n_mels)) for _ in self.alphas]

    def update(self, x_hat: Tensor, x: Tensor, half: Optional[int | Tensor] = None) -> None:
        """`half`: 0 or 1 for the whole batch, None for neither, or a ``(B,)`` tensor of 0, 1 or -1 (neither)."""
        x_hat, x = x_hat.detach().cpu().float(), x.detach().cpu().float()
        self.stats.update(x_hat, x)
        if half is None:
            return
        if isinstance(half, Tensor):
            for h in (0, 1):
                picked = half.cpu() == h
                if picked.any():
                    self.update_half(x_hat[picked], x[picked], h)
            return
        self.update_half(x_hat, x, half)

    def update_half(self, x_hat: Tensor, x: Tensor, half: int) -> None:
        self.inputs[half].update(x)
        for alpha, fits in zip(self.alphas, self.outputs):
            fits[half].update(compensate(x_hat, self.gain, alpha, self.edges))

    def compute(self) -> dict[str, Any]:
        """``floor`` ({frames, differences}), ``rows``: per strength ``alpha``, ``mse``, ``bound_mse``,
        ``band_ratio`` (list) and ``realism`` ({frames, differences}); and ``oracle``: the perceptual point
        (``alpha``, ``mse``, ``band_ratio``, ``reached``) of a curve fitted on these very windows."""
        sums = self.stats.compute()
        curve = compensation_curve(sums, self.gain, self.edges, torch.tensor(self.alphas))
        floor = _distance(*self.inputs)
        # What any per-bin gain could do here: a curve fitted on these windows themselves (an oracle, never
        # used for decoding), the reference for how much of the gap the validation-fitted curve closes.
        oracle = fit_compensation_curve(sums, self.edges)
        index = int(round(oracle["alpha"] * (len(oracle["curve"]["alpha"]) - 1)))
        oracle_row = {"alpha": oracle["alpha"], "reached": oracle["reached"],
                      "mse": float(oracle["curve"]["mse"][index]),
                      "band_ratio": oracle["curve"]["band_ratio"][index].tolist()}
        rows = []
        for i, (alpha, (out_a, out_b)) in enumerate(zip(self.alphas, self.outputs)):
            realism = _mean(_distance(out_a, self.inputs[1]), _distance(out_b, self.inputs[0]))
            rows.append({"alpha": alpha, "mse": float(curve["mse"][i]), "bound_mse": float(curve["bound_mse"][i]),
                         "band_ratio": curve["band_ratio"][i].tolist(), "realism": realism})
        return {"floor": floor, "rows": rows, "oracle": oracle_row}


Reconstruct = Callable[[Tensor], Tensor]


@torch.no_grad()
def trade_off(reconstruct: Reconstruct, dataset: Dataset, n_mels: int, edges: Sequence[tuple[int, int]],
              gain: Tensor, alphas: Sequence[float] = PLANE_ALPHAS, batch_size: int = 32,
              extra: Optional[Callable[[Tensor, Tensor], None]] = None) -> dict[str, Any]:
    """:class:`TradeOff` of ``reconstruct`` (normalised ``(B, 1, M, T)`` -> same) over every window
    of `dataset`; `extra(x_hat, x)` also sees each batch (e.g. a ReconstructionDiagnostics)."""
    half_a, half_b = recording_halves(dataset)
    half_of = {**{i: 0 for i in half_a}, **{i: 1 for i in half_b}}
    order = sorted(range(len(dataset)), key=lambda i: half_of.get(i, 2))  # halves first, in their own batches
    groups = [[i for i in order if half_of.get(i, 2) == h] for h in (0, 1, 2)]
    result = TradeOff(n_mels, edges, gain, alphas)
    for half, indices in zip((0, 1, None), groups):
        if not indices:
            continue
        for x in DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False):
            x_hat = reconstruct(x)
            result.update(x_hat, x, half)
            if extra is not None:
                extra(x_hat, x)
    out = result.compute()
    out["windows_per_half"] = len(half_a)
    return out


@torch.no_grad()
def prior_realism(samples: Tensor, dataset: Dataset, batch_size: int = 64) -> dict[str, Any]:
    """Realism of prior samples ``(N, 1, M, T)`` against held-out inputs at equal window counts.

    The samples are compared with N windows of each recording half (evenly spaced) and the two
    distances averaged; the floor is those N windows of half A against those of half B.
    """
    half_a, half_b = recording_halves(dataset)
    count = min(len(samples), len(half_a))
    n_mels = samples.shape[-2]
    fits = []
    for half in (half_a, half_b):
        fit = _Fits(n_mels)
        for x in DataLoader(Subset(dataset, even_subset(half, count)), batch_size=batch_size, shuffle=False):
            fit.update(x)
        fits.append(fit)
    drawn = _Fits(n_mels)
    for chunk in samples[:count].split(batch_size):
        drawn.update(chunk.float())
    return {"windows": count, "floor": _distance(*fits), "realism": _mean(_distance(drawn, fits[0]), _distance(drawn, fits[1]))}
