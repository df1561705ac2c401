"""Callbacks that make checkpoints self-describing and resumes honour new hyper-parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from musicvae.errors import ConfigError
from musicvae.io.atomic import write_atomic
from musicvae.training.lightning_private import CHECKPOINT_DIR_WARNING
from musicvae.training.checkpoints import MONITOR_KEY, RUN_CONFIG_KEY, RUN_ID_KEY, dump_yaml


class RunMetadata(Callback):
    """Puts the run's full config and the monitored value into every checkpoint.

    The config (with an absolute `checkpoint_dir`) is also written beside the checkpoints as
    `config.yaml`, for people; `--ckpt_path` alone reads the copy inside the checkpoint. The
    TensorBoard logger's folder and version are pinned in it, so a resumed run continues the
    same curves instead of starting a new version relative to wherever it was started.
    """

    def __init__(self, config: dict[str, Any], monitor: str, checkpoint_dir: Path, run_id: Optional[str] = None) -> None:
        self.config = config
        self.run_id = run_id
        self.monitor = monitor
        self.checkpoint_dir = Path(checkpoint_dir)
        self.config_yaml = dump_yaml(config)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pin_logger(trainer)
        # Not in setup(): ModelCheckpoint warns about a non-empty folder if the file is already there.
        if not trainer.is_global_zero:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.checkpoint_dir / "config.yaml", lambda handle: handle.write(self.config_yaml), mode="w")

    def _pin_logger(self, trainer: L.Trainer) -> None:
        spec = (self.config.get("trainer") or {}).get("logger")
        if pin_loggers(spec, trainer.loggers):
            self.config_yaml = dump_yaml(self.config)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # TensorBoard's HPARAMS tab lists each run's hyper-parameters beside `hp_metric` (Lightning logs
        # -1 there at the start): here, the best monitored value so far. The checkpoint callbacks run
        # after this one, so the best is taken from their restored score and this validation's value.
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or not trainer.loggers:
            return
        best = float(value)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.monitor == self.monitor and callback.best_model_score is not None:
                best = min(best, float(callback.best_model_score))
        if best == best:  # not NaN
            for logger in trainer.loggers:
                logger.log_metrics({"hp_metric": best}, step=trainer.global_step)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RUN_CONFIG_KEY] = self.config_yaml
        if self.run_id:
            checkpoint[RUN_ID_KEY] = self.run_id
        value = trainer.callback_metrics.get(self.monitor)
        checkpoint[MONITOR_KEY] = {"name": self.monitor, "value": None if value is None else float(value)}


def pin_loggers(spec: Any, loggers: list[Any]) -> bool:
    """Write each file logger's resolved folder, name and version into its config entry, in place.

    Args:
        spec: the run config's ``trainer.logger``: one ``{class_path, init_args}`` dict or a list of them.
        loggers: the trainer's loggers, in the same order.

    Returns:
        Whether anything was pinned. Loggers without a local version folder (TensorBoard and CSV
        have one) are left alone.
    """
    specs = spec if isinstance(spec, list) else [spec]
    pinned = False
    for entry, logger in zip(specs, loggers):
        if not isinstance(entry, dict) or not isinstance(logger, (TensorBoardLogger, CSVLogger)):
            continue
        if not str(entry.get("class_path", "")).endswith(type(logger).__name__):
            continue
        init_args = entry.setdefault("init_args", {})
        init_args["save_dir"] = str(Path(logger.save_dir).resolve())
        init_args["name"] = logger.name
        init_args["version"] = logger.version
        pinned = True
    return pinned


class ApplyResumedLearningRate(Callback):
    """Puts a learning rate changed on resume into the restored optimizer.

    Lightning restores the optimizer's state, old learning rate included, after the module is
    built with the new one; without this a `--model.lr` given on resume is silently ignored.
    Adam's moment estimates are kept. A parameter group names the hyper-parameter its rate
    follows in ``"lr_from"`` (default ``lr``; the adversarial stage's discriminator: ``disc_lr``)
    and may run at a fixed multiple of it, ``"lr_scale"`` (the linear path's).

    Args:
        old: the resumed run's learning rate (a float), or its hyper-parameters (a dict).
    """

    def __init__(self, old: Optional[float | dict]) -> None:
        self.old = old if isinstance(old, dict) else {} if old is None else {"lr": old}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        changed, scales = {}, {}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                key = group.get("lr_from", "lr")
                new, old = pl_module.hparams.get(key), self.old.get(key)
                if new is None or old is None or float(new) == float(old):
                    continue
                # Scaled, not replaced: the rate a schedule has reached (a cosine's, a plateau's
                # reductions, a warm-up's) keeps its place relative to the new base.
                group["lr"] = float(new) * (group["lr"] / float(old))
                if "initial_lr" in group:
                    group["initial_lr"] = float(new) * (group["initial_lr"] / float(old))
                scales[id(group)] = float(new) / float(old)
                changed[key] = (float(old), float(new))
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [base * scales.get(id(g), 1.0)
                                      for base, g in zip(scheduler.base_lrs, scheduler.optimizer.param_groups)]
        for key, (old, new) in changed.items():
            rank_zero_info(f"musicvae: {'learning rate' if key == 'lr' else key} set to {new:g} in the restored "
                           f"optimizer (was {old:g})")


class FixedNameCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint with a fixed file name whose stored paths cannot point outside its folder.

    Lightning restores `best_model_path`, `kth_best_model_path`, `best_k_models` and
    `last_model_path` from a checkpoint as given, and later deletes the old "best" file it names
    (`_should_remove_checkpoint` compares the path's text, so `<dirpath>/../x` passes). A
    checkpoint is data: here each stored path is mapped by its file name onto this callback's own
    file in the current folder, or dropped. That also keeps the best score of a moved run folder
    (Lightning restores it only when the stored `dirpath` string is identical); the score is kept
    whenever the folder holds the file it belongs to (the CLI has checked that it is the same run).
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored_dir = state_dict.get("dirpath")
        best = self._own(state_dict.get("best_model_path"))
        if self.dirpath is None or not best or not Path(best).exists():
            if self.monitor and (best or stored_dir):
                rank_zero_info(f"musicvae: {self.dirpath} holds no {self.filename}.ckpt of the resumed run; the best "
                               "score starts afresh there")
            return
        self.best_model_score = _score(state_dict.get("best_model_score"))
        self.kth_value = _score(state_dict.get("kth_value")) if _score(state_dict.get("kth_value")) is not None \
            else self.kth_value
        stored_k = state_dict.get("best_k_models")
        self.best_k_models = {self._own(path): _score(score) for path, score in
                              (stored_k.items() if isinstance(stored_k, dict) else ())
                              if self._own(path) and _score(score) is not None}
        self.best_model_path = best
        self.kth_best_model_path = self._own(state_dict.get("kth_best_model_path"))
        self.last_model_path = self._own(state_dict.get("last_model_path"))
        if stored_dir != self.dirpath and self.monitor:
            rank_zero_info(f"musicvae: run folder moved from {stored_dir} to {self.dirpath}; best score kept")

    def _own(self, path: Any) -> str:
        """This callback's file in the current folder when `path` names it (by file name), else ''."""
        name = f"{self.filename}{self.FILE_EXTENSION}"
        if not isinstance(path, str) or not path or Path(path).name != name or self.dirpath is None:
            return ""
        return str(Path(self.dirpath) / name)


def _score(value: Any) -> Optional[torch.Tensor]:
    """A stored score as a tensor, or None when it is not a number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value))
    return None


def _no_dir_warning(self: ModelCheckpoint, dirpath: str) -> None:
    # Lightning warns whenever the folder holds checkpoints, resumes included; the CLI already
    # refuses a fresh run into a used folder, so the warning would only ever be noise here.
    return None


setattr(FixedNameCheckpoint, CHECKPOINT_DIR_WARNING, _no_dir_warning)


class DataHandOver(Callback):
    """Hands the module what it takes from the data module, so the module never reads it: the z-score
    scale its scores report in (before each validation and test), and the training windows its linear
    path starts from (when training starts, so the fit counts against `max_time`)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "needs_linear_start", False):
            examples = pl_module.hparams.linear_path_examples
            pl_module.start_linear_path(linear_start_windows(trainer, examples) if trainer.is_global_zero else None)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hand_scale(trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hand_scale(trainer, pl_module)

    @staticmethod
    def _hand_scale(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        normalizer = getattr(getattr(trainer, "datamodule", None), "normalizer", None)
        if normalizer is not None and hasattr(pl_module, "scores"):
            pl_module.scores.std = normalizer.std


def linear_start_windows(trainer: L.Trainer, examples: int) -> Any:
    """At most `examples` training windows, evenly spaced, with fixed crops and no augmentation: the same
    on every run (a dataset of (1, n_mels, frames) windows)."""
    train_set = getattr(getattr(trainer, "datamodule", None), "train_set", None)
    if train_set is None:
        raise ConfigError("model.linear_path needs the training data module (MelDataModule) to fit its PCA")
    count = min(len(train_set), examples)
    rows = np.unique(np.linspace(0, len(train_set) - 1, count).round().astype(np.int64))
    return train_set.fixed_windows(rows)
