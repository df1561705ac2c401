"""Evaluating a trained checkpoint on held-out mels: scores, the notebook's three problems as
verdicts, and the files of a report (`metrics.json`, `report.md`, PNG figures).

`evaluate` computes, `verdicts` judges, `write_report` / `write_figures` write; `evaluate_checkpoint`
chains them for `scripts/evaluate.py` and `scripts/compare.py`. Reconstructions are decoded from the
posterior mean, as in validation, so every number is repeatable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from musicvae.io.outputs import check_output_folder, write_output, write_output_to
from musicvae.evaluation.realism import TradeOff, half_labels
from musicvae.evaluation.two_sample_report import checkpoint_two_sample, two_sample_lines
from musicvae.evaluation.waveform import DEFAULT_CLIPS, waveform_lines, waveform_metrics
from musicvae.inference.loading import datamodule_for, load_module, resolve_alpha
from musicvae.metrics import ACTIVE_UNIT_THRESHOLD, FEATURELESS_THRESHOLD
from musicvae.io.tables import markdown_table
from musicvae.training.checkpoints import RAW_WEIGHTS_KEY
from musicvae.training.module import MusicVAEModule
from musicvae.training.scoring import LATENT_KEYS, ReconstructionScores, plain_values
from musicvae.plots import band_ratio_figure, kl_per_dim_figure, mel_comparison_figure

# Verdict thresholds, fixed from what each problem means before any recipe was compared.
# (1) Range: the band of range_stats already gives every example 50 % headroom beyond its input's
# own range on each side, so a sound decoder essentially never leaves it; 0.1 % of values (16
# pixels of a 128x128 mel) tolerates isolated outliers but not a widened output scale.
RANGE_OUTSIDE_THRESHOLD = 1e-3
# (2) High frequencies: a band keeping under 80 % of its input's variance has lost a fifth of its
# detail (its standard deviation is down by more than ~10 %), a smoothing the eye sees on the
# shared colour scale; a mild blur stays above.
HF_RATIO_THRESHOLD = 0.8
# "Upper" bands are the segments of the weight table starting in the top half of the mel axis
# (bins 90-101 and 102-127 of 128): where the notebook saw detail go missing.
UPPER_BAND_START = 0.5
# (3) Featureless: the notebook's symptom is that *some* outputs were dark, so a single flat
# reconstruction of a non-silent input counts; FEATURELESS_THRESHOLD already makes each
# example's test generous (under 10 % of its input's variance).
FEATURELESS_FRAC_THRESHOLD = 0.0

#: Scores shown under "reconstruction quality", with their report labels.
QUALITY_METRICS = {"mse": "MSE", "weighted_mse": "weighted MSE", "spectral_convergence": "spectral convergence",
                   "lsd_db": "LSD (dB)", "ssim": "SSIM", "psnr": "PSNR (dB)"}
FIGURES = ("reconstructions.png", "band_ratios.png", "kl_per_dim.png")
#: Every file `evaluate_checkpoint` may write into its folder (the compensated figure only at alpha > 0).
REPORT_FILES = ("metrics.json", "report.md", *FIGURES, "reconstructions_compensated.png")


@dataclass
class Verdict:
    """One of the notebook's problems judged on measured metrics.

    Attributes:
        problem: short name ("output range", "high frequencies", "featureless outputs").
        present: True / False, or None when the metric is undefined (e.g. every input silent).
        value: the number the verdict rests on.
        threshold: the threshold it was compared with.
        rule: the rule in words, e.g. "present if range_frac_outside > 0.001".
        detail: supporting numbers for the report.
    """

    problem: str
    present: Optional[bool]
    value: float
    threshold: float
    rule: str
    detail: str

    @property
    def status(self) -> str:
        return {True: "present", False: "absent", None: "not measurable"}[self.present]


def band_start(name: str) -> int:
    """First mel bin of a band named like ``"90-101"`` (see ReconstructionDiagnostics.band_names)."""
    return int(name.split("-")[0])


def upper_band_names(metrics: dict[str, Any]) -> list[str]:
    """Band names (``"a-b"``) of the bands starting at or above ``UPPER_BAND_START * n_mels``."""
    names = [key.split("/", 1)[1] for key in metrics if key.startswith("band_ratio/")]
    return [name for name in names if band_start(name) >= UPPER_BAND_START * metrics["n_mels"]]


@torch.no_grad()
def evaluate(module: MusicVAEModule, dataset: Dataset, std: float, batch_size: int = 32,
             device: str = "cpu", alpha: Optional[float | str] = None) -> dict[str, Any]:
    """Every diagnostic of `module` on `dataset`, reconstructing from the posterior mean.

    Args:
        module: a trained module; it is moved to `device` and put in eval mode while this runs.
        dataset: normalised `(1, n_mels, frames)` segments (MelDataModule.evaluation_set).
        std: the data's normalisation standard deviation (for spectral convergence and LSD).
        batch_size: examples per forward pass.
        device: "cpu" or "cuda[:i]".

    Returns:
        Plain values: ``n_examples``, ``n_mels``, ``latent_dim``; the scores of
        musicvae.training.scoring.ReconstructionScores but ``band_ratio_error``, as float (``active_units`` as int);
        ``kl_per_dim`` and ``mu_var`` as lists; ``upper_band_ratio_min`` (the lowest variance
        ratio among :func:`upper_band_names`, ignoring NaN); and ``examples``: the ``best``, ``median`` and
        ``worst`` example by per-example MSE, each ``{"index", "mse"}`` plus ``file`` and
        ``start_frame`` when the dataset is a SegmentDataset. ``compensation``: the strength used
        (`alpha`, see :func:`resolve_alpha`), the checkpoint's perceptual point, and the diagnostics of
        the compensated reconstructions; ``realism``: the Fréchet distances of musicvae.evaluation.realism
        at strength 0 and at `alpha`, with the floor (None with fewer than two recordings).
    """
    if len(dataset) == 0:
        raise ValueError("evaluate: the dataset is empty")
    hp = module.hparams
    bands = [tuple(float(v) for v in band) for band in hp.freq_bands]
    # Realism is measured unpaired here (TradeOff, below), so the scorer's paired realism is left out.
    scores = ReconstructionScores(hp.n_mels, bands, latent_dim=hp.latent_dim, std=std, realism=False).to(device)
    strength = resolve_alpha(module, alpha)
    # At strength 0 the compensated output is the plain one: scored once.
    sharp = ReconstructionScores(hp.n_mels, bands, std=std, realism=False).to(device) if strength > 0 else None
    halves = half_labels(dataset)
    plane = None if halves is None else TradeOff(hp.n_mels, module.band_edges, module.output_gain, sorted({0.0, strength}))
    was_training = module.training
    module.to(device).eval()
    example_mse = []
    seen = 0
    try:
        for x in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x = x.to(device)
            mu, logvar = module.vae.encode(x)
            x_hat = module.vae.decode(mu)  # the posterior mean: no sampling noise in the scores
            scores.update(x_hat, x, mu, logvar)
            if sharp is not None:
                sharp.update(module.compensated(x_hat, strength), x)
            if plane is not None:
                plane.update(x_hat, x, halves[seen:seen + len(x)])
            seen += len(x)
            example_mse.append((x_hat - x).double().pow(2).flatten(1).mean(dim=1).cpu())  # (B,)
    finally:
        module.train(was_training)
    metrics: dict[str, Any] = {"n_examples": len(dataset), "n_mels": int(hp.n_mels), "latent_dim": int(hp.latent_dim)}
    plain = _reconstruction_part(plain_values(scores.compute()))
    latent = {key: plain.pop(key) for key in LATENT_KEYS}
    metrics.update(plain)
    upper = [metrics[f"band_ratio/{name}"] for name in upper_band_names(metrics)]
    upper = [r for r in upper if math.isfinite(r)]  # NaN: a band without input variance says nothing
    metrics["upper_band_ratio_min"] = min(upper) if upper else math.nan
    metrics.update(latent)
    metrics["compensation"] = {"alpha": strength, "fitted": bool(module.gain_fitted),
                               "perceptual_alpha": round(float(module.output_alpha), 6),
                               **(plain if sharp is None else _reconstruction_part(plain_values(sharp.compute())))}
    if plane is not None:
        found = plane.compute()
        rows = {row["alpha"]: row["realism"] for row in found["rows"]}
        metrics["realism"] = {"floor": found["floor"], "alpha_0": rows[0.0], "alpha": rows[strength]}
    else:
        metrics["realism"] = None
    metrics["examples"] = _pick_examples(torch.cat(example_mse), dataset)
    return metrics


def _reconstruction_part(values: dict[str, Any]) -> dict[str, Any]:
    # band_ratio_error is validation's one-number summary for picking checkpoints; the report judges
    # the bands through its verdicts instead, so metrics.json keeps the per-band ratios alone.
    return {key: value for key, value in values.items() if key != "band_ratio_error"}


def _pick_examples(mse: torch.Tensor, dataset: Dataset) -> dict[str, dict[str, Any]]:
    order = torch.argsort(mse)  # ascending: best first
    picks = {"best": int(order[0]), "median": int(order[len(order) // 2]), "worst": int(order[-1])}
    examples = {}
    for role, index in picks.items():
        entry: dict[str, Any] = {"index": index, "mse": float(mse[index])}
        items = getattr(dataset, "items", None)
        if items is not None:
            entry["file"] = str(dataset.paths[int(items[index, 0])])
            entry["start_frame"] = int(items[index, 1])
        examples[role] = entry
    return examples


def verdicts(metrics: dict[str, Any]) -> list[Verdict]:
    """The notebook's three problems, each present or absent by its module-level threshold.

    Args:
        metrics: as returned by :func:`evaluate` (at least ``range_frac_outside``, the four
            ``recon_/input_`` min/max, ``featureless_frac``, ``n_mels`` and ``band_ratio/*``).

    Returns:
        ``[output range, high frequencies, featureless outputs]`` verdicts.
    """
    out = []
    frac = metrics["range_frac_outside"]
    out.append(Verdict(
        "output range", _above(frac, RANGE_OUTSIDE_THRESHOLD), frac, RANGE_OUTSIDE_THRESHOLD,
        f"present if more than {RANGE_OUTSIDE_THRESHOLD:.1%} of values lie outside each input's "
        "[min - 0.5 range, max + 0.5 range]",
        f"{frac:.3%} of values outside; reconstructions span [{metrics['recon_min']:.2f}, {metrics['recon_max']:.2f}], "
        f"inputs [{metrics['input_min']:.2f}, {metrics['input_max']:.2f}]",
    ))
    upper = upper_band_names(metrics)
    ratios = {name: metrics[f"band_ratio/{name}"] for name in upper}
    finite = {name: r for name, r in ratios.items() if math.isfinite(r)}
    lowest = min(finite, key=finite.get) if finite else None
    value = finite[lowest] if lowest else math.nan
    out.append(Verdict(
        "high frequencies", None if lowest is None else value < HF_RATIO_THRESHOLD, value, HF_RATIO_THRESHOLD,
        f"present if any upper band (starting at or above bin {math.ceil(UPPER_BAND_START * metrics['n_mels'])}) "
        f"keeps under {HF_RATIO_THRESHOLD:g} of its input's variance",
        "variance ratio (recon / input) per upper band: "
        + ", ".join(f"bins {name}: {r:.3f}" for name, r in ratios.items()),
    ))
    featureless = metrics["featureless_frac"]
    out.append(Verdict(
        "featureless outputs", _above(featureless, FEATURELESS_FRAC_THRESHOLD), featureless,
        FEATURELESS_FRAC_THRESHOLD,
        f"present if the featureless fraction of non-silent examples exceeds {FEATURELESS_FRAC_THRESHOLD:g} "
        f"(featureless: variance under {FEATURELESS_THRESHOLD:g} x the input's)",
        f"{featureless:.2%} of non-silent examples featureless ({metrics.get('silent_frac', 0.0):.1%} of inputs silent)",
    ))
    return out


def _above(value: float, threshold: float) -> Optional[bool]:
    return None if not math.isfinite(value) else value > threshold


def thresholds() -> dict[str, float]:
    """The verdict thresholds, for the record in metrics.json."""
    return {"range_frac_outside": RANGE_OUTSIDE_THRESHOLD, "upper_band_ratio": HF_RATIO_THRESHOLD,
            "upper_band_start_frac": UPPER_BAND_START, "featureless_frac": FEATURELESS_FRAC_THRESHOLD,
            "featureless_variance_fraction": FEATURELESS_THRESHOLD, "active_unit_variance": ACTIVE_UNIT_THRESHOLD}


def json_safe(value: Any) -> Any:
    """`value` with NaN and +-inf floats as None, so the JSON written is standard (no NaN tokens)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """`data` as indented standard JSON, via a temporary file so a kill never leaves half a file."""
    text = json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"
    write_output(path, lambda handle: handle.write(text), mode="w")


def write_figures(out_dir: Path, module: MusicVAEModule, dataset: Dataset, metrics: dict[str, Any],
                  device: str = "cpu") -> list[Path]:
    """`reconstructions.png` (best, median, worst example), `band_ratios.png`, `kl_per_dim.png`."""
    roles = ("best", "median", "worst")
    picks = [metrics["examples"][role] for role in roles]
    x = torch.stack([dataset[p["index"]] for p in picks]).to(device)  # (3, 1, n_mels, frames)
    with torch.no_grad():
        x_hat = module.vae.decode(module.vae.encode(x)[0])
    names = [key.split("/", 1)[1] for key in metrics if key.startswith("band_ratio/")]
    figures = {
        "reconstructions.png": mel_comparison_figure(
            x, x_hat, "best | median | worst by MSE, left to right: "
            + " / ".join(f"{p['mse']:.3g}" for p in picks)),
        "band_ratios.png": band_ratio_figure(names, [metrics[f"band_ratio/{n}"] for n in names],
                                             f"bands from bin {math.ceil(UPPER_BAND_START * metrics['n_mels'])} "
                                             f"judged against {HF_RATIO_THRESHOLD:g}"),
        "kl_per_dim.png": kl_per_dim_figure(torch.tensor(metrics["kl_per_dim"]), torch.tensor(metrics["mu_var"]),
                                            ACTIVE_UNIT_THRESHOLD, f"KL {metrics['kl_nats']:.2f} nats"),
    }
    alpha = metrics.get("compensation", {}).get("alpha", 0.0)
    if alpha > 0:
        figures["reconstructions_compensated.png"] = mel_comparison_figure(
            x, module.compensated(x_hat, alpha), f"the same examples with variance compensation, alpha {alpha:g}")
    paths = []
    for name, figure in figures.items():
        paths.append(write_output_to(out_dir / name, lambda tmp: figure.savefig(tmp, format="png", dpi=90)))
    return paths


def write_report(out_dir: Path, metrics: dict[str, Any], found: list[Verdict], info: dict[str, Any],
                 figures: tuple[str, ...] = FIGURES) -> Path:
    """`report.md`: each problem present/absent with its number and threshold, then scores.

    Args:
        out_dir: existing folder.
        metrics: from :func:`evaluate`.
        found: from :func:`verdicts`.
        info: ``checkpoint`` ({path, epoch, global_step}) and ``data`` ({folder, split}).
        figures: file names of the figures to link.

    Returns:
        The report's path.
    """
    ckpt, data = info["checkpoint"], info["data"]
    lines = [
        f"# Evaluation of `{ckpt['path']}`", "",
        f"Checkpoint epoch {ckpt['epoch']}, step {ckpt['global_step']}, weights: {ckpt.get('weights', 'state_dict')}; "
        f"{metrics['n_examples']} examples "
        f"({data['split']}) from `{data['folder']}`. Reconstructions decoded from the posterior mean.", "",
        "## The notebook's three problems", "",
        *markdown_table(("problem", "verdict", "measured", "rule"),
                        [(f"{i}. {v.problem}", f"**{v.status}**", v.detail, v.rule) for i, v in enumerate(found, 1)]),
        "", "## Reconstruction quality", "",
        *markdown_table(list(QUALITY_METRICS.values()), [[f"{metrics[k]:.4g}" for k in QUALITY_METRICS]]),
    ]
    lines += ["",
              "Variance ratio per band (recon / input; 1 is ideal): "
              + ", ".join(f"{k.split('/', 1)[1]}: {v:.3f}" for k, v in metrics.items() if k.startswith("band_ratio/")),
              "", "## Latent usage", "",
              f"KL {metrics['kl_nats']:.3f} nats per example; {metrics['active_units']} of {metrics['latent_dim']} "
              f"latent units active (variance of the posterior mean over the data > {ACTIVE_UNIT_THRESHOLD:g}).", "",
              *compensation_lines(metrics), *two_sample_lines(metrics.get("two_sample")), *waveform_lines(metrics),
              *(["## Figures", ""] if figures else [])]
    lines += [f"![{name}]({name})" for name in figures]
    text = "\n".join(lines) + "\n"
    return write_output(out_dir / "report.md", lambda handle: handle.write(text), mode="w")


def compensation_lines(metrics: dict[str, Any]) -> list[str]:
    """The report's section on variance compensation and realism."""
    comp, realism = metrics.get("compensation"), metrics.get("realism")
    if comp is None:
        return []
    lines = ["## Variance compensation and realism", ""]
    if not comp["fitted"]:
        lines += ["This checkpoint has no variance-compensation curve (written before musicvae fitted one at each "
                  "validation): only the plain decoder output (alpha 0) is scored.", ""]
    else:
        ratios = ", ".join(f"{k.split('/', 1)[1]}: {v:.3f}" for k, v in comp.items() if k.startswith("band_ratio/"))
        lines += [f"At strength alpha = {comp['alpha']:g} (the checkpoint's perceptual point, fitted on its validation "
                  f"recordings: {comp['perceptual_alpha']:g}): MSE {comp['mse']:.4g} (alpha 0: {metrics['mse']:.4g}); "
                  f"variance ratio per band {ratios}; featureless {comp['featureless_frac']:.3g}, outside the range "
                  f"band {comp['range_frac_outside']:.3g}.", ""]
    if realism is None:
        lines += ["Realism not measured: it compares two halves of the recordings, and this set has fewer than two.", ""]
    else:
        floor = realism["floor"]
        lines += ["Realism, the Fréchet distance of Gaussian fits (reconstructions of one half of the recordings "
                  "against the inputs of the other; lower is more real; the floor is music against music):", "",
                  *markdown_table(("view", "floor", "alpha 0", f"alpha {comp['alpha']:g}"),
                                  [(view, f"{floor[view]:.4g}", f"{realism['alpha_0'][view]:.4g}",
                                    f"{realism['alpha'][view]:.4g}") for view in floor]), ""]
    return lines


def _two_sample_or_none(module: MusicVAEModule, dataset: Dataset, alpha: float, seeds: int,
                        batch_size: int) -> Optional[dict[str, Any]]:
    try:
        return checkpoint_two_sample(module, dataset, alpha, range(seeds), batch_size=batch_size)
    except ValueError:  # fewer than two recordings: nothing to split by
        return None


def windows_digest(dataset: Dataset) -> Optional[str]:
    """A short hash of which windows of which files a SegmentDataset holds (same files -> same hash)."""
    items = getattr(dataset, "items", None)
    if items is None:
        return None
    rows = sorted((Path(dataset.paths[int(f)]).name, int(s)) for f, s in items[:, :2])
    return hashlib.sha1(repr(rows).encode()).hexdigest()[:12]


def evaluate_checkpoint(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, data_dir: Optional[str] = None,
                        device: str = "cpu", batch_size: Optional[int] = None, figures: bool = True,
                        alpha: Optional[float | str] = None, weights: str = "average",
                        force: bool = False, two_sample_seeds: int = 0,
                        waveform_clips: int = DEFAULT_CLIPS) -> dict[str, Any]:
    """Evaluate a checkpoint and write `metrics.json`, `report.md` and the figures into `out_dir`.

    Without `data_dir` the run's own validation split is rebuilt from the rule stored in the
    checkpoint; with it, every recording of that folder is used. Mel settings and normalisation
    always come from the checkpoint. With `two_sample_seeds` > 0, ``metrics["two_sample"]`` holds the
    classifier two-sample test (musicvae.evaluation.two_sample_report.checkpoint_two_sample) with seeds
    0 .. two_sample_seeds - 1; None when the set has fewer than two recordings.

    Returns:
        What `metrics.json` holds: ``checkpoint``, ``data``, ``metrics``, ``examples``,
        ``verdicts`` and ``thresholds``.

    Raises:
        MusicVAEError: (CheckpointError, ConfigError, DataError) a missing or unreadable
            checkpoint, or data that does not match it, with a message for the user; before any
            work, an `out_dir` that cannot be written or already holds REPORT_FILES (unless `force`).
        StorageError: the machine refused a write.
    """
    out = check_output_folder(out_dir, REPORT_FILES, "--out", [ckpt_path], force)
    module, ckpt = load_module(ckpt_path, device, weights)
    datamodule = datamodule_for(ckpt, data_dir=data_dir, batch_size=batch_size)
    split = "all" if data_dir is not None else "val"
    dataset = datamodule.evaluation_set(split)
    metrics = evaluate(module, dataset, datamodule.normalizer.std, datamodule.batch_size, device, alpha)
    # Vocoded windows against the original audio (musicvae/evaluation/waveform.py), `waveform_clips` of them.
    metrics["waveform"] = waveform_metrics(module, dataset, datamodule, waveform_clips, metrics["compensation"]["alpha"], device)
    examples = metrics.pop("examples")
    if two_sample_seeds > 0:
        metrics["two_sample"] = _two_sample_or_none(module, dataset, metrics["compensation"]["alpha"], two_sample_seeds,
                                                    datamodule.batch_size)
    found = verdicts(metrics)
    info = {
        "checkpoint": {"path": str(Path(ckpt_path).resolve()), "epoch": ckpt.get("epoch"),
                       "global_step": ckpt.get("global_step"),
                       "weights": {"average": "state_dict" + (" (the EMA average)" if RAW_WEIGHTS_KEY in ckpt else ""),
                                   "raw": "the raw training weights beside the EMA average"}[weights]},
        "data": {"folder": str(datamodule.folder), "split": "every recording" if split == "all" else
                 f"validation split: seed {datamodule.seed}, val_split {datamodule.val_split}",
                 "n_files": len({int(f) for f in dataset.items[:, 0]}), "windows_sha1": windows_digest(dataset)},
    }
    result = {**info, "metrics": metrics, "examples": examples, "verdicts": [asdict(v) | {"status": v.status} for v in found],
              "thresholds": thresholds()}
    names: tuple[str, ...] = ()
    if figures:
        names = tuple(path.name for path in write_figures(out, module, dataset, {**metrics, "examples": examples}, device))
    write_report(out, metrics, found, info, names)
    write_json(out / "metrics.json", result)  # last: its presence means the evaluation finished
    return result
