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

from musicvae.errors import CheckpointError
from musicvae.training.module import MusicVAEModule, with_compensation_defaults

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
