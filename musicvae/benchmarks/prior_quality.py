"""The quality benchmark's two-sample tests and learned prior (`benchmark-quality --two_sample_seeds N
--fit_prior`).

- ``two_sample``: the classifier two-sample test (musicvae.evaluation.two_sample_report) on the held-out
  music: floor, noise control, the VAE's reconstructions at alpha 0 and at its perceptual point, and
  prior samples; ``two_sample_training_music``: the same on the training folder's validation windows
  (the training music, windows the model did not train on).
- ``prior_c2st_vs_reconstructions``: decoded prior samples against decoded posterior means of the
  validation windows. The decoder is the same on both sides, so the test sees only the prior: the
  figure written to ``prior.c2st_vs_reconstructions``.
- ``learned_prior`` (with `fit`): musicvae.models.prior.fit_prior on the posterior means of the training
  windows, chosen on the validation windows' codes, with the same tests for its samples, their Fréchet
  realism and the nearest-neighbour check against copying.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from musicvae.compensation import compensate
from musicvae.evaluation.realism import prior_realism
from musicvae.evaluation.two_sample import two_sample_test
from musicvae.evaluation.two_sample_report import (DEFAULT_WINDOWS, interleaved_windows, stack_windows,
                                                   two_sample_lines, two_sample_scores)
from musicvae.inference.prior_fitting import posterior_means
from musicvae.io.tables import markdown_table
from musicvae.models.prior import GaussianPrior, StandardPrior, fit_prior, nearest_neighbour_check

#: Seed of every prior draw the benchmark scores.
SAMPLE_SEED = 0


@torch.no_grad()
def decode_codes(module: Any, z: Tensor, batch_size: int = 64) -> Tensor:
    """Decoded codes ``(N, D)`` -> ``(N, 1, n_mels, T)`` on the CPU."""
    return torch.cat([module.vae.decode(chunk.to(module.device)).float().cpu() for chunk in z.split(batch_size)])


def prior_alone(module: Any, validation: Dataset, samples: Tensor, seeds: Sequence[int],
                max_windows: int = DEFAULT_WINDOWS) -> dict[str, Any]:
    """C2ST of decoded samples against decoded posterior means of `validation`'s windows (split by recording)."""
    indices = interleaved_windows(validation, max_windows)[0]
    x, groups = stack_windows(validation, indices)
    mu = torch.cat([module.vae.encode(chunk.to(module.device))[0].float().cpu() for chunk in x.split(64)])
    return two_sample_test(decode_codes(module, mu), samples[:len(x)], groups, None, seeds)


