"""Load a trained run from its checkpoint, for evaluation, generation and export.

Everything needed comes from the checkpoint itself, read with `weights_only=True`: the model's
hyper-parameters and weights, and the data module's mel settings, normalisation and split rule.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from musicvae.audio.mel_settings import MelSettings, read_mel_sidecar
from musicvae.training.checkpoints import DATA_STATE_KEY, RAW_WEIGHTS_KEY, load_checkpoint, run_config
from musicvae.data.datamodule import MelDataModule
from musicvae.errors import CheckpointError, ConfigError
from musicvae.training.model_classes import model_spec
from musicvae.compensation import with_compensation_defaults
from musicvae.training.module import MusicVAEModule
from musicvae.training.stored_config import check_mel_bounds, check_model_shapes, is_plain

#: Data settings that evaluation may take from the stored run (the rest come from the checkpoint). Never
#: `cache_dir`: a checkpoint is data and chooses no place to write (musicvae/training/stored_config.py).
_DATA_KEYS = ("data_dir", "frames", "batch_size", "val_split", "seed", "synthetic_pieces",
              "synthetic_seconds", "silence_margin", "on_bad_file")


def load_module(ckpt_path: str | os.PathLike, device: str = "cpu",
                weights: str = "average") -> tuple[MusicVAEModule, dict[str, Any]]:
    """The trained module in eval mode on `device`, and the checkpoint it came from.

    Args:
        ckpt_path: a checkpoint the command line wrote.
        device: where the module goes.
        weights: "average", the checkpoint's `state_dict` (with `--model.ema_decay` the EMA
            average, else the only weights); "raw", a run with EMA's training weights beside it.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here; use --device cpu")
    ckpt = load_checkpoint(ckpt_path)
    model_class, hparams = model_spec(ckpt["hyper_parameters"], str(ckpt_path))  # any version's layout
    hparams["compile"] = False  # a training speed setting; evaluation and export run eagerly
    if weights not in ("average", "raw"):
        raise ConfigError(f"--weights {weights!r}: use 'average' (the checkpoint's state_dict) or 'raw'")
    if weights == "raw" and RAW_WEIGHTS_KEY not in ckpt:
        raise CheckpointError(f"{ckpt_path}: no raw weights beside its state_dict: it was trained without "
                              "--model.ema_decay, so its one set of weights is --weights average")
    state = ckpt[RAW_WEIGHTS_KEY] if weights == "raw" else ckpt["state_dict"]
    mel = (ckpt.get(DATA_STATE_KEY) or {}).get("mel")
    if mel is not None:
        check_mel_bounds(mel, ckpt_path)
    check_model_shapes(model_class, hparams, state, ckpt_path)  # before any real allocation
    try:
        module = model_class(**hparams)
        module.load_state_dict(with_compensation_defaults(dict(state), int(module.hparams.n_mels)))
    except (TypeError, RuntimeError) as err:
        raise CheckpointError(f"{ckpt_path}: the weights do not fit a MusicVAEModule ({err})") from None
    return module.eval().to(device), ckpt


def datamodule_for(
    ckpt: dict[str, Any], data_dir: Optional[str] = None, batch_size: Optional[int] = None, **overrides: Any
) -> MelDataModule:
    """A MelDataModule that sees data exactly as the checkpoint's model was trained to.

    Mel settings, segment length and normalisation statistics come from the checkpoint; the
    folder, split rule and cache location from the stored run unless `data_dir` or `overrides`
    say otherwise. A folder whose arrays declare other mel settings is refused.
    """
    state = ckpt.get(DATA_STATE_KEY) or {}
    stored = (run_config(ckpt).get("data") or {}) if ckpt else {}
    kwargs = {k: stored[k] for k in _DATA_KEYS if k in stored and is_plain(stored[k])}
    kwargs.update({"frames": state.get("frames", kwargs.get("frames", 128)), "val_split": state.get("val_split", 0.1),
                   "seed": state.get("seed", 0), "num_workers": 0})
    if data_dir is not None:
        kwargs["data_dir"] = str(data_dir)
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    kwargs.update(overrides)
    mel = MelSettings.from_dict(state["mel"], source="checkpoint") if "mel" in state else None
    folder = kwargs.get("data_dir")
    declared = read_mel_sidecar(Path(folder)) if folder and Path(folder).is_dir() else None
    if declared is not None and mel is not None and declared != mel:
        diffs = ", ".join(f"{k} {b!r} (the folder has {a!r})" for k, (a, b) in declared.differences(mel).items())
        raise ConfigError(f"{folder}: the arrays do not match the checkpoint, which expects {diffs}")
    datamodule = MelDataModule(mel=mel, **kwargs)
    datamodule.load_state_dict(state)
    return datamodule


def resolve_alpha(module: MusicVAEModule, alpha: Optional[float | str]) -> float:
    """A compensation strength from a flag value: a number in [0, 1], or "perceptual" / None for the
    checkpoint's fitted perceptual point (0 when the checkpoint has no curve and None was given).

    Raises:
        ConfigError: a strength outside [0, 1], or "perceptual" / a positive strength for a checkpoint
            without a fitted curve.
    """
    fitted = bool(module.gain_fitted)
    stored = round(float(module.output_alpha), 6)  # a float32 buffer: 0.94 is stored as 0.93999999
    if alpha is None:
        return stored if fitted else 0.0
    if alpha == "perceptual":
        if not fitted:
            module.require_curve()
        return stored
    try:
        value = float(alpha)
    except ValueError:
        raise ConfigError(f"--alpha {alpha!r}: give a strength in [0, 1] or 'perceptual'") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"--alpha {alpha}: the strength must lie in [0, 1] (0: the plain decoder output)")
    if value > 0:
        module.require_curve()
    return value
