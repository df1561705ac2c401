"""Generated detail on the distortion-perception plane (`benchmark-quality --detail_strengths 0,0.5,1`).

The same detail generator (musicvae.models.detail, fitted by musicvae.inference.detail.fit_detail on
the training windows, each decoder on its own residuals and codes) is put on the VAE's output and on
PCA's, each at compensation strength 0 and at its own perceptual point (fitted on validation), at each
detail strength: like for like. Per point: MSE on every held-out window, both Fréchet realism distances
(musicvae.evaluation.realism.TradeOff: reconstructions of one half of the recordings against the
inputs of the other) and, with seeds, the classifier two-sample accuracy (the windows of
musicvae.evaluation.two_sample_report: alternate windows of each recording, split by recording).
Every draw is seeded (DETAIL_SEED), so a rerun gives the same figures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from musicvae.compensation import compensate
from musicvae.evaluation.realism import TradeOff, recording_halves
from musicvae.evaluation.two_sample import two_sample_test
from musicvae.evaluation.two_sample_report import DEFAULT_WINDOWS, interleaved_windows, stack_windows
from musicvae.io.tables import markdown_table
from musicvae.models.detail import DetailModel, add_detail, window_features

#: Seed of every detail draw the benchmark scores.
DETAIL_SEED = 0

Encode = Callable[[Tensor], Tensor]


def parse_strengths(text: str) -> tuple[float, ...]:
    """"0,0.5,1" -> (0.0, 0.5, 1.0); raises ValueError naming the flag for anything outside [0, 1]."""
    try:
        values = tuple(sorted({float(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        values = ()
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"--detail_strengths {text!r}: comma-separated strengths in [0, 1], e.g. 0,0.5,1")
    return values


def _points(alphas: Sequence[float], betas: Sequence[float]) -> list[tuple[float, float]]:
    return [(a, b) for a in dict.fromkeys(alphas) for b in betas]


def _output(x_hat: Tensor, features: Tensor, detail: DetailModel, gain: Tensor, alpha: float, beta: float,
            edges: Sequence[tuple[int, int]], generator: torch.Generator) -> Tensor:
    """The alpha-0 output `x_hat` compensated at `alpha`, plus detail at `beta` predicted from `features`
    (window_features of `x_hat`)."""
    return add_detail(compensate(x_hat, gain, alpha, edges), features, detail, beta, generator)


@torch.no_grad()
def detail_plane(decoders: dict[str, dict[str, Any]], dataset: Dataset, n_mels: int, edges: Sequence[tuple[int, int]],
                 betas: Sequence[float], seeds: Sequence[int] = (), batch_size: int = 32,
                 max_windows: int = DEFAULT_WINDOWS) -> dict[str, Any]:
    """MSE, realism and (with `seeds`) two-sample accuracy of each decoder at each (alpha, detail) point.

    Args:
        decoders: name -> ``encode`` (windows -> codes), ``decode`` (codes -> windows), ``detail`` (its
            DetailModel), ``gain`` (compensation curve), ``alpha`` (its perceptual point).
        dataset: normalised held-out windows with recording ids.
        betas: detail strengths.
        seeds: classifier seeds of the two-sample test (empty: none).

    Returns:
        ``strengths``, ``floor`` (realism of music against music), ``windows_per_half``, and ``rows``: one per
        decoder and point with ``decoder``, ``alpha``, ``beta``, ``mse``, ``band_ratio``, ``realism``
        ({frames, differences}) and, with seeds, ``two_sample`` (two_sample_test's result).
    """
    half_a, half_b = recording_halves(dataset)
    half_of = {**{i: 0 for i in half_a}, **{i: 1 for i in half_b}}
    rows: list[dict[str, Any]] = []
    floor, per_half = None, len(half_a)
    for name, dec in decoders.items():
        points = _points((0.0, float(dec["alpha"])), betas)
        fits = {p: TradeOff(n_mels, edges, torch.ones(n_mels), (0.0,)) for p in points}
        generators = {p: torch.Generator().manual_seed(DETAIL_SEED) for p in points}
        for half in (0, 1, None):
            indices = [i for i in range(len(dataset)) if half_of.get(i) == half]
            for x in DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False) if indices else ():
                x_hat = dec["decode"](dec["encode"](x)).float().cpu()
                features = window_features(x_hat, edges)
                for (alpha, beta), fit in fits.items():
                    out = _output(x_hat, features, dec["detail"], dec["gain"], alpha, beta, edges,
                                  generators[(alpha, beta)])
                    fit.update(out, x, half)
        for (alpha, beta), fit in fits.items():
            found = fit.compute()
            floor = found["floor"]
            row = found["rows"][0]
            rows.append({"decoder": name, "alpha": alpha, "beta": beta, "mse": row["mse"],
                         "band_ratio": row["band_ratio"], "realism": row["realism"]})
    if seeds:
        add_two_sample(rows, decoders, dataset, edges, seeds, batch_size, max_windows)
    return {"strengths": list(betas), "floor": floor, "windows_per_half": per_half, "rows": rows}


def add_two_sample(rows: list[dict[str, Any]], decoders: dict[str, dict[str, Any]], dataset: Dataset,
                   edges: Sequence[tuple[int, int]], seeds: Sequence[int], batch_size: int, max_windows: int) -> None:
    """Each row's ``two_sample``: the C2ST of real windows against that point's outputs (in place)."""
    real_idx, source_idx = interleaved_windows(dataset, max_windows)
    real, real_groups = stack_windows(dataset, real_idx)
    x, groups = stack_windows(dataset, source_idx)
    for name, dec in decoders.items():
        x_hat = torch.cat([dec["decode"](dec["encode"](chunk)).float().cpu() for chunk in x.split(batch_size)])
        features = window_features(x_hat, edges)
        for row in (r for r in rows if r["decoder"] == name):
            generator = torch.Generator().manual_seed(DETAIL_SEED)
            fake = _output(x_hat, features, dec["detail"], dec["gain"], row["alpha"], row["beta"], edges, generator)
            row["two_sample"] = two_sample_test(real, fake, real_groups, groups, list(seeds))


def detail_lines(found: dict[str, Any] | None, pca_mse: float) -> list[str]:
    """results.md's section: one row per decoder and point."""
    if not found:
        return []
    floor = found["floor"]
    cells = []
    for row in found["rows"]:
        test = row.get("two_sample")
        cells.append((row["decoder"], f"{row['alpha']:g}", f"{row['beta']:g}", f"{row['mse']:.4g}",
                      f"{row['mse'] / pca_mse:.3f}", f"{row['realism']['frames']:.4g}",
                      f"{row['realism']['differences']:.4g}", f"{min(row['band_ratio']):.3g}",
                      f"{test['accuracy']:.3f} ± {test['spread']:.3f}" if test else "—"))
    texture = {"exemplar": "a training window's residual drawn at random and divided by its own band RMS",
               "gaussian": "noise with the residual's bin covariance and lag-1 correlation"}[found.get("source", "gaussian")]
    return ["## Generated detail", "",
            "The same detail generator (per-band energy predicted from the decoded window's band levels and variances, "
            f"times {texture}; fitted on the training windows, each decoder on its own residuals) "
            "on each decoder at compensation strength alpha and detail strength beta. Realism floor (music against "
            f"music, {found['windows_per_half']} windows per half): frames {floor['frames']:.4g}, differences "
            f"{floor['differences']:.4g}. Two-sample accuracy: 0.5 is indistinguishable (floor and control in the "
            "two-sample section).", "",
            *markdown_table(("decoder", "alpha", "beta", "MSE", "/ PCA MSE at 0", "realism frames", "realism diffs",
                             "lowest band ratio", "two-sample accuracy"), cells), ""]


def plane_figure(found: dict[str, Any], floors: dict[str, float], title: str = "") -> Figure:
    """The distortion-perception plane of the detail rows: MSE against each realism view and against
    two-sample accuracy (error bars: the seed spread), one line per decoder and compensation strength
    through its detail strengths; floors (music against music; accuracy 0.5) dashed."""
    fig = Figure(figsize=(13.5, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    views = [("frames", "realism: Fréchet distance of mel frames", floors.get("frames")),
             ("differences", "realism: Fréchet distance of mel differences", floors.get("differences")),
             ("two_sample", "two-sample accuracy (0.5: indistinguishable)", 0.5)]
    lines: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in found["rows"]:
        lines.setdefault((row["decoder"], row["alpha"]), []).append(row)
    for (decoder, alpha), rows in lines.items():
        rows = sorted(rows, key=lambda r: r["beta"])
        mse = [r["mse"] for r in rows]
        for ax, (view, label, floor) in zip(axes, views):
            if view == "two_sample":
                if not all(r.get("two_sample") for r in rows):
                    continue
                x = [r["two_sample"]["accuracy"] for r in rows]
                ax.errorbar(x, mse, xerr=[r["two_sample"]["spread"] for r in rows], marker="o", capsize=3,
                            label=f"{decoder}, alpha {alpha:.2f}")
            else:
                x = [r["realism"][view] for r in rows]
                ax.plot(x, mse, marker="o", label=f"{decoder}, alpha {alpha:.2f}")
            for r, xi, yi in zip(rows, x, mse):
                ax.annotate(f"β={r['beta']:g}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax, (view, label, floor) in zip(axes, views):
        if floor is not None:
            ax.axvline(floor, color="0.4", linestyle="--", label="floor")
        if view != "two_sample":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # the decade's minor labels overlap
        ax.set_xlabel(label)
        ax.set_ylabel("MSE (normalised units)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
