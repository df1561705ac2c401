"""EMA of the weights: Lightning's EMAWeightAveraging, entered and left as one explicit scope around
validation, with the module's buffers never averaged.

Switched on by `--model.ema_decay D` (the command line adds this callback). Validation, the
media, `best.ckpt` and `last.ckpt` (and so evaluate, generate, export and prior samples, which load
a checkpoint's `state_dict`) use the averaged weights; training continues from the raw ones, which
the checkpoint keeps under `current_model_state` (Lightning's format), so a resume continues both.

Two changes to Lightning's callback:
- Lightning swaps the average in at `on_validation_epoch_start` and out at `on_validation_epoch_end`,
  which runs before the module's own epoch end and every callback's `on_validation_end` (the
  media, the checkpoints): the compensation curve would be fitted, and the figures drawn, for the
  raw weights while the scores and checkpoints describe the average. Here the module enters
  `averaged_weights` at `on_validation_model_eval` and leaves it at `on_validation_model_train`,
  the first and last hooks of a validation loop, so every step in between sees the average.
- Only parameters are averaged and swapped. Buffers stay the module's own: the compensation
  curve fitted at validation, the linear path's code (set when training starts, after the average
  is created), the frequency weights. Lightning's default averages buffers too, which would blur a
  freshly fitted curve into its predecessors and turn flags into fractions.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from musicvae.training.checkpoints import RAW_WEIGHTS_KEY
from musicvae.training.hparams import check_decay
from musicvae.training.lightning_private import EMA_AVERAGE


def swap_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Exchange the values of two modules' parameters (same architecture), in place."""
    for pa, pb in zip(a.parameters(), b.parameters()):
        held = pa.data.clone()
        pa.data.copy_(pb.data)
        pb.data.copy_(held)


class EMA(EMAWeightAveraging):
    """EMA of the module's parameters (decay `decay` per optimizer step).

    Args:
        decay: weight of the running average at each update; the average spans about
            1 / (1 - decay) steps.
        update_starting_at_step: the first optimizer step (0-based) that updates the average
            (None: the first); before it the average stays at the starting weights.
    """

    def __init__(self, decay: float = 0.999, update_starting_at_step: int | None = None) -> None:
        check_decay(decay)
        super().__init__(decay=decay, use_buffers=False, update_starting_at_step=update_starting_at_step)
        self.decay = decay
        self.entered = False

    @property
    def average(self) -> Any:
        """Lightning's averaged copy (an AveragedModel; None until fit sets it up)."""
        return getattr(self, EMA_AVERAGE)

    def enter(self, pl_module: L.LightningModule) -> None:
        """Put the averaged parameters in the module (the raw ones wait in the copy)."""
        if self.average is not None and not self.entered:
            swap_parameters(self.average.module, pl_module)
            self.entered = True

    def leave(self, pl_module: L.LightningModule) -> None:
        """Put the raw parameters back."""
        if self.entered:
            swap_parameters(self.average.module, pl_module)
            self.entered = False

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # the module enters the average itself (averaged_weights), before any validation hook

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # too early: the module leaves the average after everything validation does

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The module keeps the average after fit, as a loaded checkpoint would; parameters only.
        if self.average is not None:
            self.leave(pl_module)
            for average, current in zip(self.average.module.parameters(), pl_module.parameters()):
                current.data.copy_(average.data)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if RAW_WEIGHTS_KEY not in checkpoint:
            return
        raw, average = checkpoint[RAW_WEIGHTS_KEY], checkpoint["state_dict"]
        if self.entered:
            # Written during validation (best/last.ckpt at validation end, a SIGTERM's save): the module
            # holds the average and the copy the raw weights, so Lightning's two entries are each other's.
            for name, _ in pl_module.named_parameters():
                raw[name], average[name] = average[name], raw[name]
        for name, _ in pl_module.named_buffers():
            if name in raw:
                average[name] = raw[name]  # the module's buffers, not the copy's stale ones


@contextmanager
def averaged_weights(trainer: Any, pl_module: L.LightningModule) -> Iterator[None]:
    """The EMA average in `pl_module` for the duration (nothing without an EMA callback)."""
    ema = next((cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, EMA)), None)
    if ema is None:
        yield
        return
    ema.enter(pl_module)
    try:
        yield
    finally:
        ema.leave(pl_module)


@contextmanager
def modes_kept(module: torch.nn.Module) -> Iterator[None]:
    """Every submodule's train/eval mode restored on leaving (what Lightning does around validation
    unless `on_validation_model_train` is overridden)."""
    modes = {m: m.training for m in module.modules()}
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)
