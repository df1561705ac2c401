"""Reading musicvae checkpoints safely, and what a resume may and may not change.

Every checkpoint is read with `torch.load(weights_only=True)`: only tensors and plain values,
so a crafted file cannot run code. A checkpoint carries the run's full config (`RUN_CONFIG_KEY`),
which is how `--ckpt_path` alone resumes the same run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import yaml

from musicvae.errors import CheckpointError
from musicvae.io.safe_load import load_weights_only, safe_yaml_load
from musicvae.training.hparams import SHARPEN_CLASS, canonical, current_config, current_layout

#: Key of the run's full config (a YAML string) inside every checkpoint the CLI writes.
RUN_CONFIG_KEY = "musicvae_run_config"
#: Where Lightning's WeightAveraging (EMA: musicvae/training/ema.py) keeps the raw training weights; the
#: checkpoint's `state_dict` is then the average.
RAW_WEIGHTS_KEY = "current_model_state"
#: Key of the run's id (hex), the same in every checkpoint of one run, resumes included.
RUN_ID_KEY = "musicvae_run_id"
#: Key of {"name": monitor, "value": float} inside every checkpoint the CLI writes.
MONITOR_KEY = "musicvae_monitor"
#: Key of the data module's state (mel settings, statistics, split rule).
DATA_STATE_KEY = "MelDataModule"
#: Fields whose change makes the weights meaningless or unloadable.
ARCHITECTURE_FIELDS = ("n_mels", "frames", "latent_dim", "channels", "blocks_per_stage", "linear_path_components")
#: Fields of the run that may differ on resume without being a change of hyper-parameters.
NOT_HYPERPARAMETERS = ("ckpt_path", "overwrite", "force", "predict_dir", "predict_reconstructions")


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """Load a musicvae checkpoint with `weights_only=True`, or explain why not.

    Raises:
        CheckpointError: missing, truncated or corrupt file, a pickle that needs code to load
            (refused, nothing executed), or a checkpoint of another model.
    """
    path = Path(path)
    ckpt = load_weights_only(path, "checkpoint file", map_location=map_location)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict)")
    hparams = ckpt.get("hyper_parameters") or {}
    if DATA_STATE_KEY not in ckpt or "latent_dim" not in hparams:
        raise CheckpointError(
            f"{path}: not a musicvae checkpoint (written by another model: it lacks the MusicVAEModule "
            "hyper-parameters or the MelDataModule state)"
        )
    return ckpt


def run_config(ckpt: dict[str, Any], source: Optional[str | os.PathLike] = None) -> dict[str, Any]:
    """The run's config stored in a checkpoint ({} for checkpoints written outside the CLI), in today's
    layout; `source` (the file) is named in a refusal."""
    text = ckpt.get(RUN_CONFIG_KEY)
    if not text:
        return {}
    if not isinstance(text, str):
        raise CheckpointError(f"its stored run config ({RUN_CONFIG_KEY}) is not YAML text")
    config = safe_yaml_load(text, "the run config stored in the checkpoint")
    # Every earlier layout read as today's (musicvae/training/hparams.py holds the table).
    label = f"{source}: its stored run config" if source else "its stored run config"
    return current_config(config, label) if isinstance(config, dict) else {}


def config_from_hyperparameters(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A partial run config rebuilt from a checkpoint written outside the CLI (Python API).

    Only what the weights need: the model's hyper-parameters and the data's shape settings.
    """
    linked = {"n_mels", "frames"}  # the CLI links these from the data settings
    class_path, args, media = current_layout(ckpt.get("hyper_parameters") or {}, "its hyper-parameters")
    args = {k: v for k, v in args.items() if k not in linked and not k.startswith("_")}
    data_state = ckpt.get(DATA_STATE_KEY) or {}
    data = {k: data_state[k] for k in ("frames", "mel") if k in data_state}
    return {"model": {"class_path": class_path, "init_args": args}, "data": data, **({"media": media} if media else {})}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"lr": 1}} -> {"model.lr": 1}; lists stay values. The model's class path and init
    arguments read as `model.class_path` and `model.lr`, the names the command line takes."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if name == "model" and isinstance(value, dict) and "class_path" in value:
            flat[f"{name}.class_path"] = canonical(value["class_path"])
            flat.update(flatten(dict(value.get("init_args") or {}), f"{name}."))
        elif isinstance(value, dict) and value and "class_path" not in value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_changes(old: dict[str, Any], new: dict[str, Any],
                   defaults: Optional[dict[str, Any]] = None) -> dict[str, tuple[Any, Any]]:
    """Settings that differ between two run configs, as {"model.lr": (old, new)}.

    A setting the old config lacks (it was written before the setting existed) and that the new
    one leaves at its default (from `defaults`, a config of the same shape) is not a change.
    """
    a, b, d = flatten(old), flatten(new), flatten(defaults or {})
    changes = {}
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in NOT_HYPERPARAMETERS or key in NOT_HYPERPARAMETERS:
            continue
        if key not in a and key in d and _normal(b.get(key)) == _normal(d[key]):
            continue
        if _normal(a.get(key)) != _normal(b.get(key)):
            changes[key] = (a.get(key), b.get(key))
    return changes


def _normal(value: Any) -> Any:
    # YAML round trips turn tuples into lists and 5e-5 into "5.0e-05" floats alike.
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return value


