"""GPU speed settings, checked for correctness on CPU: bf16-mixed, channels_last, torch.compile.

Each runs a few training steps of the tiny model through the real CLI from the same seed and
batches as a float32 eager run; the losses must be finite and close to float32's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_fit_args
from musicvae.training.cli import cli_main

STEPS = 4


def step_losses(root: Path, *extra: str) -> list[float]:
    out = root / "losses.json"
    probe = [{"class_path": "probes.LossRecorder", "init_args": {"out": str(out)}}]
    cli_main(tiny_fit_args(root, "--trainer.max_steps", str(STEPS), "--trainer.limit_val_batches", "0",
                           "--trainer.callbacks", str(probe), *extra))
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> list[float]:
    return step_losses(tmp_path_factory.mktemp("fp32"))


def assert_close(losses: list[float], reference: list[float], rel: float) -> None:
    assert len(losses) == len(reference) == STEPS
    assert all(torch.isfinite(torch.tensor(losses)))
    for got, want in zip(losses, reference):
        assert abs(got - want) <= rel * abs(want), (losses, reference)


@pytest.mark.slow
def test_bf16_mixed_trains_close_to_fp32(tmp_path, fp32):
    losses = step_losses(tmp_path, "--trainer.precision", "bf16-mixed")
    # bf16 keeps 8 bits of mantissa: a few percent on the loss after a few steps.
    assert_close(losses, fp32, rel=0.05)
    assert losses != fp32  # autocast really ran in bf16


@pytest.mark.slow
def test_channels_last_trains_like_fp32(tmp_path, fp32):
    cli = cli_main(tiny_fit_args(tmp_path / "probe", "--model.channels_last", "true")[1:], run=False)
    conv = next(m for m in cli.model.vae.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert_close(step_losses(tmp_path, "--model.channels_last", "true"), fp32, rel=1e-4)


@pytest.mark.slow
def test_compile_trains_like_eager_and_keeps_checkpoint_keys(tmp_path, fp32):
    import torch._inductor.config as inductor

    # Compiled code draws random numbers (the reparameterisation noise) with its own generator;
    # eager-compatible draws make the comparison with the eager losses meaningful. (patch(), not
    # monkeypatch: undoing a monkeypatch deletes the option from torch's config module.)
    with inductor.patch(fallback_random=True):
        losses = step_losses(tmp_path, "--model.compile", "true", "--checkpoint_every_n_steps", str(STEPS))
    assert_close(losses, fp32, rel=1e-3)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state)  # loads into an eager model as well


def test_gpu_config_layers_on_a_recipe(tmp_path):
    # On a GPU-less machine the accelerator is overridden; everything else must parse and build.
    cli = cli_main(["--config", "configs/improved.yaml", "--config", "configs/gpu.yaml", "--trainer.accelerator", "cpu",
                    "--trainer.precision", "32", "--checkpoint_dir", str(tmp_path / "ckpt"),
                    "--data.cache_dir", str(tmp_path / "cache")], run=False)
    assert cli.model.hparams.compile and cli.model.hparams.channels_last
    assert cli.datamodule.num_workers == 4 and cli.model.hparams.lr == 5e-5  # the recipe is kept


def test_gpu_config_gives_a_ddp_run_its_collective_timeout_and_a_bad_one_is_refused(tmp_path):
    from datetime import timedelta

    from musicvae.errors import ConfigError

    args = ["--config", "configs/improved.yaml", "--config", "configs/gpu.yaml", "--trainer.accelerator", "cpu",
            "--trainer.precision", "32", "--checkpoint_dir", str(tmp_path / "ckpt"), "--data.cache_dir", str(tmp_path / "cache"),
            "--trainer.devices", "2", "--trainer.strategy", "ddp", "--model.compile", "false"]
    cli = cli_main(args, run=False)
    assert cli.trainer.strategy._timeout == timedelta(seconds=600)  # the process group opens with it (test_ddp.py)
    with pytest.raises(ConfigError, match=r"--collective_timeout 0: give a number of seconds above 0"):
        cli_main([*args, "--collective_timeout", "0"], run=False)
