"""One held-out window through every way the model outputs music, in one figure (`issue_mels.png` of
`benchmark-quality`): the input, its reconstruction at alpha 0 (the MSE-optimal blur), the stochastic
decoding (generated detail, musicvae.models.detail, at the top strength, at alpha 0 and at the perceptual
point), then decoded prior samples under N(0, I) and under the learned prior (musicvae.models.prior), each
plain and with the same detail. One colour scale for every panel, so levels and textures compare.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Optional

import torch
from matplotlib.figure import Figure
from torch import Tensor

from musicvae.compensation import compensate
from musicvae.models.detail import DetailModel, add_detail, window_features
from musicvae.plots import mel_grid_figure

#: Seed of the detail drawn in the figure (the benchmark's own, so the picture shows a scored draw).
FIGURE_SEED = 0
#: Panels per row: input and three decodings; two prior samples, each plain and with detail.
COLUMNS = 4
#: Names of the priors in panel titles.
PRIOR_NAMES = {"standard": "N(0, I)", "learned": "learned prior"}


def _detail(x_hat: Tensor, detail: Optional[DetailModel], beta: float, edges: Sequence[tuple[int, int]]) -> Tensor:
    return add_detail(x_hat, window_features(x_hat, edges), detail, beta, torch.Generator().manual_seed(FIGURE_SEED))


@torch.no_grad()
def decodings_panels(x: Tensor, reconstruct: Callable[[Tensor], Tensor], gain: Tensor, alpha: float,
                     edges: Sequence[tuple[int, int]], detail: Optional[DetailModel] = None, beta: float = 0.0,
                     priors: Optional[Mapping[str, Tensor]] = None) -> tuple[Tensor, list[str]]:
    """The figure's panels: ``(P, n_mels, T)`` normalised log-mels and their titles.

    Args:
        x: ``(1, 1, n_mels, T)`` the held-out window (normalised).
        reconstruct: normalised windows -> their alpha-0 decoding (posterior mean decoded).
        gain, alpha: the decoder's compensation curve and perceptual point.
        detail, beta: the detail model fitted to this decoder and the strength shown (None or 0: no detail panels).
        priors: name ("standard", "learned") -> ``(K >= 2, 1, n_mels, T)`` decoded prior samples at alpha 0.
    """
    x_hat = reconstruct(x).float().cpu()
    panels = [x, x_hat]
    titles = ["input (held out)", "reconstruction, alpha 0"]
    stochastic = detail is not None and beta > 0
    if stochastic:
        panels += [_detail(x_hat, detail, beta, edges), _detail(compensate(x_hat, gain, alpha, edges), detail, beta, edges)]
        titles += [f"alpha 0 + detail {beta:g}", f"alpha {alpha:.2f} + detail {beta:g}"]
    else:
        panels.append(compensate(x_hat, gain, alpha, edges))
        titles.append(f"reconstruction, alpha {alpha:.2f}")
    panels += [torch.full_like(x, float("nan"))] * (COLUMNS - len(panels))  # the next row starts the samples
    titles += [""] * (COLUMNS - len(titles))
    for key, drawn in (priors or {}).items():
        name = PRIOR_NAMES.get(key, key)
        for i in range(2):
            sample = drawn[i:i + 1].float().cpu()
            panels.append(sample)
            titles.append(f"{name} sample {i}")
            if stochastic:
                panels.append(_detail(sample, detail, beta, edges))
                titles.append(f"{name} sample {i} + detail {beta:g}")
    return torch.cat(panels)[:, 0], titles


def decodings_figure(panels: Tensor, titles: list[str], title: str) -> Figure:
    """`decodings_panels`'s panels in rows of four on one colour scale (blank panels: NaN, left empty)."""
    finite = panels[torch.isfinite(panels)]
    fig = mel_grid_figure(torch.nan_to_num(panels, nan=float(finite.min())), titles, COLUMNS, title,
                          label="normalised log-mel")
    for ax, name in zip(fig.axes, titles):
        if not name:
            ax.clear()
            ax.axis("off")
    return fig
