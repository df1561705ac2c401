"""A learned prior on a trained checkpoint: `musicvae fit-prior` writes it, `generate` and `musicvae.load`
draw from it (`--prior auto|standard|learned`), save_pretrained carries it, and a crafted one is refused
in one line before anything is built from it; all on the session's tiny trained checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

import musicvae
from helpers import run_command
from musicvae.errors import CheckpointError, ConfigError
from musicvae.inference.generation import load_generation_model
from musicvae.inference.priors import PRIOR_KEY
from musicvae.models.prior import MixturePrior, StandardPrior

#: Griffin-Lim iterations: the tests compare files, not how they sound.
ITERS = 4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted(tiny_run, tmp_path_factory) -> dict:
    """`musicvae fit-prior` on a copy of the tiny run's best.ckpt (the shared folder stays as it is)."""
    folder = tmp_path_factory.mktemp("fit_prior")
    ckpt = folder / "best.ckpt"
    shutil.copy(tiny_run["ckpt_dir"] / "best.ckpt", ckpt)
    run = run_command("fit-prior", ["--ckpt_path", str(ckpt), "--components", "[2, 4]", "--seed", "3",
                                    "--data.cache_dir", str(tiny_run["cache_dir"])])
    return {"plain": ckpt, "prior": folder / "best.prior.ckpt", "run": run}


def test_fit_prior_writes_a_checkpoint_whose_prior_loads_weights_only_and_samples_repeatably(fitted):
    run = fitted["run"]
    assert run.returncode == 0, run.stderr
    assert "chosen" in run.stdout and f"wrote {fitted['prior']}" in run.stdout
    ckpt = torch.load(fitted["prior"], map_location="cpu", weights_only=True)
    record = ckpt[PRIOR_KEY]
    table = record["fitted_on"]["candidates"]
    assert [row["kind"] for row in table[:2]] == ["standard", "gaussian"]  # N(0, I) is always a candidate
    best = max(table, key=lambda row: row["val_log_likelihood"])
    assert (record["kind"], record["components"], record["covariance"]) == \
        (best["kind"], best["components"], best["covariance"])
    assert record["latent_dim"] == 8 and record["fitted_on"]["seed"] == 3
    assert record["kind"] != "standard"  # two epochs leave codes far from N(0, I): a fitted prior wins
    assert set(ckpt) - {PRIOR_KEY} == set(torch.load(fitted["plain"], map_location="cpu", weights_only=True))
    prior = load_generation_model(fitted["prior"]).prior
    assert isinstance(prior, MixturePrior) and not isinstance(prior, StandardPrior)
    draws = prior.sample(6, 1.0, torch.Generator().manual_seed(11))
    assert torch.equal(draws, prior.sample(6, 1.0, torch.Generator().manual_seed(11)))
    assert not torch.equal(draws, prior.sample(6, 1.0, torch.Generator().manual_seed(12)))
    assert isinstance(load_generation_model(fitted["plain"]).prior, StandardPrior)  # none stored: N(0, I)

    again = run_command("fit-prior", ["--ckpt_path", str(fitted["plain"])])
    assert again.returncode == 2 and "already exists; pass --force" in again.stderr
    itself = run_command("fit-prior", ["--ckpt_path", str(fitted["plain"]), "--out", str(fitted["plain"]), "--force"])
    assert itself.returncode == 2 and "is the input" in itself.stderr


def _samples(ckpt: Path, out: Path, prior: str) -> tuple[int, list[np.ndarray], str]:
    run = run_command("generate", ["sample", "--ckpt_path", str(ckpt), "-n", "2", "--seed", "0", "--out", str(out),
                                   "--griffin_lim_iters", str(ITERS), "--prior", prior])
    waves = [sf.read(path, dtype="float32")[0] for path in sorted(out.glob("sample_*.wav"))]
    return run.returncode, waves, run.stdout + run.stderr


def test_generate_draws_from_the_learned_prior_by_default_and_from_n01_when_asked(fitted, tmp_path):
    status, learned, said = _samples(fitted["prior"], tmp_path / "learned", "learned")
    assert status == 0, said
    status, auto, _ = _samples(fitted["prior"], tmp_path / "auto", "auto")
    status_std, standard, _ = _samples(fitted["prior"], tmp_path / "standard", "standard")
    status_plain, plain, _ = _samples(fitted["plain"], tmp_path / "plain", "auto")
    assert status == status_std == status_plain == 0 and len(learned) == len(standard) == 2
    assert all(np.array_equal(a, b) for a, b in zip(auto, learned))  # auto picks the learned prior
    assert not any(np.array_equal(a, b) for a, b in zip(learned, standard))
    assert all(np.array_equal(a, b) for a, b in zip(standard, plain))  # N(0, I): the same draws as before

    refused, written, said = _samples(fitted["plain"], tmp_path / "none", "learned")
    assert refused == 2 and "carries no learned prior; fit one with `musicvae fit-prior" in said
    assert len(said.strip().splitlines()) == 1 and not written


