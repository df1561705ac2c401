"""The adversarial stage (configs/sharp.yaml, musicvae/training/sharpen.py: SharpenModule): its parts as units, and
the stage end to end through scripts/train.py: started with --model.init_from from a tiny trained VAE,
past its start step, killed and resumed exactly, stopped by a NaN with the part named.

Step units: Lightning's global_step counts optimizer steps, two per batch in this stage; the tests
check that every step setting (max_steps, adv_start_step, checkpoint_every_n_steps) counts them.
"""

from __future__ import annotations

import json
import os
import shlex
import signal

import pytest
import torch

from helpers import (START, assert_same_weights, run_train, sigint_ignored, signal_probe, stage_args,
                     start_like_a_terminal, step_of, train, train_in_child, wait_for, weights)
from musicvae.training.checkpoints import RAW_WEIGHTS_KEY
from musicvae.errors import ConfigError, NonFiniteError
from musicvae.losses import adaptive_weight, feature_matching_loss, hinge_discriminator_loss, hinge_generator_loss
from musicvae.models.discriminator import PatchDiscriminator, augment_pair
from musicvae.training.sharpen import (STEPS_PER_BATCH, SharpenModule, decoder_parameters, freeze_encoder,
                                       last_decoder_weight)
from musicvae.training.cli import cli_main
from musicvae.training.module import MusicVAEModule

LOGGED = ["train/adv_active", "train/adv", "train/feature_matching", "train/adaptive_weight", "train/adv_grad_norm",
          "train/loss_d", "train/d_real", "train/d_fake", "train/d_accuracy", "train/recon"]


# ---- units ---------------------------------------------------------------------------------------

def test_patch_discriminator_gives_a_logit_grid_and_stage_features():
    disc = PatchDiscriminator((8, 16))
    logits, features = disc(torch.randn(3, 1, 32, 32))
    assert logits.shape == (3, 1, 8, 8) and [f.shape[1] for f in features] == [8, 16]
    with pytest.raises(ValueError, match="channels"):
        PatchDiscriminator(())


def test_augment_pair_transforms_both_alike_and_passes_gradients():
    real = torch.randn(4, 1, 16, 32)
    fake = real.clone().requires_grad_(True)
    a, b = augment_pair(real, fake, torch.Generator().manual_seed(0))
    assert torch.equal(a, b.detach()) and not torch.equal(a, real)  # same transform per pair, not the identity
    b.sum().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_hinge_losses_and_feature_matching_on_known_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert float(hinge_discriminator_loss(real, fake)) == pytest.approx((0 + 0.5) / 2 + (0 + 1.5) / 2)
    assert float(hinge_generator_loss(fake)) == pytest.approx(0.75)
    assert float(feature_matching_loss([torch.ones(2, 3)], [torch.zeros(2, 3)])) == pytest.approx(1.0)


def test_adaptive_weight_balances_the_gradients_at_the_last_layer():
    w = torch.ones(3, requires_grad=True)
    weight, adv_norm = adaptive_weight((w * 2).sum(), (w * 0.5).sum(), w)
    assert float(weight) == pytest.approx(4.0, rel=1e-3) and float(adv_norm) == pytest.approx(0.5 * 3 ** 0.5)


def test_the_stage_freezes_the_encoder_and_optimises_decoder_and_discriminator():
    module = SharpenModule(n_mels=32, frames=32, latent_dim=8, channels=[8, 16],
                           disc_channels=[8, 16], linear_path=True, linear_path_lr_scale=0.0)
    decoder = {id(p) for p in decoder_parameters(module.vae)}
    assert all(p.requires_grad == (id(p) in decoder) for p in module.vae.parameters())
    assert last_decoder_weight(module.vae) is module.vae.inner.output_layer.weight
    opt_g, opt_d = module.build_optimizers()
    in_g = {id(p) for group in opt_g.param_groups for p in group["params"]}
    assert in_g <= decoder and not in_g & {id(p) for p in module.vae.lin_decoder.parameters()}  # lr_scale 0: frozen
    assert {id(p) for p in opt_d.param_groups[0]["params"]} == {id(p) for p in module.discriminator.parameters()}
    assert opt_d.param_groups[0]["lr_from"] == "disc_lr" and freeze_encoder(module.vae) > 0


