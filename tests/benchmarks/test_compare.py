"""The recipe comparison: the winner and spread rule on hand-made numbers, the guards on what a
comparison may vary, and `scripts/compare.py` end to end on tiny data."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import TINY_FLAGS
from helpers import run_command
from musicvae.benchmarks.recipes import (CLAIMS, DEFAULT_BASE, HIGHER, LOWER, RECIPE_KEYS, TOWARD_ONE, check_base,
                                 claim_results, direction, judge, parse_flags, training_args)
from musicvae.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def without(flags: list[str], *keys: str) -> list[str]:
    """`flags` minus the `--key value` pairs of `keys`."""
    out, skip = [], False
    for token in flags:
        if skip:
            skip = False
        elif token in keys:
            skip = True
        else:
            out.append(token)
    return out


#: The tiny model and data of conftest, minus what a comparison must not set (lr, epochs).
COMPARE_FLAGS = without(TINY_FLAGS, "--model.lr", "--trainer.max_epochs")


def test_lower_and_higher_is_better():
    row = judge([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], LOWER)
    assert row["winner"] == "standard" and row["beyond_spread"] is True
    assert row["standard"]["mean"] == pytest.approx(1.0) and row["standard"]["std"] == pytest.approx(0.1)
    row = judge([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], HIGHER)
    assert row["winner"] == "improved" and row["beyond_spread"] is True


def test_beyond_spread_needs_the_difference_to_exceed_both_stds():
    # std 0.1 each: a difference of 0.25 exceeds 0.2, one of 0.15 does not.
    assert judge([1.0, 1.1, 0.9], [1.25, 1.35, 1.15], LOWER)["beyond_spread"] is True
    close = judge([1.0, 1.1, 0.9], [1.15, 1.25, 1.05], LOWER)
    assert close["winner"] == "standard" and close["beyond_spread"] is False


def test_closer_to_one_compares_distances_from_one():
    row = judge([0.7, 0.72, 0.68], [1.1, 1.12, 1.08], TOWARD_ONE)  # 0.3 below vs 0.1 above
    assert row["winner"] == "improved" and row["beyond_spread"] is True
    assert judge([0.75, 0.75], [1.25, 1.25], TOWARD_ONE)["winner"] == "tie"  # exact in binary


def test_undefined_cases():
    assert judge([1.0, 2.0], [1.0, 2.0], LOWER)["winner"] == "tie"
    assert judge([0.1, 0.2], [0.3, 0.4], None)["winner"] is None  # not judged
    assert judge([0.1, math.nan], [0.3, 0.4], LOWER)["winner"] is None
    one_seed = judge([0.1], [0.3], LOWER)
    assert one_seed["winner"] == "standard" and one_seed["beyond_spread"] is None  # no spread from one seed


def test_directions_are_explicit():
    assert direction("mse") == LOWER and direction("psnr") == HIGHER and direction("ssim") == HIGHER
    assert direction("active_units") == HIGHER and direction("band_ratio/90-101") == TOWARD_ONE
    assert direction("kl_nats") is None and direction("recon_max") is None
    assert all(direction(metric) is not None for _, metric in CLAIMS)


def test_claims_follow_winner_and_spread():
    rows = [
        {"metric": "range_frac_outside", **judge([0.02, 0.03], [0.0, 0.001], LOWER)},  # improved, clearly
        {"metric": "upper_band_ratio_min", **judge([0.9, 0.95], [0.5, 0.55], TOWARD_ONE)},  # standard, clearly
        {"metric": "featureless_frac", **judge([0.0, 0.0], [0.0, 0.0], LOWER)},  # both 0
        {"metric": "mse", **judge([0.3, 0.5], [0.35, 0.45], LOWER)},  # within the spread
    ]
    results = {c["claim"]: c["result"] for c in claim_results(rows)}
    assert results == {"better output range": "held", "more high-frequency content": "reversed",
                       "fewer featureless outputs": "not shown", "lower reconstruction error": "not shown"}


def test_flags_and_base_may_not_touch_the_recipes(tmp_path):
    assert parse_flags("--trainer.precision bf16-mixed") == ["--trainer.precision", "bf16-mixed"]
    for key in RECIPE_KEYS:
        with pytest.raises(ConfigError, match="what the recipes differ in"):
            parse_flags([f"--{key}", "1"])
    with pytest.raises(ConfigError, match="compare.py sets"):
        parse_flags("--seed_everything=4")
    check_base(DEFAULT_BASE)
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"latent_dim": 8, "beta": 0.5}}))
    with pytest.raises(ConfigError, match="model.beta"):
        check_base(base)


def test_compare_settings_come_last(tmp_path):
    args = training_args("improved", DEFAULT_BASE, 2, 50, tmp_path, None, ["--data.frames", "32"], False)
    assert args[:5] == ["fit", "--config", str(REPO / "configs" / "improved.yaml"), "--config", str(DEFAULT_BASE)]
    assert args.index("--data.frames") < args.index("--seed_everything") < args.index("--trainer.max_steps")
    assert args[args.index("--trainer.max_epochs") + 1] == "-1"


@pytest.mark.slow
def test_compare_script_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    flags = shlex.join([*COMPARE_FLAGS, "--data.cache_dir", str(tmp_path / "cache")])
    args = ["--out", str(out), "--steps", "6", "--seeds", "2", "--flags", flags]
    done = run_command("compare", args, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compare: [4/4] improved seed 1" in done.stdout

    result = json.loads((out / "comparison.json").read_text())
    runs = result["runs"]
    assert sorted((r["recipe"], r["seed"]) for r in runs) == [("improved", 0), ("improved", 1),
                                                               ("standard", 0), ("standard", 1)]
    for run in runs:
        assert run["global_step"] == 6  # the same budget in optimizer steps
        assert (Path(run["eval_dir"]) / "metrics.json").is_file()
    for seed in (0, 1):  # both recipes of a seed scored on the same held-out windows
        assert len({r["held_out"]["windows_sha1"] for r in runs if r["seed"] == seed}) == 1
    # The recipes kept their own loss, lr and beta.
    for recipe, loss, lr in (("standard", "standard", 1e-4), ("improved", "spectral", 5e-5)):
        config = yaml.safe_load((out / "runs" / recipe / "seed_0" / "ckpt" / "config.yaml").read_text())
        config["model"] = config["model"]["init_args"]
        assert config["model"]["loss"] == loss and config["model"]["lr"] == pytest.approx(lr)
        assert config["model"]["latent_dim"] == 8  # the shared flags applied to both

    table = {row["metric"]: row for row in result["table"]}
    assert {"mse", "ssim", "psnr", "range_frac_outside", "featureless_frac", "upper_band_ratio_min",
            "active_units", "kl_nats"} <= set(table)
    for name, row in table.items():
        for recipe in ("standard", "improved"):
            values = [r["metrics"][name] for r in runs if r["recipe"] == recipe]
            assert row[recipe]["values"] == pytest.approx(values)
            assert row[recipe]["mean"] == pytest.approx(sum(values) / 2)
            assert row[recipe]["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
        assert row["better"] == direction(name)
        if row["better"] is None:
            assert row["winner"] is None
        else:
            assert row["winner"] in ("standard", "improved", "tie") and isinstance(row["beyond_spread"], bool)
    assert [c["claim"] for c in result["claims"]] == [claim for claim, _ in CLAIMS]
    assert all(c["result"] in ("held", "reversed", "not shown") for c in result["claims"])

    md = (out / "comparison.md").read_text()
    assert f"{table['mse']['standard']['mean']:.4g} ± {table['mse']['standard']['std']:.2g}" in md
    for claim in result["claims"]:
        assert f"| {claim['claim']} | {claim['metric']} |" in md and f"**{claim['result']}**" in md
    for claim in result["claims"]:
        assert f"{claim['claim']} ({claim['metric']}): {claim['result']}" in done.stdout

    again = run_command("compare", args, cwd=REPO)
    assert again.returncode == 2 and "compare: error:" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
