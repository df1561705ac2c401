"""The notebook's claim, tested: the standard and the improved recipe trained alike over seeds.

Each recipe (`configs/standard.yaml`, `configs/improved.yaml`) is trained with a shared `--base`
config (architecture, data, trainer) on top, for the same number of optimizer steps, once per
seed, through `musicvae.training.cli.cli_main`; every run's `last.ckpt` (the model after exactly that
budget; `best.ckpt` is chosen by each recipe's own loss, on different scales) is then evaluated by
`musicvae.evaluation.report`. Metrics become a table of mean +- std per recipe with a winner per metric.

Held-out data. The CLI links the split seed to `seed_everything`, so runs of different seeds train
on different files. Both recipes of one seed share the same split, so by default each pair is
evaluated on that seed's validation files: both recipes always see the same held-out files, and
none of them was trained on. (One common split for all seeds, such as seed 0's, would include
files that the runs of other seeds trained on.) The seed-to-seed spread therefore includes the
choice of held-out files. With `test_dir` every run is evaluated on every recording of that one
folder instead.

Winner rule. Each metric has a direction: lower is better, higher is better, or closer to 1 is
better (variance ratios); metrics without one (value ranges, KL) are shown but not judged. With
``m`` a recipe's mean over seeds and ``s`` its sample standard deviation (ddof=1), the score is
``m``, ``-m`` or ``|m - 1|``; the lower score wins, and the difference counts as beyond the
seed-to-seed spread when ``|score_a - score_b| > s_a + s_b`` (both read off the table; needs two
or more seeds). Metric definitions are those of `musicvae.metrics`, unchanged for the comparison.
"""

from __future__ import annotations

import math
import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import yaml

from musicvae.io.tables import markdown_table
from musicvae.training.recipes import recipe_path
from musicvae.training.checkpoints import flatten
from musicvae.errors import ConfigError
from musicvae.evaluation.report import evaluate_checkpoint, write_json

BASELINE, CANDIDATE = "standard", "improved"
RECIPES = {BASELINE: recipe_path("standard.yaml"), CANDIDATE: recipe_path("improved.yaml")}
DEFAULT_BASE = recipe_path("compare_small.yaml")
# About 19 epochs of the default synthetic data at batch 32 with compare_small.yaml: both recipes
# halve their validation MSE and still improve slowly, in minutes on a CPU (docs/quality.md,
# "Standard vs improved", has the figures and the command).
DEFAULT_STEPS = 600
DEFAULT_SEEDS = 3

#: What the recipes differ in: the base config and --flags must leave these to the recipe files.
RECIPE_KEYS = ("model.loss", "model.lr", "model.beta", "model.spectral_weight", "model.output_reg_weight")
#: Settings compare.py sets itself for every run.
OWNED_KEYS = ("config", "seed_everything", "trainer.max_steps", "trainer.max_epochs", "checkpoint_dir",
              "trainer.logger.init_args.save_dir", "data.data_dir", "overwrite", "ckpt_path")

LOWER, HIGHER, TOWARD_ONE = "lower", "higher", "closer to 1"
DIRECTIONS = {
    "range_frac_outside": LOWER,
    "featureless_frac": LOWER,
    "mse": LOWER,
    "weighted_mse": LOWER,
    "spectral_convergence": LOWER,
    "lsd_db": LOWER,
    "ssim": HIGHER,
    "psnr": HIGHER,
    # More latent dimensions carrying information about the input: the opposite of collapse.
    "active_units": HIGHER,
    "active_frac": HIGHER,
    "upper_band_ratio_min": TOWARD_ONE,
}
# Not judged: value ranges describe problem (1) but range_frac_outside is its measure; silent_frac
# describes the data; KL grows with what the latent carries but its price is set by each recipe's beta.
NOT_JUDGED = ("recon_min", "recon_max", "input_min", "input_max", "silent_frac", "kl_nats")
#: Counts and sizes in the evaluation output that are not metrics.
NOT_METRICS = ("n_examples", "n_mels", "latent_dim")

#: The notebook's four expected improvements and the metric that tests each.
CLAIMS = (
    ("better output range", "range_frac_outside"),
    ("more high-frequency content", "upper_band_ratio_min"),
    ("fewer featureless outputs", "featureless_frac"),
    ("lower reconstruction error", "mse"),
)