def test_the_stage_without_a_trained_vae_is_refused(tmp_path):
    from conftest import tiny_fit_args

    with pytest.raises(ConfigError, match="--model.init_from CHECKPOINT"):
        cli_main(tiny_fit_args(tmp_path, "--model", "SharpenModule"))
    assert not (tmp_path / "ckpt").exists()


def test_lightnings_clipping_is_refused_with_what_to_set_instead(tmp_path):
    from conftest import tiny_fit_args

    with pytest.raises(ConfigError, match="gradient_clip_val null.*adv_grad_clip"):
        cli_main(tiny_fit_args(tmp_path, "--model", "SharpenModule", "--trainer.gradient_clip_val", "1.0")[1:], run=False)


# ---- end to end ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage(tiny_run, tmp_path_factory) -> dict:
    """The stage run straight through, with its per-batch metrics recorded (the command, as a user runs it)."""
    root = tmp_path_factory.mktemp("sharp")
    init = tiny_run["ckpt_dir"] / "best.ckpt"
    record = root / "steps.jsonl"
    probe = [{"class_path": "probes.RecordStepMetrics", "init_args": {"out": str(record), "keys": LOGGED}}]
    result = train(stage_args(root, init, tiny_run["cache_dir"], "--trainer.callbacks", json.dumps(probe)))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    return {"root": root, "init": init, "rows": rows, "stderr": result.stderr, "cache": tiny_run["cache_dir"]}


@pytest.mark.slow
def test_global_step_counts_two_optimizer_steps_per_batch(stage):
    rows = stage["rows"]
    assert len(rows) == 16  # 2 epochs of 8 batches
    assert [r["start"] for r in rows] == [STEPS_PER_BATCH * i for i in range(16)]
    assert step_of(stage["root"] / "ckpt" / "last.ckpt") == 32
    assert "starting from the weights of" in stage["stderr"] and "discriminator" in stage["stderr"]


@pytest.mark.slow
def test_the_decoder_answers_the_discriminator_from_the_start_step(stage):
    before = [r for r in stage["rows"] if r["start"] < START]
    after = [r for r in stage["rows"] if r["start"] >= START]
    assert len(before) == START // STEPS_PER_BATCH and after
    for row in before:
        assert row["train/adv_active"] == 0 and row["train/adv_grad_norm"] == 0 and row["train/adaptive_weight"] == 0
    for row in after:
        # A non-zero adversarial gradient reaches the decoder's output layer at every step past the start.
        assert row["train/adv_active"] == 1 and row["train/adv_grad_norm"] > 0 and row["train/feature_matching"] > 0
    assert all(0 <= r["train/d_accuracy"] <= 1 and r["train/loss_d"] > 0 for r in stage["rows"])


