"""Learning-rate schedules (musicvae/training/schedules.py): their curves, their logged rate, and
what a resume does to them (a longer run, a new --model.lr, a new kind)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import tiny_fit_args
from musicvae.errors import CheckpointError, ConfigError
from musicvae.training.schedules import build_schedulers, schedule_factor


def test_warmup_rises_to_the_base_rate_and_cosine_falls_to_the_floor():
    factors = [schedule_factor(s, "cosine", 4, 20, 0.1) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[12] == pytest.approx(0.55) and factors[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert [schedule_factor(s, "constant", 2, None, 0.1) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    # The curve is a function of the run's length: a longer run is higher at the same step.
    assert schedule_factor(20, "cosine", 4, 40, 0.1) > schedule_factor(20, "cosine", 4, 20, 0.1)


def _groups():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    return torch.optim.Adam([{"params": params[:1], "lr": 1e-3}, {"params": params[1:], "lr": 1e-4}])


def test_every_schedule_keeps_the_parameter_groups_ratio():
    for kind in ("constant", "cosine"):
        optimizer = _groups()
        [config] = build_schedulers(optimizer, {"lr_schedule": kind, "warmup_steps": 3}, False, "val/loss")
        for _ in range(5):
            optimizer.step()
            config["scheduler"].step()
            lrs = [g["lr"] for g in optimizer.param_groups]
            assert lrs[1] == pytest.approx(lrs[0] / 10)
        assert config["name"] == "train/lr"


def test_plateau_warms_up_then_reduces_after_patience_down_to_its_floor():
    optimizer = _groups()
    hp = {"lr_schedule": "plateau", "warmup_steps": 2, "plateau_factor": 0.5, "plateau_patience": 1,
          "lr_min_ratio": 0.2}
    warm, plateau = (c["scheduler"] for c in build_schedulers(optimizer, hp, False, "val/kl"))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    for _ in range(3):
        optimizer.step()
        warm.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    seen = []
    for value in [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0, 1.1]:  # improves once, then never
        plateau.step(value)
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4, 2e-4, 2e-4])
    assert optimizer.param_groups[1]["lr"] == pytest.approx(2e-5)  # its own floor: 0.2 x 1e-4


def test_bad_schedule_settings_are_refused_with_the_setting():
    from musicvae.training.module import MusicVAEModule
    from musicvae.training.sharpen import SharpenModule

    with pytest.raises(ConfigError, match="set --trainer.max_epochs or --trainer.max_steps"):
        build_schedulers(_groups(), {"lr_schedule": "cosine"}, True, "val/loss")

    for kwargs, needle in [({"lr_schedule": "cosin"}, "lr_schedule='cosin'"), ({"warmup_steps": -1}, "warmup_steps"),
                           ({"plateau_factor": 1.5}, "plateau_factor"), ({"ema_decay": 1.0}, "ema_decay=1.0"),
                           ({"sharpen": True, "lr_schedule": "cosine"}, "adversarial stage")]:
        module_class = SharpenModule if kwargs.pop("sharpen", False) else MusicVAEModule
        with pytest.raises(ConfigError, match=needle):
            module_class(n_mels=32, frames=32, channels=[8, 16], latent_dim=8, **kwargs)


def _rates(path) -> list[float]:
    return [group[0] for group in json.loads(path.read_text())]


def _scalars(log_dir, tag) -> list[tuple[int, float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.slow
def test_cosine_run_logs_its_rate_and_a_resume_replans_a_longer_run(tmp_path):
    from musicvae.training.cli import cli_main

    probe = ["--trainer.callbacks+=probes.LearningRates", "--trainer.callbacks.out"]
    schedule = ["--model.lr_schedule", "cosine", "--model.warmup_steps", "4", "--model.lr_min_ratio", "0.1"]
    cli = cli_main(tiny_fit_args(tmp_path, *schedule, *probe, str(tmp_path / "lr1.json")))
    steps = cli.trainer.global_step  # 2 epochs
    first = _rates(tmp_path / "lr1.json")
    assert first == pytest.approx([1e-3 * schedule_factor(s, "cosine", 4, steps, 0.1) for s in range(steps)])
    log_dir = cli.trainer.logger.log_dir
    logged = dict(_scalars(log_dir, "train/lr"))
    assert logged[0] == pytest.approx(2.5e-4) and logged[steps - 1] == pytest.approx(first[-1])
    # TensorBoard's HPARAMS tab reads hp_metric: the best monitored value so far.
    best = torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=True)["musicvae_monitor"]["value"]
    assert _scalars(log_dir, "hp_metric")[-1][1] == pytest.approx(best)
    assert _scalars(log_dir, "hp_metric")[-1][1] == pytest.approx(min(v for _, v in _scalars(log_dir, "val/loss")))

    # Resumed for 2 more epochs at twice the rate: the schedule becomes that of a 4-epoch run at 2e-3.
    cli = cli_main(["fit", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--trainer.max_epochs", "4",
                    "--model.lr", "2e-3", *probe, str(tmp_path / "lr2.json")])
    total = cli.trainer.global_step
    assert total == 2 * steps
    second = _rates(tmp_path / "lr2.json")
    assert second == pytest.approx([2e-3 * schedule_factor(s, "cosine", 4, total, 0.1) for s in range(steps, total)])


@pytest.mark.slow
def test_switching_to_or_from_plateau_on_resume_is_refused(tmp_path):
    from musicvae.training.cli import cli_main

    cli_main(tiny_fit_args(tmp_path, "--model.lr_schedule", "plateau", "--trainer.max_epochs", "1"))
    with pytest.raises(CheckpointError, match="model.lr_schedule: checkpoint 'plateau', now 'cosine'"):
        cli_main(["fit", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--model.lr_schedule", "cosine"])
    # Between the step schedules it carries over: constant -> cosine from the resumed step.
    shutil.rmtree(tmp_path / "ckpt")
    cli_main(tiny_fit_args(tmp_path, "--trainer.max_epochs", "1", "--overwrite", "true"))
    cli = cli_main(["fit", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--model.lr_schedule", "cosine",
                    "--trainer.max_epochs", "2"])
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.01)  # at the end: the floor