def direction(metric: str) -> Optional[str]:
    """Which way `metric` is better: LOWER, HIGHER, TOWARD_ONE, or None when it is not judged."""
    if metric.startswith("band_ratio/"):
        return TOWARD_ONE
    return DIRECTIONS.get(metric)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """``mean``, sample ``std`` (ddof=1; 0 for one value) and the ``values``; NaN if any is not finite."""
    values = [float(v) for v in values]
    if not values or not all(math.isfinite(v) for v in values):
        return {"mean": math.nan, "std": math.nan, "values": values}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def judge(a: Sequence[float], b: Sequence[float], better: Optional[str],
          names: tuple[str, str] = (BASELINE, CANDIDATE)) -> dict[str, Any]:
    """The winner of one metric between recipes `a` and `b` (values over seeds); see the module doc.

    Returns:
        ``{names[0]: summary, names[1]: summary, "better": better, "winner": name | "tie" | None,
        "beyond_spread": bool | None}``; winner None when not judged or a value is not finite,
        beyond_spread None then or with fewer than two seeds each.
    """
    sa, sb = summarize(a), summarize(b)
    row = {names[0]: sa, names[1]: sb, "better": better, "winner": None, "beyond_spread": None}
    if better is None or not all(math.isfinite(s["mean"]) for s in (sa, sb)):
        return row
    score = {LOWER: lambda m: m, HIGHER: lambda m: -m, TOWARD_ONE: lambda m: abs(m - 1.0)}[better]
    score_a, score_b = score(sa["mean"]), score(sb["mean"])
    row["winner"] = "tie" if score_a == score_b else names[0] if score_a < score_b else names[1]
    if min(len(sa["values"]), len(sb["values"])) >= 2:
        row["beyond_spread"] = abs(score_a - score_b) > sa["std"] + sb["std"]
    return row


