"""Learning-rate schedules over the module's own parameter groups: warm-up, cosine, reduce-on-plateau.

The command line runs LightningCLI with `auto_configure_optimizers=False` (the module owns its
optimizer and its parameter groups: the linear path's at `linear_path_lr_scale`), so the
schedule is a module option (`--model.lr_schedule`) rather than LightningCLI's `--lr_scheduler`.
Each schedule multiplies every group's own rate, so the groups keep their ratios.

Resumes (`--ckpt_path`) keep the schedule's position and take new settings:
- a new `--model.lr` rescales the rate the schedule has reached (ApplyResumedLearningRate);
- a schedule is a function of the optimizer step and the run's length, and a resume that changes
  the length (`--trainer.max_epochs`, `--trainer.max_steps`) re-plans it: the rate becomes what a
  run planned that long from the start would have at this step. Raising max_epochs after a
  finished cosine therefore lifts the rate from its floor to the longer curve's value and
  decays it again (a warm restart, Loshchilov & Hutter 2017); to go on at the floor instead,
  resume with `--model.lr_schedule constant --model.lr <the floor>`;
- new `warmup_steps`, `lr_min_ratio`, `plateau_factor` and `plateau_patience` apply from the
  resumed step. Switching to or from "plateau" changes the scheduler's kind and is refused
  (musicvae/training/checkpoints.py, unresumable_changes).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch.optim.lr_scheduler import LambdaLR, LinearLR, ReduceLROnPlateau

from musicvae.errors import ConfigError

#: What `--model.lr_schedule` accepts.
SCHEDULES = ("constant", "cosine", "plateau")

#: The key LearningRateMonitor logs the rate under (`train/lr`, `train/lr/pg2` for a second group).
LOG_NAME = "train/lr"


def schedule_factor(step: int, kind: str, warmup_steps: int, total_steps: Optional[float], min_ratio: float) -> float:
    """The multiple of each group's base learning rate at optimizer step `step` (0-based).

    Args:
        step: optimizer steps taken so far.
        kind: "constant" or "cosine" ("plateau" reduces rates by the monitored metric instead).
        warmup_steps: the rate rises linearly over this many steps, reaching the base at the last
            (Goyal et al. 2017, arXiv:1706.02677).
        total_steps: the run's optimizer steps (cosine only): the rate reaches `min_ratio` there.
        min_ratio: the cosine's floor, as a multiple of the base rate.

    Returns:
        The factor: between `min_ratio` and 1 for cosine, 1 for constant after the warm-up.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind != "cosine":
        return 1.0
    span = (total_steps or 0) - warmup_steps
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    # Loshchilov & Hutter 2017 (arXiv:1608.03983), without restarts.
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class StepSchedule:
    """`schedule_factor` with fixed settings, as LambdaLR's multiplier."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: Optional[float], min_ratio: float) -> None:
        self.kind, self.warmup_steps, self.total_steps, self.min_ratio = kind, warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        return schedule_factor(step, self.kind, self.warmup_steps, self.total_steps, self.min_ratio)

    def settings(self) -> tuple:
        return self.kind, self.warmup_steps, self.total_steps, self.min_ratio


def total_steps(trainer: Any) -> float:
    """The run's optimizer steps (Lightning's estimate: max_steps, or max_epochs x batches per epoch).

    Only once training has started (`on_train_start`): asked in `configure_optimizers`, Lightning
    sets up the training loader before a resume restores its position, and the restored position
    is then never applied (Lightning-AI/pytorch-lightning#20550): the resumed batches differ.
    """
    return float(trainer.estimated_stepping_batches)


def build_schedulers(optimizer: torch.optim.Optimizer, hparams: Any, endless: bool, monitor: str) -> list[dict]:
    """Lightning scheduler configs for the module's optimizer, from its hyper-parameters.

    Always at least one (a constant one when no schedule is asked for): LearningRateMonitor then
    logs every run's rate under the same key, `train/lr`. A cosine's length is set when training
    starts (`continue_schedules`; see `total_steps` for why not here).

    Args:
        optimizer: the module's optimizer, its parameter groups at their base rates.
        hparams: the module's hyper-parameters.
        endless: the run has neither max_epochs nor max_steps (a cosine cannot end then).
        monitor: the metric "plateau" watches.
    """
    kind, warmup = hparams.get("lr_schedule", "constant"), int(hparams.get("warmup_steps", 0))
    min_ratio = float(hparams.get("lr_min_ratio", 0.01))
    if kind != "plateau":
        if kind == "cosine" and endless:
            raise ConfigError("model.lr_schedule cosine decays to the end of the run: set --trainer.max_epochs or "
                              "--trainer.max_steps (the run has no end now)")
        schedule = StepSchedule(kind, warmup, None, min_ratio)
        return [{"scheduler": LambdaLR(optimizer, schedule), "interval": "step", "name": LOG_NAME}]
    # Two schedulers on one optimizer: LinearLR's warm-up multiplies the rate step by step (and
    # leaves it alone afterwards), ReduceLROnPlateau divides it after validations. A LambdaLR
    # warm-up would reset the rate to its base every step and undo the plateau's reductions.
    warm = LinearLR(optimizer, start_factor=1.0 / warmup if warmup > 0 else 1.0, total_iters=max(warmup, 1))
    plateau = ReduceLROnPlateau(optimizer, mode="min", factor=float(hparams.get("plateau_factor", 0.5)),
                                patience=int(hparams.get("plateau_patience", 3)),
                                min_lr=[g["initial_lr"] * min_ratio for g in optimizer.param_groups])
    return [{"scheduler": warm, "interval": "step", "name": LOG_NAME},
            # strict False: with check_val_every_n_epoch > 1 some epochs end without the metric.
            {"scheduler": plateau, "interval": "epoch", "monitor": monitor, "strict": False, "name": LOG_NAME}]


def continue_schedules(trainer: Any, hparams: Any) -> list[str]:
    """Bring restored schedulers to this run's settings and step count; returns what changed, in words.

    Lightning restores each scheduler's state (its settings included) after `configure_optimizers`
    built it from the new hyper-parameters, so new values would otherwise be silently replaced by
    the stored ones. A checkpoint written before schedules existed has no scheduler state: the
    step counter then starts at the resumed step, not at 0.

    Args:
        trainer: the trainer, at `on_train_start` (after any checkpoint was restored).
        hparams: the module's (new) hyper-parameters.
    """
    step = trainer.global_step
    kind, warmup = hparams.get("lr_schedule", "constant"), int(hparams.get("warmup_steps", 0))
    min_ratio = float(hparams.get("lr_min_ratio", 0.01))
    notes = []
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if isinstance(scheduler, LambdaLR) and all(isinstance(f, StepSchedule) for f in scheduler.lr_lambdas):
            # LambdaLR restored the stored settings (it saves its multiplier objects' attributes).
            settings = (kind, warmup, total_steps(trainer) if kind == "cosine" else None, min_ratio)
            before = scheduler.lr_lambdas[0]
            planned = before.kind != "cosine" or before.total_steps is not None  # else: a fresh cosine
            if scheduler.last_epoch == step and before.settings() == settings:
                continue
            was = before(step)
            scheduler.lr_lambdas = [StepSchedule(*settings) for _ in scheduler.lr_lambdas]
            scheduler.last_epoch = step
            for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(step)
            now = scheduler.lr_lambdas[0](step)
            if planned and now != was:
                length = f" over the run's {int(settings[2])} steps" if settings[2] else ""
                notes.append(f"{kind} schedule re-planned{length}: at step {step} the rate is {now:.4g} of --model.lr "
                             f"(was {was:.4g})")
        elif isinstance(scheduler, ReduceLROnPlateau):
            scheduler.factor = float(hparams.get("plateau_factor", 0.5))
            scheduler.patience = int(hparams.get("plateau_patience", 3))
            scheduler.min_lrs = [g.get("initial_lr", g["lr"]) * min_ratio for g in scheduler.optimizer.param_groups]
        elif isinstance(scheduler, LinearLR):
            scheduler.start_factor = 1.0 / warmup if warmup > 0 else 1.0
            scheduler.total_iters = max(warmup, 1)
    return notes


def rate_groups(params: list[torch.nn.Parameter], linear: set[int], lr: float, scale: float,
                keep_frozen: bool = True) -> list[dict]:
    """Parameter groups: the linear path's (ids in `linear`) at `scale` x lr, the rest at lr; with
    `keep_frozen` false a linear path at scale 0 is left out of the optimizer.

    Adam moves every weight by ~lr per step whatever its scale, and a linear code's encoder weights are
    ~1e-4 to 1e-2: at the nonlinear path's rate they would leave the code within a few steps. "lr_scale"
    stays in the group, so a learning rate changed on resume keeps it.
    """
    groups = [{"params": [p for p in params if id(p) not in linear], "lr": lr, "lr_scale": 1.0}]
    if linear and (scale > 0 or keep_frozen):
        groups.append({"params": [p for p in params if id(p) in linear], "lr": lr * scale, "lr_scale": scale})
    return groups
