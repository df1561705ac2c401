"""EMA of the weights: Lightning's EMAWeightAveraging, with the averaged weights kept in place until
every validation-end hook has run, and the module's buffers never averaged.

Switched on by `--model.ema_decay D` (the command line adds this callback). Validation, the
TensorBoard media, `best.ckpt` and `last.ckpt` (and so evaluate, generate, export and prior
samples, which load a checkpoint's `state_dict`) use the averaged weights; training continues
from the raw ones, which the checkpoint keeps under `current_model_state` (Lightning's format),
so a resume continues both exactly.

Two changes to Lightning's callback, both about hook order and state:
- Lightning swaps the raw weights back in its `on_validation_epoch_end`, which Lightning runs
  before the module's own `on_validation_epoch_end` and before every callback's
  `on_validation_end`: the variance-compensation curve would be fitted, and the figures and
  audio drawn, for the raw weights while the scores and checkpoints describe the averaged ones.
  Here the swap back happens in `on_validation_end`; the command line puts this callback after
  the media logger, and Lightning runs the checkpoint callbacks after all others.
- Only parameters are averaged and swapped. Buffers stay the module's own: the compensation
  curve fitted at validation, the linear path's PCA (set when training starts, after the
  average is created), the frequency weights. Lightning's default averages buffers too, which
  would blur a freshly fitted curve into its predecessors and turn flags into fractions.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging

from musicvae.errors import ConfigError
from musicvae.training.checkpoints import RAW_WEIGHTS_KEY


def check_decay(decay: float) -> None:
    if not 0.0 < decay < 1.0:
        raise ConfigError(f"model.ema_decay={decay} must lie in (0, 1) (e.g. 0.999: an average over ~1000 steps), "
                          "or be null for no averaging")


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
        self._swapped = False

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is not None and not self._swapped:
            self._swap_models(pl_module)
            self._swapped = True

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # too early: see on_validation_end

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:
            self._swap_models(pl_module)
            self._swapped = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if RAW_WEIGHTS_KEY not in checkpoint:
            return
        raw, average = checkpoint[RAW_WEIGHTS_KEY], checkpoint["state_dict"]
        if self._swapped:
            # Written during validation (a SIGTERM's save): the module holds the average and the copy
            # holds the raw weights, so Lightning's two entries are each other's.
            for name, _ in pl_module.named_parameters():
                raw[name], average[name] = average[name], raw[name]
        for name, _ in pl_module.named_buffers():
            if name in raw:
                average[name] = raw[name]  # the module's buffers, not the copy's stale ones

    def _swap_models(self, pl_module: L.LightningModule) -> None:
        assert self._average_model is not None
        for average, current in zip(self._average_model.module.parameters(), pl_module.parameters()):
            held = average.data.clone()
            average.data.copy_(current.data)
            current.data.copy_(held)

    def _copy_average_to_current(self, pl_module: L.LightningModule) -> None:
        assert self._average_model is not None
        for average, current in zip(self._average_model.module.parameters(), pl_module.parameters()):
            current.data.copy_(average.data)