def two_sample_results(module: Any, test: Dataset, validation: Dataset, train_windows: Dataset,
                       gain: Tensor, alpha: float, edges: Sequence[tuple[int, int]], seeds: Sequence[int],
                       fit: bool, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Every figure of this module's docstring; `seeds` empty skips the two-sample tests (not the fit).

    Returns:
        ``prior_windows`` (two decoded samples of each prior, for a figure: pop it before writing JSON),
        ``two_sample``, ``two_sample_training_music``, ``prior_c2st_vs_reconstructions`` (when `seeds`), and
        ``learned_prior`` (when `fit`): ``best`` (kind, components, covariance), ``table`` (fit_prior's rows),
        ``nearest_neighbour`` and ``realism`` (Fréchet, against the held-out music, musicvae.evaluation.realism.
        prior_realism) for the learned prior's and N(0, I)'s samples, and, with `seeds`, ``c2st_vs_reconstructions``.
    """
    dim = int(module.hparams.latent_dim)
    count = max(len(interleaved_windows(data, DEFAULT_WINDOWS)[0]) for data in (test, validation))
    codes = {"standard": StandardPrior(dim).sample(count, generator=torch.Generator().manual_seed(SAMPLE_SEED))}
    out: dict[str, Any] = {}
    if fit:
        train_codes, val_codes = posterior_means(module, train_windows), posterior_means(module, validation)
        best, table = fit_prior(train_codes, val_codes)
        name = best.__class__.__name__ if isinstance(best, (GaussianPrior, StandardPrior)) else \
            f"mixture-{best.components}-{best.covariance}"
        log(f"learned prior: {name}, validation log-likelihood "
            f"{max(r['val_log_likelihood'] for r in table):.1f} nats per code (N(0, I): {table[0]['val_log_likelihood']:.1f})")
        codes["learned"] = best.sample(count, generator=torch.Generator().manual_seed(SAMPLE_SEED))
        out["learned_prior"] = {
            "best": {"name": name, "components": best.components, "covariance": best.covariance}, "table": table,
            "nearest_neighbour": {key: nearest_neighbour_check(z, train_codes, val_codes) for key, z in codes.items()}}
    decoded = {key: decode_codes(module, z) for key, z in codes.items()}
    out["prior_windows"] = {key: drawn[:2].clone() for key, drawn in decoded.items()}  # for a figure, not results.json
    if fit:  # both priors at the same window count, so their floors are the same
        out["learned_prior"]["realism"] = {key: prior_realism(drawn, test) for key, drawn in decoded.items()}
    if not seeds:
        return out

    def decode(x: Tensor) -> Tensor:
        return module.reconstruct(x).float().cpu()

    points = {f"alpha_{alpha:g}": lambda y: compensate(y, gain, alpha, edges)} if alpha > 0 else {}
    for key, data in (("two_sample", test), ("two_sample_training_music", validation)):
        out[key] = found = _or_none(lambda: two_sample_scores(data, decode, points, decoded, seeds), key, log)
        if found is not None:
            log(f"{key}: " + ", ".join(f"{name} {r['accuracy']:.3f}" for name, r in
                                       {"floor": found["floor"], "control": found["control"],
                                        **found["reconstructions"], **found["samples"]}.items()))
    alone = {key: _or_none(lambda: prior_alone(module, validation, z, seeds), "prior alone", log)
             for key, z in decoded.items()}
    out["prior_c2st_vs_reconstructions"] = alone["standard"]
    if fit:
        out["learned_prior"]["c2st_vs_reconstructions"] = alone["learned"]
    if alone["standard"] is not None:
        log("prior alone (samples against decoded validation codes): " + ", ".join(
            f"{key} {found['accuracy']:.3f} ± {found['spread']:.3f}" for key, found in alone.items()))
    return out


def _or_none(run: Callable[[], dict[str, Any]], what: str, log: Callable[[str], Any]) -> Optional[dict[str, Any]]:
    """`run()`, or None (logged) when its windows come from fewer than two recordings."""
    try:
        return run()
    except ValueError as err:
        log(f"{what}: not measured ({err})")
        return None


def markdown_lines(result: dict[str, Any]) -> list[str]:
    """results.md's sections on the two-sample tests and the learned prior."""
    lines = [*two_sample_lines(result.get("two_sample"), "## Classifier two-sample test: held-out music"),
             *two_sample_lines(result.get("two_sample_training_music"),
                               "## Classifier two-sample test: the training folder's validation windows")]
    alone = result.get("prior", {}).get("c2st_vs_reconstructions")
    learned = result.get("learned_prior")
    if alone:
        lines += ["## The prior alone", "", "Decoded prior samples against decoded posterior means of the training "
                  "folder's validation windows (same decoder on both sides; goal <= 0.60):", "",
                  f"- N(0, I): {alone['accuracy']:.3f} ± {alone['spread']:.3f}"]
        if learned and learned.get("c2st_vs_reconstructions"):
            found = learned["c2st_vs_reconstructions"]
            lines.append(f"- learned ({learned['best']['name']}): {found['accuracy']:.3f} ± {found['spread']:.3f}")
        lines.append("")
    if learned:
        lines += ["## Learned prior", "", "Mean log-likelihood per code (nats) of each candidate, fitted on the "
                  "training windows' posterior means; the best on validation is kept.", "",
                  *markdown_table(("kind", "K", "covariance", "parameters", "train", "validation"),
                                  [(r["kind"], r["components"], r["covariance"], r["parameters"],
                                    f"{r['train_log_likelihood']:.2f}", f"{r['val_log_likelihood']:.2f}")
                                   for r in learned["table"]]), "",
                  "Nearest training code (Euclidean): median distance of samples over held-out codes' median "
                  "(copying shows as far below 1): " + ", ".join(
                      f"{key} {nn['median_ratio']:.3f}" for key, nn in learned["nearest_neighbour"].items()), "",
                  "Realism of the samples against the held-out music (Fréchet, frames / differences; floor in "
                  "brackets): " + ", ".join(
                      f"{key} {r['realism']['frames']:.4g} / {r['realism']['differences']:.4g} "
                      f"({r['floor']['frames']:.4g} / {r['floor']['differences']:.4g})"
                      for key, r in learned["realism"].items()), ""]
    return lines