def unresumable_changes(ckpt: dict[str, Any], model_hparams: dict[str, Any], mel: dict[str, Any]) -> list[str]:
    """Why the checkpoint's weights cannot continue under the new settings ([] if they can).

    Args:
        ckpt: the checkpoint (its hyper-parameters of any version).
        model_hparams: the new model's settings, with its class path under `_class_path`.
        mel: the new mel settings.
    """
    old_class, old_hp, _ = current_layout(ckpt.get("hyper_parameters", {}))
    new_class, model_hparams, _ = current_layout(model_hparams, "the command")
    problems = []
    for name in ARCHITECTURE_FIELDS:
        old, new = old_hp.get(name), model_hparams.get(name)
        if _normal(old) != _normal(new):
            problems.append(f"model.{name}: checkpoint {old!r}, now {new!r}")
    # The adversarial stage adds a network and an optimizer: it starts from weights (init_from), it is
    # not switched on or off in a resumed run.
    if old_class != new_class:
        problems.append(f"model.class_path: checkpoint {old_class.rsplit('.', 1)[-1]}, now {new_class.rsplit('.', 1)[-1]} "
                        "(start the adversarial stage as a new run with --model.init_from CHECKPOINT instead of "
                        "--ckpt_path)")
    elif new_class == SHARPEN_CLASS and _normal(old_hp.get("disc_channels")) != _normal(model_hparams.get("disc_channels")):
        problems.append(f"model.disc_channels: checkpoint {old_hp.get('disc_channels')!r}, "
                        f"now {model_hparams.get('disc_channels')!r}")
    # With EMA, a checkpoint's state_dict is the average and the raw training weights are beside it: resumed
    # without EMA, training would silently continue from the average.
    if RAW_WEIGHTS_KEY in ckpt and not model_hparams.get("ema_decay"):
        problems.append(f"model.ema_decay: checkpoint {old_hp.get('ema_decay')!r}, now None (its state_dict holds the "
                        "averaged weights and training continues from the raw ones beside them; keep "
                        "--model.ema_decay, or start a new run from the average with --model.init_from)")
    # "plateau" runs two schedulers of other kinds than the step schedules: a stored state cannot load into them.
    was, now = old_hp.get("lr_schedule", "constant"), model_hparams.get("lr_schedule", "constant")
    if was != now and "plateau" in (was, now):
        problems.append(f"model.lr_schedule: checkpoint {was!r}, now {now!r} (plateau's scheduler state does not "
                        "carry over; switch between constant and cosine, or start a new run with --model.init_from)")
    old_mel = ckpt.get(DATA_STATE_KEY, {}).get("mel", {})
    for name, old in old_mel.items():
        if mel.get(name) != old:
            problems.append(f"data.mel.{name}: checkpoint {old!r}, now {mel.get(name)!r}")
    return problems


def stored_run_id(path: Path) -> Optional[str]:
    """The run id inside a checkpoint file, read without loading its tensors (None: written before ids).

    Raises:
        CheckpointError: the file cannot be read as a checkpoint.
    """
    try:
        ckpt = load_weights_only(path, "checkpoint file", mmap=True)
    except CheckpointError:
        ckpt = load_weights_only(path, "checkpoint file")  # torch's legacy format cannot be memory-mapped
    run_id = ckpt.get(RUN_ID_KEY) if isinstance(ckpt, dict) else None
    return run_id if isinstance(run_id, str) else None


def foreign_checkpoints(folder: Path, ckpt: dict[str, Any], ckpt_path: str | os.PathLike) -> list[str]:
    """The checkpoints in `folder` that belong to another run than `ckpt` (read from `ckpt_path`).

    Two checkpoints with run ids are the same run when the ids are equal. Checkpoints written before
    runs had ids are taken as the resumed run's only in the folder that holds the resumed file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    resumed = Path(ckpt_path).expanduser().resolve()
    own = ckpt.get(RUN_ID_KEY) if isinstance(ckpt.get(RUN_ID_KEY), str) else None
    foreign = []
    for path in sorted(folder.glob("*.ckpt")):
        if path.resolve() == resumed:
            continue
        try:
            other = stored_run_id(path)
        except CheckpointError:
            foreign.append(f"{path.name} (unreadable)")
            continue
        same = own == other if own is not None and other is not None else resumed.parent == folder.resolve()
        if not same:
            foreign.append(path.name)
    return foreign


def describe(path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """One row of the checkpoint listing: epoch, step, monitored value, time written."""
    monitored = ckpt.get(MONITOR_KEY) or {}
    return {
        "file": path.name,
        "path": str(path.resolve()),
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
        "monitor": monitored.get("name"),
        "value": monitored.get("value"),
        "written": path.stat().st_mtime,
    }


def dump_yaml(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def list_checkpoints(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every `*.ckpt` in `folder`, oldest first, described; unreadable ones carry an `error`.

    `best` and `last` mark the files the CLI's callbacks keep under those names.
    """
    rows = []
    for path in sorted(Path(folder).glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name)):
        try:
            row = describe(path, load_checkpoint(path))
        except CheckpointError as err:
            row = {"file": path.name, "path": str(path.resolve()), "error": str(err)}
        row["best"] = path.name == "best.ckpt"
        row["last"] = path.name == "last.ckpt"
        rows.append(row)
    return rows
