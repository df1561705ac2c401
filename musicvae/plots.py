"""Figures for TensorBoard and reports (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def mel_comparison_figure(inputs: torch.Tensor, outputs: torch.Tensor, title: str = "") -> Figure:
    """Input mels (top row) above their reconstructions (bottom row), on one shared colour scale.

    Args:
        inputs: (N, 1, n_mels, frames) or (N, n_mels, frames).
        outputs: same shape as inputs.
        title: figure title.

    Returns:
        A matplotlib Figure; the caller closes it (TensorBoard's add_figure does).
    """
    inputs = inputs.detach().float().cpu().reshape(-1, *inputs.shape[-2:])
    outputs = outputs.detach().float().cpu().reshape(-1, *outputs.shape[-2:])
    n = inputs.shape[0]
    # One colour scale from the inputs: an output wider than its input's range shows as clipped colour.
    vmin, vmax = float(inputs.min()), float(inputs.max())
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.2), squeeze=False, constrained_layout=True)
    for i in range(n):
        for row, (data, label) in enumerate(((inputs[i], "input"), (outputs[i], "reconstruction"))):
            ax = axes[row][i]
            image = ax.imshow(data.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=vmin, vmax=vmax)
            ax.set_title(f"{label} {i}", fontsize=9)
            ax.set_xticks([])
            if i:
                ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.8, label="normalised log-mel")
    if title:
        fig.suptitle(title)
    return fig
