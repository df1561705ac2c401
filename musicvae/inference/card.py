"""What a saved model says about where it came from: the model card's training facts and its text.

A card is published, so it carries no full path of the machine it was made on: the run's folder by
its base name only, and the training command rebuilt from the checkpoint's stored run config with
its paths cut to base names and its places to write (`data.cache_dir`) left out.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Optional

from musicvae.audio.mel import MelSettings
from musicvae.data.augment import AugmentSettings
from musicvae.data.datamodule import MelDataModule
from musicvae.errors import ConfigError
from musicvae.training.checkpoints import flatten, load_checkpoint, run_config
from musicvae.training.hparams import SHARPEN_CLASS, canonical
from musicvae.training.module import MusicVAEModule
from musicvae.training.stored_config import INPUT_PATHS, NEVER_DATA

#: The model card: YAML metadata (license, library, tags) for the Hub, then the card's sections.
CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A variational autoencoder on log-mel spectrograms of music, trained with musicvae. It encodes each
window of a recording ({{ frames }} frames of {{ n_mels }} mel bins, {{ window_seconds }} s at
{{ sample_rate }} Hz) to {{ latent_dim }} numbers and decodes them back to a log-mel, which a vocoder
turns into sound.

## Use

```python
import musicvae

model = musicvae.load("{{ repo_id }}")
codes = model.encode(waveform, sample_rate)   # (windows, {{ latent_dim }}) posterior means
audio = model.decode(codes)                   # a waveform at {{ sample_rate }} Hz (Griffin-Lim)
```

## Training

Run folder: `{{ run }}`{{ checkpoint_note }}

```
{{ command }}
```

## Evaluation

{{ metrics }}

## License

{{ license_note }}
"""


def run_name(ckpt_path: str | os.PathLike) -> str:
    """The training folder's base name (`checkpoints/music_vae_improved/best.ckpt` -> `music_vae_improved`)."""
    return Path(ckpt_path).expanduser().resolve().parent.name


def _shown(key: str, value: Any) -> str:
    if key in INPUT_PATHS and isinstance(value, str):
        value = Path(value).name  # a published card names no folder of the machine it was made on
    return shlex.quote(value if isinstance(value, str) else json.dumps(value))


def training_command(stored: Mapping[str, Any]) -> str:
    """`musicvae fit` with the stored run's model and data settings that differ from the defaults.

    Args:
        stored: a checkpoint's stored run config (musicvae.training.checkpoints.run_config).
    """
    defaults: dict[str, Any] = {"seed_everything": 0}
    for group, cls in (("model", MusicVAEModule), ("data", MelDataModule)):
        defaults.update({f"{group}.{name}": p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                         if p.default is not inspect.Parameter.empty})
    defaults.update({f"data.mel.{k}": v for k, v in MelSettings().to_dict().items()})
    defaults.update({f"data.augment.{k}": v for k, v in asdict(AugmentSettings()).items()})
    defaults.update({"trainer.max_epochs": None, "trainer.max_steps": -1})
    settings = flatten({k: stored[k] for k in ("seed_everything", "model", "data") if k in stored})
    trainer = stored.get("trainer") if isinstance(stored.get("trainer"), Mapping) else {}
    settings.update({f"trainer.{k}": trainer[k] for k in ("max_epochs", "max_steps") if k in trainer})
    never = {f"data.{key}" for key in NEVER_DATA} | {"data.mel", "data.augment"}  # groups: their keys are flags
    flags = [f"--{key} {_shown(key, value)}" for key, value in settings.items()
             if key not in never and key in defaults and _normal(value) != _normal(defaults[key])]
    if canonical(settings.get("model.class_path")) == SHARPEN_CLASS:  # the adversarial stage
        flags.insert(0, "--model SharpenModule")
    return " ".join(["musicvae fit", *flags])


def _normal(value: Any) -> Any:
    """Lists and tuples alike, so a stored [8, 16] equals a default (8, 16)."""
    return json.loads(json.dumps(value, default=str))


def training_info(ckpt_path: str | os.PathLike) -> dict[str, Any]:
    """The card's facts about a checkpoint: its run folder's base name, file name and training command."""
    ckpt = load_checkpoint(ckpt_path)
    stored = run_config(ckpt)
    return {"run": run_name(ckpt_path), "checkpoint": Path(ckpt_path).name,
            "command": training_command(stored) if stored else "(not stored: the checkpoint was written outside "
                                                                 "the musicvae command line)"}


def scalar_metrics(metrics: Optional[Mapping[str, Any] | str | os.PathLike]) -> dict[str, float]:
    """The finite numbers of `musicvae evaluate`'s result: its `metrics.json` (a path) or the dict it holds.

    Raises:
        ConfigError: a path that is not a readable JSON object.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        try:
            metrics = json.loads(Path(metrics).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"metrics {metrics}: not a readable metrics.json ({err})") from None
        if not isinstance(metrics, Mapping):
            raise ConfigError("metrics: expected the JSON object `musicvae evaluate` writes (metrics.json)")
    inner = metrics.get("metrics")
    table = inner if isinstance(inner, Mapping) else metrics  # metrics.json holds them under "metrics"
    return {str(k): float(v) for k, v in sorted(table.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def card_fields(config: Mapping[str, Any], repo_id: str, license: str) -> dict[str, Any]:
    """The values CARD_TEMPLATE fills in, from a saved model's config.json contents."""
    mel, model, training = config["mel"], config["model"], config.get("training") or {}
    metrics = training.get("metrics") or {}
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in metrics.items())
    return {
        "title": training.get("run") or "musicvae model",
        "repo_id": repo_id,
        "window_seconds": f"{config['frames'] * mel['hop_length'] / mel['sample_rate']:.2f}",
        "frames": config["frames"], "n_mels": mel["n_mels"], "sample_rate": mel["sample_rate"],
        "latent_dim": model["latent_dim"],
        "run": training.get("run", "(unknown)"),
        "checkpoint_note": f", checkpoint `{training['checkpoint']}`" if training.get("checkpoint") else "",
        "command": training.get("command", "(unknown)"),
        "metrics": (f"From `musicvae evaluate`:\n\n| metric | value |\n| --- | --- |\n{rows}" if rows
                    else "No evaluation was given when this model was saved."),
        "license_note": (f"`{license}`." if license not in ("unknown", "other") else
                         "Not stated: a model's weights carry the terms of the music it was trained on; "
                         "the person who saved it sets them with `save_pretrained(..., license=...)`."),
    }
