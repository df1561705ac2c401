"""Every callback and plugin musicvae adds to a run, built in one place, in the order they must run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, WeightAveraging
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from musicvae.errors import ConfigError
from musicvae.training.callbacks import ApplyResumedLearningRate, DataHandOver, FixedNameCheckpoint, RunMetadata
from musicvae.training.checkpoint_io import AtomicCheckpointIO
from musicvae.training.ema import EMA
from musicvae.training.guards import NonFiniteGuard, Preemption
from musicvae.training.predictions import LatentWriter
from musicvae.training.random_state import ResumableRandomState


def checkpoint_callbacks(checkpoint_dir: Path, monitor: str = "val/loss", every_n_steps: int = 0) -> list[Callback]:
    """`best.ckpt` (lowest `monitor`) and `last.ckpt` (newest state) under an absolute folder.

    Two callbacks, because with a monitor Lightning 2.6 refreshes `last.ckpt` only when a new
    best is saved; a third refreshes `last.ckpt` every `every_n_steps` training steps (mid-epoch,
    resumable exactly), because ModelCheckpoint takes step or epoch triggers, not both.
    """
    common = dict(dirpath=str(checkpoint_dir), auto_insert_metric_name=False, enable_version_counter=False)
    best = FixedNameCheckpoint(filename="best", monitor=monitor, mode="min", save_top_k=1, **common)
    last = FixedNameCheckpoint(filename="last", monitor=None, save_top_k=1, **common)
    if every_n_steps <= 0:
        return [best, last]
    steps = FixedNameCheckpoint(filename="last", monitor=None, save_top_k=1, every_n_train_steps=every_n_steps, **common)
    return [best, last, steps]


def with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """The trainer's plugins plus AtomicCheckpointIO, unless a CheckpointIO was configured."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def refuse_weight_averaging(configured: Any) -> None:
    """Lightning's own weight-averaging callback would swap weights outside musicvae's EMA scope."""
    if any(isinstance(cb, WeightAveraging) for cb in (configured if isinstance(configured, list) else [configured])):
        raise ConfigError(
            "--trainer.callbacks: a weight-averaging callback (such as Lightning's EMAWeightAveraging) "
            "was given; use --model.ema_decay D instead (e.g. 0.999). musicvae's EMA keeps the "
            "averaged weights in place through the module's whole validation, so the fitted compensation "
            "curve, the figures and best.ckpt all describe the same weights (musicvae/training/ema.py)")


def check_manual_optimization(trainer_config: dict) -> None:
    """Trainer settings Lightning refuses (or ignores) under manual optimization, as one clear line."""
    if trainer_config.get("gradient_clip_val"):
        raise ConfigError(
            f"--trainer.gradient_clip_val {trainer_config['gradient_clip_val']}: the adversarial stage steps two "
            "optimizers itself (manual optimization), where Lightning cannot clip; set --trainer.gradient_clip_val "
            "null and use --model.adv_grad_clip (configs/sharp.yaml does both)")
    if (trainer_config.get("accumulate_grad_batches") or 1) > 1:
        raise ConfigError(
            "--trainer.accumulate_grad_batches: not available in the adversarial stage (manual optimization); "
            "use a larger --data.batch_size")


def run_callbacks(*, subcommand: Optional[str], checkpoint_dir: Path, monitor: str, every_n_steps: int,
                  skip_nonfinite: int, run_config: dict[str, Any], run_id: str, resumed_hparams: Optional[dict],
                  interrupt: bool, resume_hint: str, logging: bool, ema_decay: Optional[float],
                  predict_dir: str) -> list[Callback]:
    """The callbacks musicvae adds after the user's (and after the media callback, `--media.*`), as one list.

    Their order does not matter: EMA's average is entered and left by the module around its whole
    validation (musicvae/training/ema.py), and Lightning runs checkpoint callbacks last.
    """
    if every_n_steps < 0 or skip_nonfinite < 0:
        raise ConfigError(f"--checkpoint_every_n_steps ({every_n_steps}) and --skip_nonfinite ({skip_nonfinite}) "
                          "must be 0 or more")
    callbacks: list[Callback] = [
        *checkpoint_callbacks(checkpoint_dir, monitor, every_n_steps),
        RunMetadata(run_config, monitor, checkpoint_dir, run_id),
        ApplyResumedLearningRate(resumed_hparams),
        ResumableRandomState(),
        NonFiniteGuard(skip_nonfinite),
        Preemption(checkpoint_dir, interrupt=interrupt, resume_command=resume_hint),
        DataHandOver(),
    ]
    if logging:
        callbacks.append(LearningRateMonitor())  # train/lr (musicvae/training/schedules.py names it)
    if ema_decay and subcommand in (None, "fit"):
        callbacks.append(EMA(ema_decay))
    if subcommand == "predict":
        callbacks.append(LatentWriter(predict_dir))
    return callbacks


def trainer_settings(trainer_config: dict[str, Any], manual_optimization: bool) -> dict[str, Any]:
    """The Trainer's settings with musicvae's plugins, and the requirements of a module that steps its
    optimizers itself (the adversarial stage)."""
    if manual_optimization:
        check_manual_optimization(trainer_config)
        if trainer_config.get("strategy") == "ddp":
            # DDP wraps the whole module, and each of the stage's two backward passes leaves the other
            # network's parameters without gradients, which plain DDP takes for a hang and refuses
            # (Lightning-AI/pytorch-lightning#20328, #20866): it must look for unused parameters.
            trainer_config["strategy"] = "ddp_find_unused_parameters_true"
            rank_zero_info("musicvae: the adversarial stage runs DDP as ddp_find_unused_parameters_true")
    trainer_config["plugins"] = with_atomic_checkpoints(trainer_config.get("plugins"))
    return trainer_config


class SaveConfigToLogDir(SaveConfigCallback):
    """LightningCLI's config.yaml in the first logger's run folder (TensorBoard, CSV), skipped otherwise.

    Without a logger Lightning's log_dir is the working directory, and for W&B or MLflow the logger's
    save_dir (`.` and `./mlruns` by default), which must not collect files; the run's config is beside
    the checkpoints anyway.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if getattr(trainer.logger, "log_dir", None) is None:
            return
        super().setup(trainer, pl_module, stage)
