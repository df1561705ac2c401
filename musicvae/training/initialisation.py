"""Starting a new run from a trained model's weights (`--model.init_from CKPT`).

Unlike `--ckpt_path`, which resumes a run exactly (optimizer, step count, loops, data position),
`init_from` takes the weights only: the optimizer starts afresh, the step count at 0, and every
setting comes from the new config. It is how a fine-tuning stage (a new loss, a new learning rate,
the adversarial stage of configs/sharp.yaml) starts from a trained VAE. The checkpoint is read by
the project's safe loader (`musicvae.training.checkpoints.load_checkpoint`: `weights_only=True`).
"""

from __future__ import annotations

from typing import Any

import torch
from jsonargparse import Namespace

from musicvae.errors import CheckpointError
from musicvae.training.checkpoints import DATA_STATE_KEY, RAW_WEIGHTS_KEY
from musicvae.training.stored_config import check_mel_bounds
from musicvae.compensation import with_compensation_defaults
from musicvae.training.module import MusicVAEModule

#: The configured frequency bands win over the stored ones (a hyper-parameter, as on resume).
_CONFIGURED = ("freq_weight",)
#: Model settings that decide the shapes of the weights, named in the message when they do not fit.
SHAPE_SETTINGS = ("architecture", "latent_dim", "channels", "blocks_per_stage", "n_mels", "frames", "linear_path",
                  "linear_path_components")


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(n) for n in t.shape) or "scalar"


def initialise_from(module: MusicVAEModule, ckpt: dict[str, Any], path: str) -> dict[str, Any]:
    """Copy the checkpoint's weights into `module`; refuse, naming the tensors, when they do not fit.

    Tensors the module has and the checkpoint lacks are allowed only under the module's
    ``fresh_prefixes`` (parts new to this stage, e.g. the adversarial stage's discriminator);
    tensors the checkpoint has and the module lacks (e.g. a discriminator, when a plain VAE starts
    from a sharpened one) are left out and listed.

    Returns:
        ``loaded`` (count), ``fresh`` (names started at their initialisation) and ``ignored``
        (names of the checkpoint not used).

    Raises:
        CheckpointError: naming each tensor whose shape differs or that is missing, with the
            checkpoint's and the model's shape settings.
    """
    source = with_compensation_defaults(dict(ckpt.get("state_dict") or {}), int(module.hparams.n_mels))
    target = module.state_dict()
    fresh_prefixes = tuple(getattr(module, "fresh_prefixes", ()))
    mismatched = [f"{k} (checkpoint {_shape(source[k])}, model {_shape(v)})" for k, v in target.items()
                  if k in source and k not in _CONFIGURED and source[k].shape != v.shape]
    missing = [k for k in target if k not in source and k not in _CONFIGURED and not k.startswith(fresh_prefixes)]
    if mismatched or missing:
        stored = ckpt.get("hyper_parameters") or {}
        theirs = ", ".join(f"{k} {stored[k]!r}" for k in SHAPE_SETTINGS if k in stored)
        ours = ", ".join(f"{k} {module.hparams[k]!r}" for k in SHAPE_SETTINGS if k in module.hparams)
        problems = [f"{len(mismatched)} of different shape: " + "; ".join(mismatched[:6])
                    + (f"; ... {len(mismatched) - 6} more" if len(mismatched) > 6 else "")] if mismatched else []
        if missing:
            problems.append(f"{len(missing)} missing from the checkpoint: " + ", ".join(missing[:6])
                            + (f", ... {len(missing) - 6} more" if len(missing) > 6 else ""))
        raise CheckpointError(
            f"{path}: --model.init_from: the checkpoint's weights do not fit this model ({'; '.join(problems)}). "
            f"The checkpoint has {theirs or 'no stored settings'}; this model has {ours}. Set the model's shape "
            "settings as the checkpoint's, or train without init_from.")
    loaded = {k: v for k, v in source.items() if k in target and k not in _CONFIGURED}
    module.load_state_dict(loaded, strict=False)
    return {"loaded": len(loaded), "fresh": [k for k in target if k not in source and k not in _CONFIGURED],
            "ignored": sorted(k for k in source if k not in target)}


def adopt_mel_settings(config: Any, ckpt: dict) -> str:
    """With --model.init_from and no --data.mel given, the checkpoint's mel settings (its weights were
    trained on them); returns which settings the run uses, in words."""
    stored = (ckpt.get(DATA_STATE_KEY) or {}).get("mel")
    if stored is None:
        return "this run's (the checkpoint stores none)"
    check_mel_bounds(stored, config.model.init_args.init_from)
    if config.data.mel is None:
        config.data.mel = Namespace(**stored)
        return "the checkpoint's (" + ", ".join(f"{k} {v}" for k, v in stored.items()) + ")"
    given = config.data.mel.as_dict() if hasattr(config.data.mel, "as_dict") else dict(config.data.mel)
    differ = {k: (stored.get(k), v) for k, v in given.items() if stored.get(k) != v}
    if not differ:
        return "as configured, the same as the checkpoint's"
    return "as configured (--data.mel), which differ from the checkpoint's: " + ", ".join(
        f"{k} {a!r} -> {b!r}" for k, (a, b) in differ.items())


def initialise_run(module: MusicVAEModule, datamodule: Any, ckpt: dict[str, Any], path: str, mel_note: str,
                   normalization: str) -> str:
    """--model.init_from on a built run: the checkpoint's weights, and its normalisation unless
    `normalization` is "data"; returns what was done, in lines for the log."""
    done = initialise_from(module, ckpt, path)
    state = ckpt.get(DATA_STATE_KEY) or {}
    if normalization == "checkpoint" and "mean" in state and "std" in state:
        datamodule.normalizer.mean, datamodule.normalizer.std = float(state["mean"]), float(state["std"])
        datamodule.stats_restored = True
        norm = f"the checkpoint's (mean {float(state['mean']):.4g}, std {float(state['std']):.4g})"
    else:
        norm = "computed from this run's training data (--init_normalization data)"
    lines = [f"musicvae: starting from the weights of {path} (epoch {ckpt.get('epoch')}, step "
             f"{ckpt.get('global_step')}): {done['loaded']} tensors; a new optimizer, step count 0",
             f"  mel settings: {mel_note}", f"  normalisation: {norm}"]
    if RAW_WEIGHTS_KEY in ckpt:
        lines.append("  weights: the checkpoint's EMA average (its raw training weights are not used)")
    if done["fresh"]:
        lines.append(f"  new in this model, at their initialisation: {summarise_names(done['fresh'])}")
    if done["ignored"]:
        lines.append(f"  in the checkpoint, not used: {summarise_names(done['ignored'])}")
    return "\n".join(lines)


def summarise_names(names: list[str], shown: int = 4) -> str:
    """Tensor names, grouped by their first two components: ``discriminator.blocks (12 tensors)``."""
    groups: dict[str, int] = {}
    for name in names:
        key = ".".join(name.split(".")[:2])
        groups[key] = groups.get(key, 0) + 1
    parts = [f"{key} ({n} tensor{'s' if n > 1 else ''})" for key, n in list(groups.items())[:shown]]
    return ", ".join(parts) + (f", ... {len(groups) - shown} more" if len(groups) > shown else "")
