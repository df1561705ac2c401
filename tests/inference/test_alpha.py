"""Variance compensation where a trained model is used: the curve training fits and stores, and the
--alpha of evaluate, generate and export, the TensorBoard media, and checkpoints that predate it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import load_script
from musicvae.benchmarks.quality import fit_compensation
from musicvae.compensation import compensate
from musicvae.errors import ConfigError
from musicvae.inference.generation import load_generation_model
from musicvae.inference.loading import datamodule_for, load_module, resolve_alpha


def test_training_stores_the_curve_fitted_on_its_validation_recordings(tiny_run):
    """best.ckpt's curve is the one a fit on the validation split gives with best.ckpt's own weights."""
    module, ckpt = load_module(tiny_run["ckpt_dir"] / "best.ckpt")
    assert bool(module.gain_fitted) and 0.0 <= float(module.output_alpha) <= 1.0
    datamodule = datamodule_for(ckpt)
    datamodule.prepare_data()
    validation = datamodule.evaluation_set("val")
    bands = [tuple(b) for b in module.hparams.freq_bands]
    again = fit_compensation(module.reconstruct, validation, int(module.hparams.n_mels), bands)
    assert torch.allclose(again["gain"], module.output_gain, rtol=1e-4)
    assert again["alpha"] == pytest.approx(float(module.output_alpha))
    assert float(module.output_gain.min()) >= 1.0  # a VAE's blur: every bin's detail is raised, none lowered


def test_alpha_values_and_a_checkpoint_without_a_curve(tiny_run, tmp_path):
    module, ckpt = load_module(tiny_run["ckpt_dir"] / "best.ckpt")
    assert resolve_alpha(module, "perceptual") == resolve_alpha(module, None) == pytest.approx(float(module.output_alpha))
    assert resolve_alpha(module, "0.25") == 0.25
    for bad in ("1.5", "sharp"):
        with pytest.raises(ConfigError, match="--alpha"):
            resolve_alpha(module, bad)
    # A checkpoint written before the curve existed loads, decodes at 0, and refuses a positive strength.
    old = dict(ckpt)
    old["state_dict"] = {k: v for k, v in ckpt["state_dict"].items()
                         if k not in ("output_gain", "output_alpha", "gain_fitted")}
    torch.save(old, tmp_path / "old.ckpt")
    old_module, _ = load_module(tmp_path / "old.ckpt")
    assert resolve_alpha(old_module, None) == 0.0
    with pytest.raises(ConfigError, match="no variance-compensation curve"):
        resolve_alpha(old_module, "perceptual")
    code = load_script("generate").main(["sample", "--ckpt_path", str(tmp_path / "old.ckpt"), "-n", "1", "--alpha",
                                         "perceptual", "--griffin_lim_iters", "1", "--out", str(tmp_path / "s")])
    assert code == 2 and not (tmp_path / "s").exists()


def test_evaluate_scores_the_compensated_output_and_its_realism(tiny_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert load_script("evaluate").main(["--ckpt_path", str(tiny_run["ckpt_dir"] / "best.ckpt"), "--out", str(out),
                                         "--alpha", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    comp, realism = metrics["compensation"], metrics["realism"]
    assert comp["alpha"] == 1.0 and comp["mse"] > metrics["mse"]  # detail back, at a cost in MSE
    plain = [v for k, v in metrics.items() if k.startswith("band_ratio/")]
    sharp = [v for k, v in comp.items() if k.startswith("band_ratio/")]
    assert min(sharp) > min(plain)
    assert realism is not None and all(math.isfinite(realism[k]["frames"]) for k in ("floor", "alpha_0", "alpha"))
    report = (out / "report.md").read_text()
    assert "## Variance compensation and realism" in report and (out / "reconstructions_compensated.png").is_file()
    assert "variance compensation alpha 1" in capsys.readouterr().out


def test_generate_and_export_decode_at_the_asked_strength(tiny_run, tmp_path, one_thread):
    ckpt = tiny_run["ckpt_dir"] / "best.ckpt"
    plain, sharp = load_generation_model(ckpt), load_generation_model(ckpt, alpha="perceptual")
    z = torch.randn(3, plain.module.hparams.latent_dim, generator=torch.Generator().manual_seed(0))
    expected = compensate(plain.decode_windows(z), plain.module.output_gain, sharp.alpha, plain.module.band_edges)
    assert sharp.alpha > 0 and torch.allclose(sharp.decode_windows(z), expected)
    for alpha in ("0", "perceptual"):
        assert load_script("export").main(["--ckpt_path", str(ckpt), "--out", str(tmp_path / f"{alpha}.pt"),
                                           "--alpha", alpha]) == 0
    programs = {a: torch.jit.load(str(tmp_path / f"{a}.pt")) for a in ("0", "perceptual")}
    assert torch.allclose(programs["0"].decode(z), plain.denormalize(plain.decode_windows(z)), atol=1e-4)
    assert torch.allclose(programs["perceptual"].decode(z), sharp.denormalize(sharp.decode_windows(z)), atol=1e-4)
    out = tmp_path / "samples"
    assert load_script("generate").main(["sample", "--ckpt_path", str(ckpt), "-n", "2", "--seed", "0", "--alpha",
                                         "perceptual", "--griffin_lim_iters", "1", "--out", str(out)]) == 0
    assert (out / "sample_00.wav").is_file()


def test_tensorboard_shows_the_compensated_reconstructions(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run["log_dir"]), size_guidance={"images": 0}).Reload()
    assert {"val/reconstructions", "val/reconstructions_compensated"} <= set(events.Tags()["images"])
    assert "val/alpha_perceptual" in events.Tags()["scalars"]