def test_interpolate_takes_the_same_path_and_scores_it_under_the_prior(fitted, tmp_path):
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", np.random.default_rng(len(name)).normal(-4, 2, (32, 60)).astype(np.float32))
    said, morphs = {}, {}
    for prior in ("learned", "standard"):
        run = run_command("generate", ["interpolate", "--ckpt_path", str(fitted["prior"]), str(tmp_path / "a.npy"),
                                       str(tmp_path / "b.npy"), "--steps", "3", "--out", str(tmp_path / prior),
                                       "--griffin_lim_iters", str(ITERS), "--prior", prior])
        assert run.returncode == 0, run.stderr
        said[prior] = next(line for line in run.stdout.splitlines() if line.startswith("log-density"))
        morphs[prior] = sf.read(tmp_path / prior / "morph.wav", dtype="float32")[0]
    assert np.array_equal(morphs["learned"], morphs["standard"])  # the path does not depend on the prior
    assert "under the prior N(0, I)" in said["standard"] and "N(0, I)" not in said["learned"]
    assert said["learned"].split(":")[1] != said["standard"].split(":")[1]


def test_the_python_api_uses_the_same_choice(fitted):
    model = musicvae.load(fitted["prior"])
    learned = model.sample(2, seed=4, griffin_lim_iters=ITERS, prior="learned")
    assert torch.equal(model.sample(2, seed=4, griffin_lim_iters=ITERS), learned)
    assert not torch.equal(model.sample(2, seed=4, griffin_lim_iters=ITERS, prior="standard"), learned)
    with pytest.raises(ConfigError, match="prior learned: this model carries no learned prior"):
        musicvae.load(fitted["plain"]).sample(1, prior="learned")


def _crafted(fitted: dict, tmp_path: Path, change) -> Path:
    ckpt = torch.load(fitted["prior"], map_location="cpu", weights_only=True)
    change(ckpt[PRIOR_KEY])
    path = tmp_path / "crafted.ckpt"
    torch.save(ckpt, path)
    return path


def _set(key, value):
    return lambda record: record.__setitem__(key, value)


def _set_state(key, value):
    return lambda record: record["state"].__setitem__(key, value(record["state"][key]))


@pytest.mark.parametrize("change, message", [
    (_set("kind", "flow"), r"prior kind 'flow' is not one of"),
    (_set("components", 10**12), r"prior components 1000000000000 must be an integer in \[1, 1024\]; refused before"),
    (_set("covariance", "spherical"), "prior covariance 'spherical'"),
    (_set_state("means", lambda t: torch.zeros(t.shape[0], t.shape[1] + 1)), r"do not fit its settings: means"),
    (_set_state("weights", lambda t: -t), "not a density .*negative weights"),
    (_set("hook", "os.system"), r"unknown key\(s\) \['hook'\]"),
], ids=["kind", "huge-components", "covariance", "shapes", "values", "key"])
def test_a_crafted_prior_is_refused_in_one_line_with_nothing_written(fitted, tmp_path, change, message):
    crafted = _crafted(fitted, tmp_path, change)
    out = tmp_path / "out"
    status, written, said = _samples(crafted, out, "auto")
    assert status == 2 and not out.exists() and not written
    assert len(said.strip().splitlines()) == 1 and str(crafted) in said
    with pytest.raises(CheckpointError, match=message):
        load_generation_model(crafted)


def test_save_pretrained_carries_the_prior_and_checks_it_on_load(fitted, tmp_path):
    model = musicvae.load(fitted["prior"])
    folder = model.save_pretrained(tmp_path / "saved")
    config = json.loads((folder / "config.json").read_text())
    record = torch.load(fitted["prior"], map_location="cpu", weights_only=True)[PRIOR_KEY]
    assert {k: config["prior"][k] for k in ("kind", "components", "covariance", "latent_dim")} == \
        {k: record[k] for k in ("kind", "components", "covariance", "latent_dim")}
    assert config["prior"]["fitted_on"]["seed"] == 3
    weights = load_file(folder / "model.safetensors")
    assert {k for k in weights if k.startswith("prior.")} == {"prior.weights", "prior.means", "prior.scale_tril"}
    again = musicvae.load(folder)
    assert all(torch.equal(a, b) for a, b in zip(again.prior.state_dict().values(), model.prior.state_dict().values()))
    assert torch.equal(again.sample(2, seed=4, griffin_lim_iters=ITERS), model.sample(2, seed=4, griffin_lim_iters=ITERS))

    means = weights["prior.means"]
    save_file({**weights, "prior.means": torch.zeros(means.shape[0], means.shape[1] + 1)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="prior's buffers do not fit its settings: means") as refused:
        musicvae.load(folder)
    assert "\n" not in str(refused.value)
    save_file({**weights, "prior.weights": torch.full_like(weights["prior.weights"], float("nan"))},
              folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a density .*non-finite"):
        musicvae.load(folder)