@pytest.mark.slow
def test_the_checkpoint_holds_the_discriminator_both_optimizers_and_the_frozen_encoder(stage):
    ckpt = torch.load(stage["root"] / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    init = weights(stage["init"])
    assert len(ckpt["optimizer_states"]) == 2 and any(k.startswith("discriminator.") for k in ckpt["state_dict"])
    encoder = [k for k in init if k.startswith("vae.encoder.") or k.startswith("vae.to_latent.")]
    decoder = [k for k in init if k.startswith("vae.decoder.") or k.startswith("vae.from_latent.")]
    assert encoder and all(torch.equal(ckpt["state_dict"][k], init[k]) for k in encoder)
    assert any(not torch.equal(ckpt["state_dict"][k], init[k]) for k in decoder)
    best = [key for key in ckpt["callbacks"] if "'monitor': 'val/realism_differences'" in key]
    assert best, list(ckpt["callbacks"])  # best.ckpt is chosen by realism, not val/loss


@pytest.mark.slow
def test_every_loss_part_and_the_discriminator_scores_reach_tensorboard(stage):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = next((stage["root"] / "logs").rglob("events.out.tfevents.*")).parent
    tags = set(EventAccumulator(str(folder)).Reload().Tags()["scalars"])
    wanted = {f"{k}_step" for k in LOGGED} | {"val/realism_differences", "val/realism_frames", "val/alpha_perceptual"}
    assert wanted <= tags, sorted(wanted - tags)


@pytest.mark.slow
def test_the_stage_resumes_exactly_after_a_kill(stage, tmp_path):
    # Killed as batch 7 starts (optimizer step 14); last.ckpt is from step 12, past the start step.
    killed = train_in_child(stage_args(tmp_path, stage["init"], stage["cache"], *signal_probe(14, "SIGKILL")))
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "ckpt" / "last.ckpt"
    assert step_of(last) == 12
    resumed = train(["fit", "--ckpt_path", str(last), "--trainer.callbacks", "[]"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "starting from the weights" not in resumed.stderr  # a resume, not a new start from init_from
    assert_same_weights(last, stage["root"] / "ckpt" / "last.ckpt")


@pytest.mark.slow
def test_a_nan_in_the_stage_stops_with_the_part_named(tiny_run, tmp_path):
    poison = [{"class_path": "probes.PoisonAtStep", "init_args": {"step": 12, "what": "input"}}]
    with pytest.raises(NonFiniteError, match=r"step 12 .*loss part\(s\) .*decoder"):
        cli_main(stage_args(tmp_path, tiny_run["ckpt_dir"] / "best.ckpt", tiny_run["cache_dir"],
                            "--data.num_workers", "0", "--trainer.callbacks", json.dumps(poison)))
    assert step_of(tmp_path / "ckpt" / "last.ckpt") == 12


@pytest.mark.slow
def test_the_stage_runs_under_ddp_with_ema_and_ctrl_c_stops_every_rank(tiny_run, tmp_path):
    """Two CPU processes: plain `ddp` would refuse the stage (each backward leaves the other network's
    parameters without gradients, Lightning-AI/pytorch-lightning#20328); the CLI runs it as
    ddp_find_unused_parameters_true. Each rank takes half of the 8 batches per epoch: 4 batches = 8
    optimizer steps. With EMA on, Ctrl-C (SIGINT to the whole process group, as a terminal sends it:
    both ranks and their loader workers) at optimizer step 6 finishes that batch on both ranks, saves
    last.ckpt at step 8 and exits 130; the printed command resumes to the end of the second epoch."""
    marker = tmp_path / "at_step"
    args = stage_args(tmp_path, tiny_run["ckpt_dir"] / "best.ckpt", tiny_run["cache_dir"], "--data.num_workers", "1",
                      "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                      "--model.adv_start_step", "2", "--model.ema_decay", "0.9", "--trainer.callbacks+=probes.WaitAtStep",
                      "--trainer.callbacks.step", "6", "--trainer.callbacks.marker", str(marker))
    proc = start_like_a_terminal(args)
    pid = wait_for(marker, proc)
    assert not sigint_ignored(pid)
    os.killpg(pid, signal.SIGINT)
    marker.with_suffix(".go").touch()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "ddp_find_unused_parameters_true" in err and "Ctrl-C: saved" in err
    last = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8 and RAW_WEIGHTS_KEY in ckpt and len(ckpt["optimizer_states"]) == 2
    command = err.split("Continue with:\n")[1].splitlines()[0].strip()
    resumed = run_train(shlex.split(command)[2:])  # DDP again: Lightning starts rank 1 from sys.argv
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_of(last) == 16


def test_switching_the_stage_on_in_a_resumed_run_is_refused(tiny_run, tmp_path):
    import shutil

    from musicvae.errors import CheckpointError

    ckpt = shutil.copy(tiny_run["ckpt_dir"] / "last.ckpt", tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match=r"model\.class_path: checkpoint MusicVAEModule, now SharpenModule.*--model\.init_from"):
        cli_main(["fit", "--ckpt_path", str(ckpt), "--checkpoint_dir", str(tmp_path / "ckpt"), "--model",
                  "SharpenModule", "--trainer.gradient_clip_val", "null", "--trainer.max_epochs", "3"])
    assert not (tmp_path / "ckpt").exists()
