"""What each latent size and each training budget buys: the map, as pure functions.

Every decoder, whether a linear code (the frozen 2-D DCT with k coefficients, PCA-k fitted on the
training windows) or a trained VAE checkpoint decoding its posterior mean (alpha 0), is scored on the
same held-out windows, in the same normalisation, with the project's existing measures:

- MSE over every held-out window, and its ratio to PCA at a reference size (128) and at its own size;
- the two Fréchet realism distances (frames, frame-to-frame differences) of
  musicvae.evaluation.realism.trade_off: reconstructions of one half of the recordings against the
  inputs of the other, with the floor (music against music) of the same halves;
- the classifier two-sample accuracy (musicvae.evaluation.two_sample) over seeds on the windows of
  musicvae.evaluation.two_sample_report.interleaved_windows, with its floor (real against real, the
  same for every row) and each decoder's moment-matched-noise control.

A checkpoint sees the windows in its own normalisation (:func:`checkpoint_decoder`): its
reconstruction is mapped back, so a checkpoint trained on other music is scored in the same units.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from matplotlib.figure import Figure
from torch import Tensor
from torch.utils.data import Dataset

from musicvae.data.segments import Normalizer
from musicvae.errors import DataError
from musicvae.evaluation.realism import trade_off
from musicvae.evaluation.two_sample_report import TwoSampleWindows
from musicvae.io.tables import markdown_table
from musicvae.losses import DEFAULT_BANDS
from musicvae.metrics import band_edges
from musicvae.metrics import REALISM_VIEWS

Decode = Callable[[Tensor], Tensor]  # normalised (B, 1, n_mels, T) -> its alpha-0 reconstruction

#: Kinds of rows, in the order the tables and the figure show them.
KINDS = {"dct": "frozen 2-D DCT", "pca": "PCA (training windows)", "vae": "VAE checkpoints"}


@dataclass
class Decoder:
    """One row of the map: a code of `size` numbers per window and how it reconstructs one."""

    kind: str  # "dct", "pca" or "vae"
    label: str
    size: int
    decode: Decode
    global_step: Optional[int] = None
    path: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_decoder(module: Any, ours: Normalizer, theirs: Normalizer) -> Decode:
    """The alpha-0 reconstruction of a trained module, for windows in `ours` normalisation.

    The module was trained on windows z-scored with `theirs` statistics (its checkpoint's): the windows
    are mapped to those units, reconstructed from the posterior mean, and mapped back, so every decoder's
    MSE is in the same units. With equal statistics both maps are the identity up to rounding.
    """
    def decode(x: Tensor) -> Tensor:
        y = module.reconstruct(theirs(ours.inverse(x.float())).to(module.device))
        return ours(theirs.inverse(y.float().cpu()))

    return decode


def score_decoder(decode: Decode, dataset: Dataset, n_mels: int, batch_size: int = 32) -> dict[str, Any]:
    """MSE over every window of `dataset` and realism (:func:`musicvae.evaluation.realism.trade_off` at
    alpha 0) in one pass.

    Returns:
        ``mse``, ``band_ratio`` (per band of DEFAULT_BANDS), ``realism`` ({frames, differences}), ``floor``
        (the same halves' music against music) and ``windows_per_half``.
    """
    found = trade_off(decode, dataset, n_mels, band_edges(n_mels, DEFAULT_BANDS), torch.ones(n_mels), (0.0,),
                      batch_size)
    row = found["rows"][0]
    return {"mse": row["mse"], "band_ratio": row["band_ratio"], "realism": row["realism"], "floor": found["floor"],
            "windows_per_half": found["windows_per_half"]}


def two_sample_row(windows: TwoSampleWindows, decode: Decode) -> dict[str, Any]:
    """A row's two-sample ``accuracy`` of the real windows against `decode`'s, and its ``control``:
    against the same decodings plus moment-matched noise."""
    x_hat = windows.decoded(decode)
    found, control = windows.test(x_hat), windows.control(x_hat)
    return {**summary(found), "control": {**summary(control), "passed": control["passed"], "goal": control["goal"]}}


def summary(found: dict[str, Any]) -> dict[str, Any]:
    return {key: found[key] for key in ("accuracy", "spread", "accuracies", "windows")}


def add_ratios(rows: list[dict[str, Any]], pca_mse: dict[int, float], reference: int,
               floor: dict[str, float]) -> None:
    """Each row's ``mse_over_pca_reference`` (PCA at `reference` components), ``mse_over_pca_same_size``
    and ``realism_over_floor``, in place."""
    for row in rows:
        row["mse_over_pca_reference"] = row["mse"] / pca_mse[reference]
        row["mse_over_pca_same_size"] = row["mse"] / pca_mse[row["latent_size"]]
        row["realism_over_floor"] = {view: row["realism"][view] / floor[view] if floor[view] > 0 else math.nan
                                     for view in REALISM_VIEWS}


def merge_results(results: list[dict[str, Any]], sources: list[str]) -> dict[str, Any]:
    """One map from several runs on the same data (e.g. the linear codes once, checkpoints as they finish).

    The runs must share the data (folders, split seed, mel settings, normalisation), the window counts and
    so the realism floor, and, where both measured it, the two-sample seeds and floor; a run without the
    two-sample test adds rows without it. A label met twice keeps its first row (a rerun of a row on the
    same data gives the same figures: the fits and the classifier are seeded).

    Raises:
        DataError: naming the first of `sources` that differs, and in what.
    """
    first = results[0]
    measured = [result for result in results if result["two_sample_seeds"]]  # runs with the two-sample test
    two = measured[0] if measured else first
    merged = {**first, "rows": [], "pca_references": [], "sizes": [], "two_sample_seeds": two["two_sample_seeds"],
              "floors": {**first["floors"], "two_sample": two["floors"]["two_sample"]},
              "windows": {**first["windows"], "two_sample_per_side": two["windows"]["two_sample_per_side"]},
              "command": "musicvae benchmark-map --merge " + " ".join(sources),
              "merged_from": [r["command"] for r in results], "seconds": sum(r["seconds"] for r in results)}
    counts = ("train", "test", "realism_per_half")
    for result, source in zip(results, sources):
        same = {"data": result["data"] == first["data"],
                "reference size": result["reference_size"] == first["reference_size"],
                "window counts": all(result["windows"][k] == first["windows"][k] for k in counts),
                "realism floor": result["floors"]["realism"] == first["floors"]["realism"]}
        if result["two_sample_seeds"]:
            same["two-sample seeds"] = result["two_sample_seeds"] == two["two_sample_seeds"]
            same["two-sample floor"] = result["floors"]["two_sample"] == two["floors"]["two_sample"]
        if not all(same.values()):
            raise DataError(f"--merge {source}: its {', '.join(k for k, v in same.items() if not v)} differ from "
                            f"{sources[0]}'s; merge only runs on the same folders, --seed, --frames and mel settings")
        for key in ("rows", "pca_references"):
            known = {row["label"] for row in merged[key]}
            merged[key] += [row for row in result[key] if row["label"] not in known]
        merged["sizes"] = sorted({*merged["sizes"], *result["sizes"]})
    return merged


def _cell(value: Optional[float], digits: str = ".4g") -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, digits)


def _accuracy(found: Optional[dict[str, Any]]) -> str:
    if not found:
        return "—"
    return f"{found['accuracy']:.3f} ± {found['spread']:.3f}" + (", failed" if found.get("passed") is False else "")


def markdown_lines(result: dict[str, Any]) -> list[str]:
    """results.md: what was compared, then one table per kind (the checkpoints with label and step)."""
    floors, windows, reference = result["floors"], result["windows"], result["reference_size"]
    two = floors.get("two_sample")
    lines = ["# The map: what each latent size and training budget buys", "",
             f"`{result['command']}`", "",
             f"Trained on `{result['data']['train_dir']}` ({windows['train']} windows; PCA and the DCT's choice of "
             f"coefficients fitted there), scored on every recording of `{result['data']['test_dir']}`: MSE on all "
             f"{windows['test']} windows; Fréchet realism on {windows['realism_per_half']} windows per recording half "
             f"(floor, music against music: frames {floors['realism']['frames']:.4g}, differences "
             f"{floors['realism']['differences']:.4g}); two-sample accuracy "
             + (f"on {windows['two_sample_per_side']} windows per side, seeds {result['two_sample_seeds']} (floor "
                f"{_accuracy(two)}; 0.5: indistinguishable)." if two else "not measured (--two_sample_seeds 0).")
             + f" Every row at alpha 0 (no compensation); MSE also over PCA-{reference} and over PCA of the same size.",
             ""]
    header = ("MSE", f"/ PCA-{reference}", "/ PCA same size", "realism frames (x floor)",
              "realism diffs (x floor)", "two-sample accuracy", "control (>= 0.9)")
    for kind, title in KINDS.items():
        rows = [r for r in result["rows"] if r["kind"] == kind]
        if not rows:
            continue
        first = ("checkpoint", "latent size", "global step") if kind == "vae" else ("latent size",)
        cells = []
        for r in rows:
            lead = (r["label"], str(r["latent_size"]), _cell(r["global_step"], "d") if r["global_step"] is not None
                    else "—") if kind == "vae" else (str(r["latent_size"]),)
            real, over = r["realism"], r["realism_over_floor"]
            test = r.get("two_sample")
            cells.append((*lead, _cell(r["mse"]), _cell(r["mse_over_pca_reference"], ".3f"),
                          _cell(r["mse_over_pca_same_size"], ".3f"),
                          f"{real['frames']:.4g} ({over['frames']:.3g})",
                          f"{real['differences']:.4g} ({over['differences']:.3g})",
                          _accuracy(test), _accuracy(test and test["control"])))
        lines += [f"## {title}", "", *markdown_table((*first, *header), cells), ""]
    return lines


def map_figure(result: dict[str, Any]) -> Figure:
    """Four panels against latent size (log2): MSE / PCA-reference, realism of frames and of differences
    (over their floors), two-sample accuracy (floor dashed). One line per linear code; VAE checkpoints of
    one global step (a fixed-budget sweep) joined by a line, every checkpoint labelled."""
    reference = result["reference_size"]
    panels = [("mse_over_pca_reference", f"MSE / PCA-{reference}"), ("frames", "realism, frames (x floor)"),
              ("differences", "realism, differences (x floor)"), ("two_sample", "two-sample accuracy")]
    fig = Figure(figsize=(4.2 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels))

    def spread(rows: list[dict[str, Any]], key: str) -> Optional[list[float]]:
        """The two-sample accuracies' standard deviations over seeds, drawn as error bars."""
        return [r["two_sample"]["spread"] for r in rows] if key == "two_sample" and rows[0].get("two_sample") else None

    def value(row: dict[str, Any], key: str) -> float:
        if key == "mse_over_pca_reference":
            return row[key]
        if key == "two_sample":
            return row["two_sample"]["accuracy"] if row.get("two_sample") else math.nan
        return row["realism_over_floor"][key]

    vae = [r for r in result["rows"] if r["kind"] == "vae"]
    sizes = sorted({r["latent_size"] for r in result["rows"]})
    for ax, (key, title) in zip(axes, panels):
        for kind, marker in (("dct", "s"), ("pca", "o")):
            rows = sorted((r for r in result["rows"] if r["kind"] == kind), key=lambda r: r["latent_size"])
            if rows:
                ax.errorbar([r["latent_size"] for r in rows], [value(r, key) for r in rows], spread(rows, key),
                            marker=marker, capsize=3, label=KINDS[kind])
        for step in dict.fromkeys(r["global_step"] for r in vae):
            group = sorted((r for r in vae if r["global_step"] == step), key=lambda r: r["latent_size"])
            ax.errorbar([r["latent_size"] for r in group], [value(r, key) for r in group], spread(group, key),
                        marker="D", capsize=3, linestyle="-" if len({r["latent_size"] for r in group}) > 1 else "none",
                        label=f"VAE, step {step}")
            for r in group:
                ax.annotate(r["label"], (r["latent_size"], value(r, key)), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        if key == "two_sample" and result["floors"].get("two_sample"):
            ax.axhline(result["floors"]["two_sample"]["accuracy"], color="grey", linestyle="--", label="floor")
        elif key in REALISM_VIEWS:
            ax.axhline(1.0, color="grey", linestyle="--", label="floor")
        elif key == "mse_over_pca_reference":
            ax.axhline(1.0, color="grey", linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(size) for size in sizes])
        ax.minorticks_off()
        ax.set_xlabel("latent size (numbers per window)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"held out: {result['data']['test_dir']}", fontsize=9)
    return fig