def comparison_table(metrics: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per scalar metric (see :func:`judge`), from ``{recipe: [metrics of each seed]}``."""
    first = metrics[BASELINE][0]
    names = [k for k, v in first.items() if isinstance(v, (int, float)) and k not in NOT_METRICS]
    return [{"metric": name, **judge([m[name] for m in metrics[BASELINE]], [m[name] for m in metrics[CANDIDATE]],
                                     direction(name))} for name in names]


def claim_results(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whether each of the notebook's expected improvements held, by its metric's row.

    ``held``: the improved recipe won beyond the spread; ``reversed``: the standard one did;
    ``not shown``: a tie or a difference within the spread; ``undetermined``: no verdict possible.
    """
    rows = {row["metric"]: row for row in table}
    out = []
    for claim, metric in CLAIMS:
        row = rows[metric]
        if row["winner"] is None or (row["winner"] != "tie" and row["beyond_spread"] is None):
            result = "undetermined"
        elif row["winner"] == "tie" or not row["beyond_spread"]:
            result = "not shown"
        else:
            result = "held" if row["winner"] == CANDIDATE else "reversed"
        out.append({"claim": claim, "metric": metric, "result": result, "winner": row["winner"],
                    BASELINE: row[BASELINE], CANDIDATE: row[CANDIDATE]})
    return out


def parse_flags(flags: str | Sequence[str]) -> list[str]:
    """Extra training flags (a shell-quoted string or a list), refused when they would set a recipe
    key (the comparison would compare nothing) or one compare.py sets itself."""
    tokens = shlex.split(flags) if isinstance(flags, str) else list(flags)
    for token in tokens:
        key = token[2:].split("=", 1)[0] if token.startswith("--") else None
        if key in RECIPE_KEYS:
            raise ConfigError(f"--flags sets --{key}, which is what the recipes differ in; leave it to {RECIPES[BASELINE].name} "
                              f"and {RECIPES[CANDIDATE].name}")
        if key in OWNED_KEYS:
            raise ConfigError(f"--flags sets --{key}, which compare.py sets for every run "
                              "(use --base, --steps, --seeds, --data_dir or --out)")
    return tokens


def check_base(base: Path) -> None:
    """Refuse a base config that is missing or sets a recipe key."""
    if not base.is_file():
        raise ConfigError(f"--base {base}: no such config file")
    config = yaml.safe_load(base.read_text()) or {}
    clashes = [key for key in flatten(config) if key in RECIPE_KEYS]
    if clashes:
        raise ConfigError(f"--base {base} sets {', '.join(clashes)}: a base config holds only model-size, data and "
                          "trainer keys, so that the recipes keep their own loss, lr and beta")


def training_args(recipe: str, base: Path, seed: int, steps: int, run_dir: Path, data_dir: Optional[str],
                  flags: Sequence[str], overwrite: bool) -> list[str]:
    """`cli_main` arguments of one run: recipe, then base, then user flags, then compare's own settings."""
    args = ["fit", "--config", str(RECIPES[recipe]), "--config", str(base), *flags,
            "--seed_everything", str(seed), "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1",
            "--checkpoint_dir", str(run_dir / "ckpt"), "--trainer.logger.init_args.save_dir", str(run_dir / "logs")]
    if data_dir is not None:
        args += ["--data.data_dir", str(data_dir)]
    if overwrite:
        args += ["--overwrite", "true"]
    return args


def run_comparison(out: str | Path, base: str | Path = DEFAULT_BASE, steps: int = DEFAULT_STEPS,
                   seeds: int = DEFAULT_SEEDS, data_dir: Optional[str] = None, test_dir: Optional[str] = None,
                   flags: str | Sequence[str] = (), device: str = "cpu", overwrite: bool = False,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train both recipes for `steps` optimizer steps per seed, evaluate, and write the tables.

    Args:
        out: folder for `comparison.md`, `comparison.json` and `runs/{recipe}/seed_{s}/` (ckpt, logs, eval).
        base: shared config applied on top of each recipe (model size, data, trainer).
        steps: optimizer steps of every run (`trainer.max_steps`; epochs do not limit).
        seeds: runs per recipe, with `seed_everything` 0 .. seeds-1.
        data_dir: training folder (default: the built-in synthetic music).
        test_dir: held-out folder evaluated whole for every run (default: each seed's validation split).
        flags: extra training flags for every run, e.g. "--trainer.precision bf16-mixed".
        device: device of the evaluation.
        overwrite: replace the runs of an earlier comparison in `out`.
        log: progress printer.

    Returns:
        What `comparison.json` holds: ``settings``, ``runs``, ``table``, ``claims``, ``problems``.
    """
    from musicvae.training.cli import cli_main  # the CLI pulls in LightningCLI; the rules above do not need it

    out, base = Path(out), Path(base)
    if steps < 1 or seeds < 1:
        raise ConfigError(f"--steps {steps} and --seeds {seeds} must be positive")
    check_base(base)
    flags = parse_flags(flags)
    runs_dir = out / "runs"
    used = sorted(runs_dir.glob("*/seed_*/ckpt/*.ckpt")) if runs_dir.is_dir() else []
    if used and not overwrite:
        raise ConfigError(f"{out} already holds the runs of a comparison ({used[0]}, ...); choose another --out "
                          "or pass --overwrite")
    started, runs = time.monotonic(), []
    plan = [(seed, recipe) for seed in range(seeds) for recipe in RECIPES]
    for number, (seed, recipe) in enumerate(plan, 1):
        run_dir = runs_dir / recipe / f"seed_{seed}"
        log(f"compare: [{number}/{len(plan)}] {recipe} seed {seed}: training {steps} steps -> {run_dir}")
        tic = time.monotonic()
        cli_main(training_args(recipe, base, seed, steps, run_dir, data_dir, flags, overwrite))
        trained = time.monotonic() - tic
        result = evaluate_checkpoint(run_dir / "ckpt" / "last.ckpt", run_dir / "eval", test_dir, device,
                                     force=overwrite)
        metrics = {k: v for k, v in result["metrics"].items() if not isinstance(v, list)}
        runs.append({"recipe": recipe, "seed": seed, "global_step": result["checkpoint"]["global_step"],
                     "train_seconds": round(trained, 1), "eval_dir": str(run_dir / "eval"),
                     "held_out": result["data"], "metrics": metrics,
                     "verdicts": {v["problem"]: v["status"] for v in result["verdicts"]}})
        log(f"compare: [{number}/{len(plan)}] {recipe} seed {seed}: {trained:.0f} s, step {runs[-1]['global_step']}, "
            f"mse {metrics['mse']:.4g}, upper-band ratio {metrics['upper_band_ratio_min']:.3g}, "
            f"featureless {metrics['featureless_frac']:.3g}, outside range {metrics['range_frac_outside']:.3g}")
    _check_same_held_out(runs)
    by_recipe = {name: [r["metrics"] for r in runs if r["recipe"] == name] for name in RECIPES}
    table = comparison_table(by_recipe)
    result = {
        "settings": {"recipes": {k: str(v) for k, v in RECIPES.items()}, "base": str(base), "steps": steps,
                     "seeds": list(range(seeds)), "data_dir": data_dir, "flags": flags, "checkpoint": "last.ckpt",
                     "held_out": f"every recording of {test_dir}" if test_dir else "each seed's validation split "
                     "(the same files for both recipes of a seed)",
                     "rule": "score = mean, -mean or |mean - 1| by direction; lower score wins; beyond spread when "
                             "|score_a - score_b| > std_a + std_b (sample std over seeds)"},
        "runs": runs, "table": table, "claims": claim_results(table), "problems": problem_counts(runs),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "comparison.json", result)
    (out / "comparison.md").write_text(markdown(result))
    log(f"compare: done in {result['wall_seconds']:.0f} s: {out / 'comparison.md'}")
    return result


def _check_same_held_out(runs: list[dict[str, Any]]) -> None:
    # Both recipes of a seed must have been scored on identical windows, or the pair compares nothing.
    for seed in {r["seed"] for r in runs}:
        digests = {r["recipe"]: r["held_out"]["windows_sha1"] for r in runs if r["seed"] == seed}
        if len(set(digests.values())) != 1:
            raise RuntimeError(f"seed {seed}: the recipes were evaluated on different windows: {digests}")


def problem_counts(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each of the notebook's problems, in how many runs of each recipe evaluate found it present."""
    problems = list(runs[0]["verdicts"])
    return [{"problem": p, **{name: sum(r["verdicts"][p] == "present" for r in runs if r["recipe"] == name)
                             for name in RECIPES}, "runs_per_recipe": sum(r["recipe"] == BASELINE for r in runs)}
            for p in problems]


def _cell(summary: dict[str, Any]) -> str:
    if not math.isfinite(summary["mean"]):
        return "n/a"
    return f"{summary['mean']:.4g} ± {summary['std']:.2g}"


def markdown(result: dict[str, Any]) -> str:
    """`comparison.md`: settings, the four claims, the per-metric table, problem counts per run."""
    s = result["settings"]
    lines = [
        f"# {BASELINE} vs {CANDIDATE} recipe", "",
        f"{len(s['seeds'])} seeds ({', '.join(map(str, s['seeds']))}) x {s['steps']} optimizer steps each; "
        f"base config `{s['base']}`; data: {s['data_dir'] or 'built-in synthetic music'}; "
        f"extra flags: `{' '.join(s['flags']) or 'none'}`. Evaluated: {s['checkpoint']} on {s['held_out']}. "
        f"Wall time {result['wall_seconds']:.0f} s.", "",
        f"Values are mean ± sample std over seeds. Rule: {s['rule']}.", "",
        "## The notebook's expected improvements", "",
    ]
    lines += markdown_table(("expected improvement", "metric", BASELINE, CANDIDATE, "result"),
                            [(c["claim"], c["metric"], _cell(c[BASELINE]), _cell(c[CANDIDATE]), f"**{c['result']}**")
                             for c in result["claims"]])
    lines += ["", "## Every metric", ""]
    lines += markdown_table(("metric", "better", BASELINE, CANDIDATE, "winner", "beyond spread"),
                            [(row["metric"], row["better"] or "not judged", _cell(row[BASELINE]), _cell(row[CANDIDATE]),
                              row["winner"] or "-", {True: "yes", False: "no", None: "-"}[row["beyond_spread"]])
                             for row in result["table"]])
    lines += ["", "weighted_mse is part of the improved recipe's training loss and mse is the standard recipe's; "
              "each is shown as defined, not adjusted.", "",
              "## The notebook's problems, runs where present", ""]
    lines += markdown_table(("problem", BASELINE, CANDIDATE),
                            [(p["problem"], f"{p[BASELINE]}/{p['runs_per_recipe']}", f"{p[CANDIDATE]}/{p['runs_per_recipe']}")
                             for p in result["problems"]])
    return "\n".join(lines) + "\n"
