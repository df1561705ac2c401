"""Figures for TensorBoard and reports, with matplotlib's object API.

Each function returns a `matplotlib.figure.Figure` that pyplot does not manage: drawing needs no
display and no backend switch, nothing here closes a notebook user's own figures, and a figure is
freed like any object once TensorBoard or `savefig` is done with it.
"""

from __future__ import annotations

import math

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter


def mel_comparison_figure(inputs: torch.Tensor, outputs: torch.Tensor, title: str = "") -> Figure:
    """Input mels (top row) above their reconstructions (bottom row), on one shared colour scale.

    Args:
        inputs: (N, 1, n_mels, frames) or (N, n_mels, frames).
        outputs: same shape as inputs.
        title: figure title.

    Returns:
        A matplotlib Figure; not registered with pyplot.
    """
    inputs = inputs.detach().float().cpu().reshape(-1, *inputs.shape[-2:])
    outputs = outputs.detach().float().cpu().reshape(-1, *outputs.shape[-2:])
    n = inputs.shape[0]
    # One colour scale from the inputs: an output wider than its input's range shows as clipped colour.
    vmin, vmax = float(inputs.min()), float(inputs.max())
    fig = Figure(figsize=(2.6 * n, 5.2), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
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


def band_ratio_figure(names: list[str], ratios: torch.Tensor | list[float], title: str = "") -> Figure:
    """Reconstruction-to-input variance ratio per mel band, with the ideal 1.0 marked.

    Args:
        names: band labels such as "0-25" (see musicvae.metrics.band_edges), low bands first.
        ratios: one ratio per band (musicvae.metrics.band_variance_ratio); NaN bars are left empty.
        title: figure title.

    Returns:
        A matplotlib Figure.
    """
    values = torch.as_tensor(ratios, dtype=torch.float64).detach().cpu().tolist()
    fig = Figure(figsize=(1.2 * len(values) + 2, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(values)), values, color="tab:blue")
    # Below the line the band lost detail (a blur keeps energy, not variance); above, it gained noise.
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="input variance")
    finite = [v for v in values if v == v]  # NaN (a band with no input variance) != itself
    ax.set_ylim(0.0, max([1.2, *(1.1 * v for v in finite)]))  # headroom above the line for the legend
    ax.set_xticks(range(len(values)), names)
    ax.set_xlabel("mel bins")
    ax.set_ylabel("variance ratio (recon / input)")
    ax.legend(loc="upper right", fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def kl_per_dim_figure(
    kl_per_dim: torch.Tensor,
    mu_var: torch.Tensor | None = None,
    active_threshold: float = 0.01,
    title: str = "",
) -> Figure:
    """KL per latent dimension in nats, sorted from largest, active units highlighted.

    Args:
        kl_per_dim: (D,) mean KL of each latent dimension, nats (musicvae.metrics.LatentDiagnostics).
        mu_var: (D,) variance over the data of each posterior mean; when given, dimensions with
            mu_var > active_threshold (Burda et al. 2016 active units) are drawn in a second colour.
        active_threshold: the posterior-mean variance a unit must exceed to count as active.
        title: figure title.

    Returns:
        A matplotlib Figure.
    """
    kl = kl_per_dim.detach().double().cpu()
    order = torch.argsort(kl, descending=True)
    colors = ["tab:gray"] * kl.numel()
    if mu_var is not None:
        active = (mu_var.detach().double().cpu() > active_threshold)[order].tolist()
        colors = ["tab:orange" if a else "tab:gray" for a in active]
    fig = Figure(figsize=(max(4.0, 0.12 * kl.numel() + 2), 3.2), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(kl.numel()), kl[order].tolist(), color=colors, width=0.9)
    ax.set_xlabel("latent dimension (sorted by KL)")
    ax.set_ylabel("KL (nats)")
    if mu_var is not None:
        n_active = sum(active)
        ax.set_title(f"{n_active}/{kl.numel()} active (Var[mu] > {active_threshold:g}), orange", fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def mel_grid_figure(mels: torch.Tensor, titles: list[str], columns: int, title: str = "",
                    label: str = "log-mel power (nats)") -> Figure:
    """(N, n_mels, frames) log-mels in a grid of `columns`, on one colour scale labelled `label`."""
    mels = mels.detach().float().cpu()
    rows = math.ceil(len(mels) / columns)
    fig = Figure(figsize=(2.4 * columns, 2.2 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    vmin, vmax = float(mels.min()), float(mels.max())
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i < len(mels):
            image = ax.imshow(mels[i].numpy(), origin="lower", aspect="auto", cmap="magma", vmin=vmin, vmax=vmax)
            ax.set_title(titles[i], fontsize=9)
        else:
            ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label=label)
    if title:
        fig.suptitle(title)
    return fig


def trade_off_figure(curves: list[dict], floor: dict[str, float], title: str = "") -> Figure:
    """The distortion-perception plane: MSE against realism, one panel per realism view.

    Args:
        curves: one dict per decoder: ``label``, ``rows`` (per strength: ``alpha``, ``mse`` and
            ``realism`` {view: distance}, as musicvae.evaluation.realism.TradeOff gives them) and
            optionally ``mark``: the alpha to circle (its perceptual point). A decoder scored at a
            single strength (e.g. an adversarial one) is drawn as a point.
        floor: realism of real music against real music, per view (a dashed line).
        title: figure title.

    Returns:
        A matplotlib Figure; not registered with pyplot.
    """
    views = list(floor)
    fig = Figure(figsize=(5.2 * len(views), 4.4), layout="constrained")
    axes = fig.subplots(1, len(views), squeeze=False)[0]
    for ax, view in zip(axes, views):
        for curve in curves:
            rows = sorted(curve["rows"], key=lambda r: r["alpha"])
            xs, ys = [r["realism"][view] for r in rows], [r["mse"] for r in rows]
            line = ax.plot(xs, ys, marker="o" if len(rows) == 1 else ".", label=curve["label"])[0]
            if len(rows) > 1:
                for r in (rows[0], rows[-1]):
                    ax.annotate(f"α={r['alpha']:g}", (r["realism"][view], r["mse"]), fontsize=7,
                                textcoords="offset points", xytext=(3, 3), color=line.get_color())
            mark = curve.get("mark")
            for r in rows:
                if mark is not None and abs(r["alpha"] - mark) < 1e-9:
                    ax.plot([r["realism"][view]], [r["mse"]], marker="o", markersize=10, fillstyle="none",
                            color=line.get_color())
        ax.axvline(floor[view], linestyle="--", color="0.4", label="floor (music vs music)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels overlap on a short range
        ax.set_xlabel(f"realism: Fréchet distance of mel {view} (lower is more real)")
        ax.set_ylabel("MSE (normalised units)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
