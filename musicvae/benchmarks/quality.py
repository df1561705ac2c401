"""Is the VAE a better compressor than PCA? The quality benchmark, as pure functions.

A VAE with a `latent_dim`-dimensional code should at least beat the best *linear* code of the same
size: LinearCode with `latent_dim` components, fitted on the very training segments the VAE saw. This
file fits that PCA (:func:`fit_pca`), scores any reconstruction function on held-out segments with
musicvae.training.scoring's ReconstructionScores (:func:`score_reconstructions`), judges prior samples against
the held-out data's statistics (:func:`prior_diagnostics`), and turns the numbers into the goal
table of `results.md` (:func:`goal_rows`, :func:`markdown_report`). `scripts/benchmark_quality.py`
chains them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from musicvae.io import tables
from musicvae.compensation import PERCEPTUAL_TARGET, CompensationStats, compensate, fit_compensation_curve
from musicvae.evaluation.realism import PLANE_ALPHAS, trade_off
from musicvae.losses import RANGE_MARGIN, Band, range_band
from musicvae.benchmarks.switched_codes import reconstruction_mse
from musicvae.models.linear_codes import LinearCode, fit_pca, fit_separable_code
from musicvae.metrics import FEATURELESS_THRESHOLD, SILENT_VARIANCE, band_edges, band_variances
from musicvae.training.scoring import LATENT_KEYS, ReconstructionScores, plain_values


# The quality goals (docs/quality.md).
MSE_RATIO_GOAL = 0.8           # VAE MSE at most 0.8 x PCA's at the same code size
PERCEPTUAL_MSE_GOAL = 1.0      # at the perceptual point, MSE at most PCA-latent_dim's (at alpha 0)
FEATURELESS_GOAL = 0.0         # no featureless output
RANGE_OUTSIDE_GOAL = 1e-3      # under 0.1 % of values outside the range band
BAND_RATIO_GOAL = (0.9, 1.1)   # each band keeps its variance within 10 %
ACTIVE_FRAC_GOAL = 0.5         # at least half of the latent dims active


def linear_references(train_x: Tensor, test_x: Tensor, latent_dim: int, multiples: Sequence[int] = (2, 4),
                      batch_size: int = 256, shape: Optional[tuple[int, int]] = None,
                      val_x: Optional[Tensor] = None) -> list[dict[str, Any]]:
    """Test MSE of linear codes around PCA-`latent_dim`, to place the VAE between them.

    PCA with `m * latent_dim` components fitted on the training segments says how many linear
    components the VAE's code is worth; PCA-`latent_dim` fitted on the test segments themselves
    is the best any linear code of that size can do on them (an oracle: it has seen the test set),
    so the gap between it and the training PCA is the part of the error due to the albums differing.

    Args:
        train_x: ``(N, D)`` flattened normalised training segments.
        test_x: ``(M, D)`` flattened normalised test segments.
        latent_dim: the VAE's code size.
        multiples: component counts to try, as multiples of `latent_dim` (capped at min(N, D)).
        shape: ``(n_mels, frames)`` of a segment; when given, also the separable basis
            and the 2-D DCT (musicvae.models.linear_codes) with `latent_dim` and each multiple's components,
            fitted on the training segments: the linear path's other starting points.
        val_x: ``(V, D)`` more held-out segments (e.g. the training folder's validation recordings);
            when given, each row also has their MSE as ``"val_mse"``, and the MSE on the segments the
            code was fitted on as ``"train_mse"`` (from its variances: the total minus the kept).

    Returns:
        Rows ``{"name", "basis", "components", "fitted_on", "mse"}``; MSE over every test value.
    """
    def scores(pca: LinearCode) -> dict[str, float]:
        found = {"mse": reconstruction_mse(pca, test_x, batch_size)}
        if val_x is None:
            return found
        return {**found, "val_mse": reconstruction_mse(pca, val_x, batch_size),
                "train_mse": (pca.total_variance - float(pca.variances.sum())) / pca.mean.numel()}

    rows = []
    for m in multiples:
        k = min(m * latent_dim, *train_x.shape)
        rows.append({"name": f"PCA-{k}, training segments", "basis": "pca", "components": k, "fitted_on": "train",
                     **scores(fit_pca(train_x, k))})
    k = min(latent_dim, *test_x.shape)
    rows.append({"name": f"PCA-{k}, test segments (oracle)", "basis": "pca", "components": k, "fitted_on": "test",
                 **scores(fit_pca(test_x, k))})
    if shape is not None:
        for basis, mel_basis, label in (("separable", "eigen", "mel eigenvectors x time DCT"), ("dct", "dct", "2-D DCT")):
            for m in dict.fromkeys((1, *multiples)):  # 1 once, even when among the multiples
                k = min(m * latent_dim, train_x.shape[1])
                rows.append({"name": f"{basis}-{k} ({label}), training segments", "basis": basis, "components": k,
                             "fitted_on": "train", **scores(fit_separable_code(train_x, shape, k, mel_basis))})
    return rows


class PathShares:
    """Standard deviations, over every test value, of a linear-path model's two halves' outputs."""

    def __init__(self) -> None:
        self.sums = torch.zeros(2, 2, dtype=torch.float64)  # (linear, nonlinear) x (sum, sum of squares)
        self.count = 0

    def update(self, linear: torch.Tensor, x_hat: torch.Tensor) -> None:
        for i, part in enumerate((linear, x_hat - linear)):
            part = part.double()
            self.sums[i] += torch.stack([part.sum(), part.pow(2).sum()])
        self.count += x_hat.numel()

    def compute(self) -> dict[str, float]:
        mean = self.sums[:, 0] / self.count
        std = (self.sums[:, 1] / self.count - mean.pow(2)).clamp_min(0).sqrt()
        return {"linear_output_std": float(std[0]), "nonlinear_output_std": float(std[1])}


def data_range(dataset: Dataset, batch_size: int = 64) -> float:
    """max - min over every value of `dataset` (the SSIM range of the held-out data)."""
    lo, hi = math.inf, -math.inf
    for x in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    return hi - lo


Reconstruct = Callable[[Tensor], tuple[Tensor, Optional[tuple[Tensor, Tensor]]]]


@torch.no_grad()
def score_reconstructions(reconstruct: Reconstruct, dataset: Dataset, std: float, n_mels: int,
                          bands: Sequence[Band], ssim_range: float, batch_size: int = 32,
                          latent_dim: Optional[int] = None) -> dict[str, Any]:
    """ReconstructionScores over `dataset`, without paired realism (the plane measures realism unpaired).

    Args:
        reconstruct: ``x -> (x_hat, (mu, logvar) or None)`` for ``(B, 1, n_mels, T)`` batches.
        dataset: normalised held-out segments.
        std: the normalisation standard deviation (spectral convergence, LSD).
        n_mels, bands: the frequency bands of the module's weights.
        ssim_range: SSIM and PSNR data range (the held-out data's max - min).
        latent_dim: D of the posterior; `reconstruct` returns one exactly when it is given.

    Returns:
        Plain floats: every key of ReconstructionDiagnostics, and with a posterior ``kl_nats``,
        ``active_units`` (int) and ``active_frac``.
    """
    scores = ReconstructionScores(n_mels, bands, latent_dim=latent_dim, std=std, data_range=ssim_range,
                                  realism=False)
    for x in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x_hat, posterior = reconstruct(x)
        scores.update(x_hat, x, *(posterior or ()))
    return _table_scores(scores)


def _table_scores(scores: ReconstructionScores) -> dict[str, Any]:
    """The benchmark's selection of `scores`: the reconstruction diagnostics and three latent numbers
    (not band_ratio_error, validation's checkpoint score; not the per-dimension vectors)."""
    return {key: value for key, value in plain_values(scores.compute()).items()
            if key not in ("band_ratio_error", "kl_per_dim", "mu_var")}


@torch.no_grad()
def fit_compensation(reconstruct: Callable[[Tensor], Tensor], dataset: Dataset, n_mels: int, bands: Sequence[Band],
                     batch_size: int = 32) -> dict[str, Any]:
    """The gain curve and perceptual point of a decoder, fitted on `dataset` (validation recordings, never
    the music being scored): what training stores in each checkpoint, for a decoder that has none (PCA).

    Returns:
        ``gain`` (n_mels,), ``alpha``, ``reached`` (whether every band got to PERCEPTUAL_TARGET).
    """
    edges = band_edges(n_mels, bands)
    stats = CompensationStats(n_mels, edges)
    for x in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        stats.update(reconstruct(x), x)
    fit = fit_compensation_curve(stats.compute(), edges, PERCEPTUAL_TARGET)
    return {key: fit[key] for key in ("gain", "alpha", "reached")}


@torch.no_grad()
def score_decoder(reconstruct: Reconstruct, dataset: Dataset, std: float, n_mels: int, bands: Sequence[Band],
                  ssim_range: float, gain: Tensor, alpha: float, batch_size: int = 32,
                  latent_dim: Optional[int] = None) -> dict[str, Any]:
    """:func:`score_reconstructions` at strength 0 and at `alpha`, and the distortion-perception
    curve (musicvae.evaluation.realism.trade_off) at PLANE_ALPHAS and `alpha`, in one pass.

    Returns:
        The scores at 0 (as score_reconstructions), plus ``perceptual``: the same keys at `alpha`,
        with ``alpha``; and ``plane``: ``floor`` and ``rows`` of the trade-off.
    """
    edges = band_edges(n_mels, bands)
    plain = ReconstructionScores(n_mels, bands, latent_dim=latent_dim, std=std, data_range=ssim_range,
                                 realism=False)
    sharp = ReconstructionScores(n_mels, bands, std=std, data_range=ssim_range, realism=False)
    posterior: list[Tensor] = []  # the batch's (mu, logvar), from decode() to both(), which trade_off calls next

    def decode(x: Tensor) -> Tensor:
        x_hat, found = reconstruct(x)
        posterior[:] = found or ()
        return x_hat

    def both(x_hat: Tensor, x: Tensor) -> None:
        plain.update(x_hat, x, *posterior)
        sharp.update(compensate(x_hat, gain, alpha, edges), x)

    alphas = sorted({*PLANE_ALPHAS, round(alpha, 6)})
    plane = trade_off(decode, dataset, n_mels, edges, gain, alphas, batch_size, extra=both)
    scores = _table_scores(plain)
    out: dict[str, Any] = {key: value for key, value in scores.items() if key not in LATENT_KEYS}
    out["perceptual"] = {"alpha": alpha, **_table_scores(sharp)}
    out["plane"] = plane
    out.update({key: value for key, value in scores.items() if key in LATENT_KEYS})
    return out


@torch.no_grad()
def reference_statistics(dataset: Dataset, n_mels: int, bands: Sequence[Band], batch_size: int = 64) -> dict[str, Any]:
    """What prior samples are judged against, from the held-out data (samples have no paired input).

    Returns:
        ``example_variance``: median per-example variance of the non-silent examples;
        ``lo``, ``hi``: medians of the per-example minimum and maximum; ``band_variance``: mean
        per-example variance in each band of :func:`musicvae.metrics.band_edges` (a list).
    """
    edges = band_edges(n_mels, bands)
    var, lo, hi, band = [], [], [], []
    for x in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        flat = x.double().flatten(1)  # (B, D)
        var.append(flat.var(dim=1, correction=0))
        lo.append(flat.amin(dim=1))
        hi.append(flat.amax(dim=1))
        band.append(band_variances(x, x, edges)[0])  # (B, n_bands)
    var = torch.cat(var)
    loud = var[var > SILENT_VARIANCE]
    return {"example_variance": float((loud if len(loud) else var).median()), "lo": float(torch.cat(lo).median()),
            "hi": float(torch.cat(hi).median()), "band_variance": torch.cat(band).mean(dim=0).tolist()}


def prior_diagnostics(samples: Tensor, reference: dict[str, Any], n_mels: int, bands: Sequence[Band],
                      margin: float = RANGE_MARGIN) -> dict[str, Any]:
    """The reconstruction diagnostics, adapted to samples judged against the held-out data.

    A sample is featureless when its variance is under FEATURELESS_THRESHOLD x the median held-out
    example's; a value is outside when it leaves ``[lo - margin*(hi-lo), hi + margin*(hi-lo)]`` of
    the median held-out example's range (the band of range_stats); a band's ratio is the samples'
    mean band variance over the held-out data's.

    Args:
        samples: ``(N, 1, n_mels, T)`` decoded prior draws.
        reference: from :func:`reference_statistics`.

    Returns:
        ``n_samples``, ``featureless_frac``, ``range_frac_outside``, ``sample_min``, ``sample_max``,
        and ``band_ratio/{a}-{b}`` per band.
    """
    flat = samples.double().flatten(1)  # (N, D)
    featureless = flat.var(dim=1, correction=0) < FEATURELESS_THRESHOLD * reference["example_variance"]
    low, high = range_band(torch.as_tensor(reference["lo"]), torch.as_tensor(reference["hi"]), margin)
    outside = (flat < low) | (flat > high)
    out: dict[str, Any] = {"n_samples": int(samples.shape[0]), "featureless_frac": float(featureless.double().mean()),
                           "range_frac_outside": float(outside.double().mean()),
                           "sample_min": float(flat.min()), "sample_max": float(flat.max())}
    edges = band_edges(n_mels, bands)
    sample_band = band_variances(samples, samples, edges)[0].mean(dim=0)  # (n_bands,)
    for (a, b), num, den in zip(edges, sample_band.tolist(), reference["band_variance"]):
        out[f"band_ratio/{a}-{b - 1}"] = num / den if den > 0 else math.nan
    return out


def _gap_interval(value: float, lo: float, hi: float) -> float:
    return max(lo - value, value - hi, 0.0)


def plane_row(scores: dict[str, Any], alpha: float) -> dict[str, Any]:
    """The trade-off row of ``scores["plane"]`` at strength `alpha`."""
    return min(scores["plane"]["rows"], key=lambda r: abs(r["alpha"] - alpha))


def goal_rows(vae: dict[str, Any], pca: dict[str, Any], prior: dict[str, Any], latent_dim: int,
              prior_sharp: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """The table of results.md: one row per metric with its goal and the VAE's gap to it.

    ``gap`` is how far the VAE (or the prior samples) is from the goal, 0 when met, None for
    rows without a goal; ``met`` says the same as a bool. With ``perceptual`` scores (from
    :func:`score_decoder`) the perceptual point's rows follow, and `prior_sharp` (prior samples
    compensated at the VAE's perceptual point) adds theirs.
    """
    rows: list[dict[str, Any]] = []

    def add(metric, v, p, goal=None, gap=None):
        rows.append({"metric": metric, "vae": v, "pca": p, "goal": goal, "gap": gap,
                     "met": None if gap is None else (math.isfinite(gap) and gap <= 0)})

    ratio = vae["mse"] / pca["mse"] if pca["mse"] > 0 else math.nan
    add("MSE", vae["mse"], pca["mse"], f"<= {MSE_RATIO_GOAL:g} x PCA = {MSE_RATIO_GOAL * pca['mse']:.4g}",
        max(vae["mse"] - MSE_RATIO_GOAL * pca["mse"], 0.0))
    add("MSE ratio VAE / PCA", ratio, 1.0, f"<= {MSE_RATIO_GOAL:g}", max(ratio - MSE_RATIO_GOAL, 0.0))
    add("weighted MSE", vae["weighted_mse"], pca["weighted_mse"])
    add("spectral convergence", vae["spectral_convergence"], pca["spectral_convergence"])
    add("SSIM", vae["ssim"], pca["ssim"])
    add("featureless fraction", vae["featureless_frac"], pca["featureless_frac"], f"{FEATURELESS_GOAL:g}",
        max(vae["featureless_frac"] - FEATURELESS_GOAL, 0.0))
    add("outside range band", vae["range_frac_outside"], pca["range_frac_outside"], f"< {RANGE_OUTSIDE_GOAL:g}",
        max(vae["range_frac_outside"] - RANGE_OUTSIDE_GOAL, 0.0))
    lo, hi = BAND_RATIO_GOAL
    for key in (k for k in vae if k.startswith("band_ratio/")):
        add(f"variance ratio bins {key.split('/', 1)[1]}", vae[key], pca[key], f"[{lo:g}, {hi:g}]",
            _gap_interval(vae[key], lo, hi) if math.isfinite(vae[key]) else math.nan)
    need = math.ceil(ACTIVE_FRAC_GOAL * latent_dim)
    add("active units", vae["active_units"], None, f">= {need} of {latent_dim}", float(max(need - vae["active_units"], 0)))
    add("KL (nats / example)", vae["kl_nats"], None)
    add("prior: featureless fraction", prior["featureless_frac"], None, f"{FEATURELESS_GOAL:g}",
        max(prior["featureless_frac"] - FEATURELESS_GOAL, 0.0))
    add("prior: outside range band", prior["range_frac_outside"], None, f"< {RANGE_OUTSIDE_GOAL:g}",
        max(prior["range_frac_outside"] - RANGE_OUTSIDE_GOAL, 0.0))
    for key in (k for k in prior if k.startswith("band_ratio/")):
        add(f"prior: variance ratio bins {key.split('/', 1)[1]}", prior[key], None)
    if "perceptual" not in vae:
        return rows
    sharp, pca_sharp = vae["perceptual"], pca.get("perceptual", {})
    alpha = sharp["alpha"]
    add("perceptual point alpha (fitted on validation)", alpha, pca_sharp.get("alpha"))
    ratio = sharp["mse"] / pca["mse"] if pca["mse"] > 0 else math.nan
    add("perceptual point: MSE / PCA's at alpha 0", ratio, pca_sharp.get("mse", math.nan) / pca["mse"],
        f"<= {PERCEPTUAL_MSE_GOAL:g}", max(ratio - PERCEPTUAL_MSE_GOAL, 0.0))
    for key in (k for k in sharp if k.startswith("band_ratio/")):
        add(f"perceptual point: variance ratio bins {key.split('/', 1)[1]}", sharp[key], pca_sharp.get(key),
            f"[{lo:g}, {hi:g}]", _gap_interval(sharp[key], lo, hi) if math.isfinite(sharp[key]) else math.nan)
    add("perceptual point: featureless fraction", sharp["featureless_frac"], pca_sharp.get("featureless_frac"),
        f"{FEATURELESS_GOAL:g}", max(sharp["featureless_frac"] - FEATURELESS_GOAL, 0.0))
    add("perceptual point: outside range band", sharp["range_frac_outside"], pca_sharp.get("range_frac_outside"),
        f"< {RANGE_OUTSIDE_GOAL:g}", max(sharp["range_frac_outside"] - RANGE_OUTSIDE_GOAL, 0.0))
    floor = vae["plane"]["floor"]
    for view in floor:
        add(f"realism ({view}), floor = {floor[view]:.4g}: alpha 0", plane_row(vae, 0.0)["realism"][view],
            plane_row(pca, 0.0)["realism"][view])
        add(f"realism ({view}): perceptual point", plane_row(vae, alpha)["realism"][view],
            plane_row(pca, pca_sharp.get("alpha", 1.0))["realism"][view])
    if prior_sharp is not None:
        for key in (k for k in prior_sharp if k.startswith("band_ratio/")):
            value = prior_sharp[key]
            add(f"prior at the perceptual point: variance ratio bins {key.split('/', 1)[1]}", value, None,
                f"[{lo:g}, {hi:g}]", _gap_interval(value, lo, hi) if math.isfinite(value) else math.nan)
        add("prior at the perceptual point: featureless fraction", prior_sharp["featureless_frac"], None,
            f"{FEATURELESS_GOAL:g}", max(prior_sharp["featureless_frac"] - FEATURELESS_GOAL, 0.0))
        add("prior at the perceptual point: outside range band", prior_sharp["range_frac_outside"], None,
            f"< {RANGE_OUTSIDE_GOAL:g}", max(prior_sharp["range_frac_outside"] - RANGE_OUTSIDE_GOAL, 0.0))
        for view, value in prior_sharp.get("realism", {}).items():
            add(f"prior at the perceptual point: realism ({view}), floor = "
                f"{prior_sharp['realism_floor'][view]:.4g}", value, None)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """| metric | VAE | PCA | goal | gap | ; gap "met" when reached, "—" without a goal."""
    cells = [(row["metric"], _cell(row["vae"]), _cell(row["pca"]), _cell(row["goal"]),
              "—" if row["gap"] is None else "met" if row["met"] else _cell(row["gap"])) for row in rows]
    return "\n".join(tables.markdown_table(("metric", "VAE", "PCA", "goal", "gap"), cells))


def markdown_report(result: dict[str, Any]) -> str:
    """results.md: what was compared, then the goal table."""
    ckpt, data, pca = result["checkpoint"], result["data"], result["pca"]
    met = sum(1 for r in result["goals"] if r["met"])
    judged = sum(1 for r in result["goals"] if r["met"] is not None)
    return "\n".join([
        "# Quality benchmark: VAE vs PCA at the same code size", "",
        f"Checkpoint `{ckpt['path']}` (step {ckpt['global_step']}, latent_dim {ckpt['latent_dim']}). "
        f"Trained on `{data['train_dir']}`; tested on every recording of `{data['test_dir']}` "
        f"({data['n_test_examples']} segments).", "",
        f"PCA: {pca['n_components']} components ({pca['method']}) fitted on the {pca['n_train_examples']} "
        f"normalised training segments, keeping {pca['explained_variance_ratio']:.1%} of their variance. "
        f"VAE reconstructions decoded from the posterior mean; SSIM with data_range {data['ssim_range']:.3g} "
        f"(the test data's max - min). Prior: {result['prior']['n_samples']} samples judged against the test "
        "data's statistics.", "",
        f"Goals met: {met} of {judged}.", "",
        markdown_table(result["goals"]), "",
        *plane_lines(result),
        *_references_lines(result),
    ])


def plane_lines(result: dict[str, Any]) -> list[str]:
    """The distortion-perception plane as a table (VAE and PCA at each strength), and the figures."""
    vae, pca = result["vae"], result.get("pca_scores", {})
    if "plane" not in vae:
        return []
    floor = vae["plane"]["floor"]
    lines = ["## Distortion-perception plane", "",
             "Test MSE against realism (Fréchet distance between Gaussian fits of mel frames and of frame-to-frame "
             "differences; reconstructions of one half of the test recordings against the inputs of the other, "
             f"{vae['plane']['windows_per_half']} windows each; lower is more real). Floor, music against music: "
             f"frames {floor['frames']:.4g}, differences {floor['differences']:.4g}. `bound`: the least MSE a "
             "per-band gain on the alpha-0 output can have at the same band ratios. Perceptual points (fitted on the "
             f"training folder's validation recordings): VAE alpha {vae['perceptual']['alpha']:g}, PCA alpha "
             f"{pca.get('perceptual', {}).get('alpha', math.nan):g}.", ""]
    cells = []
    pca_rows = {r["alpha"]: r for r in pca.get("plane", {}).get("rows", [])}
    for row in vae["plane"]["rows"]:
        other = pca_rows.get(row["alpha"], {})
        cells.append((f"{row['alpha']:g}", _cell(row["mse"]), _cell(row["bound_mse"]), _cell(row["realism"]["frames"]),
                      _cell(row["realism"]["differences"]), _cell(min(row["band_ratio"])),
                      _cell(other.get("mse")), _cell(other.get("realism", {}).get("frames")),
                      _cell(other.get("realism", {}).get("differences")),
                      _cell(min(other["band_ratio"]) if other else None)))
    lines += tables.markdown_table(("alpha", "VAE MSE", "VAE bound", "VAE realism frames", "VAE realism diffs",
                                    "VAE lowest band ratio", "PCA MSE", "PCA realism frames", "PCA realism diffs",
                                    "PCA lowest band ratio"), cells)
    oracle = vae["plane"].get("oracle")
    if oracle:
        lines += ["", f"An oracle for comparison, not a model: a gain curve fitted on the test windows themselves reaches "
                  f"{'every band at 0.9' if oracle['reached'] else 'no point with every band at 0.9'} at alpha "
                  f"{oracle['alpha']:g}, MSE {oracle['mse']:.4g} ({oracle['mse'] / pca['mse']:.3f}x PCA-latent_dim at "
                  "alpha 0; band ratios " + ", ".join(f"{r:.3g}" for r in oracle["band_ratio"]) + "): what any per-bin "
                  "gain on this decoder's output costs here."]
    extra = result.get("extra_points") or []
    if extra:
        lines += ["", "Further checkpoints on the same plane (`--also`), at strength 0 and at their own perceptual point:",
                  ""]
        cells = []
        for point in extra:
            for row in sorted({r["alpha"]: r for r in point["rows"] if r["alpha"] in (0.0, point["mark"])}.values(),
                              key=lambda r: r["alpha"]):
                cells.append((point["label"], f"step {point['global_step']}", f"{row['alpha']:g}", _cell(row["mse"]),
                              _cell(row["mse"] / pca["mse"]) if pca else "—", _cell(row["realism"]["frames"]),
                              _cell(row["realism"]["differences"]),
                              ", ".join(f"{r:.3g}" for r in row["band_ratio"])))
        lines += tables.markdown_table(("checkpoint", "step", "alpha", "MSE", "/ PCA", "realism frames",
                                        "realism diffs", "band ratios"), cells)
    return [*lines, "", "![trade-off](trade_off.png)", "", "![mels](mels.png)", ""]


def _references_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    if result.get("linear_path"):
        shares = result["linear_path"]
        lines += ["## Linear path", "", f"Standard deviation of the outputs over the test values: linear half "
                  f"{shares['linear_output_std']:.4g}, nonlinear half {shares['nonlinear_output_std']:.4g}.", ""]
    rows = result.get("linear_references")
    if not rows:
        return lines
    pca_mse = result["pca_scores"]["mse"]
    lines += ["## Linear references", "", "| code | test MSE | / PCA-latent_dim (train) |", "|---|---|---|",
             f"| the VAE | {_cell(result['vae']['mse'])} | {_cell(result['mse_ratio'])} |"]
    lines += [f"| {r['name']} | {_cell(r['mse'])} | {_cell(r['mse'] / pca_mse)} |" for r in rows]
    return [*lines, ""]
