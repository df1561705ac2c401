"""A checkpoint's stored run config, read as data: what a command may take from it, and what never.

A checkpoint is a file a user may have been handed. Its stored config (`RUN_CONFIG_KEY`) is how
`--ckpt_path` alone resumes a run, but read as a command line it would choose classes to import,
functions to call and places to write. So it is filtered here, before the parser sees it:

- **Classes.** A `class_path` is taken only from `ALLOWED_CLASSES` (Lightning's file loggers and
  the callbacks that hold no callable and no path), with only the init arguments listed for it,
  each a plain value. Anything else is refused in one line before anything is imported, naming the
  entry and the flag that passes it explicitly. Plugins, strategies, profilers, CheckpointIO and
  the model registry are never taken.
- **Places.** Nothing that says where to write or delete (`checkpoint_dir`, `predict_dir`,
  `data.cache_dir`, a logger's `save_dir` and `version`, `default_root_dir`, ...) is taken. `fit`
  writes its checkpoints beside the checkpoint it resumes unless the user says otherwise; a
  logger's version is continued only where the user's (or the default) folder is the stored one
  (`resume.repin_loggers`). Input paths (`data.data_dir`, `media.vocoder`) are taken and printed.
- **Sizes.** The model a config describes is built on the meta device and compared with the
  checkpoint's weights before any memory is allocated (`check_model_shapes`).

jsonargparse's `import_path_allowlist` is process-wide, so it would also bind the user's own
flags; filtering the stored dict keeps the user's command line fully trusted.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from musicvae.errors import CheckpointError
from musicvae.training.hparams import current_config, current_layout

#: Top-level settings a stored config may give. Everything else (checkpoint_dir, overwrite, predict_dir,
#: ckpt_path, weights_only, unknown keys) is a place, a loading policy or not a setting of this version.
TAKEN_SETTINGS = ("seed_everything", "trainer", "model", "data", "media", "monitor", "checkpoint_every_n_steps",
                  "predict_reconstructions", "init_normalization", "collective_timeout", "skip_nonfinite")
#: Trainer settings never taken: objects that run code or choose processes, and places to write.
NEVER_TRAINER = ("strategy", "plugins", "profiler", "default_root_dir", "model_registry")
#: Data settings that are places to write.
NEVER_DATA = ("cache_dir",)
#: Input paths a stored config may give; each one taken is printed.
INPUT_PATHS = ("data.data_dir", "media.vocoder")
#: Stored settings never taken, so not reported as changed on resume either (the "not taken" line names them).
NOT_COMPARED = ("weights_only", "predict_dir", "data.cache_dir", "trainer.logger",
                *(f"trainer.{key}" for key in NEVER_TRAINER))
#: Largest model a checkpoint may describe, in elements of its state (2**31 float32s: 8 GiB).
MAX_MODEL_ELEMENTS = 2**31

_LOGGER_ARGS = ("name", "prefix")
_ALLOWED = {
    # Loggers: the folder (save_dir) and version are places; `name` is taken only as one plain folder name.
    "lightning.pytorch.loggers.TensorBoardLogger": (*_LOGGER_ARGS, "log_graph", "default_hp_metric", "max_queue",
                                                    "flush_secs"),
    "lightning.pytorch.loggers.CSVLogger": (*_LOGGER_ARGS, "flush_logs_every_n_steps"),
    # Callbacks that take neither a callable nor a path. LambdaCallback (it calls what it is given),
    # ModelCheckpoint (a folder), StochasticWeightAveraging (an averaging function) and the Rich ones
    # (a theme object) are absent on purpose.
    "lightning.pytorch.callbacks.EarlyStopping": ("monitor", "min_delta", "patience", "verbose", "mode", "strict",
                                                  "check_finite", "stopping_threshold", "divergence_threshold",
                                                  "check_on_train_epoch_end", "log_rank_zero_only"),
    "lightning.pytorch.callbacks.LearningRateMonitor": ("logging_interval", "log_momentum", "log_weight_decay"),
    "lightning.pytorch.callbacks.TQDMProgressBar": ("refresh_rate", "process_position", "leave"),
    "lightning.pytorch.callbacks.ModelSummary": ("max_depth",),
    "lightning.pytorch.callbacks.DeviceStatsMonitor": ("cpu_stats",),
    "lightning.pytorch.callbacks.Timer": ("duration", "interval", "verbose"),
    "lightning.pytorch.callbacks.GradientAccumulationScheduler": ("scheduling",),
}


def _with_defining_modules(allowed: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """`allowed` plus each class under the module that defines it (jsonargparse may store either spelling).
    Only Lightning's own modules, named above, are imported here."""
    spelled = dict(allowed)
    for path, args in allowed.items():
        module, name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        spelled[f"{cls.__module__}.{cls.__qualname__}"] = args
    return spelled


#: Every class path a stored config may name, with the init arguments it may set.
ALLOWED_CLASSES: dict[str, tuple[str, ...]] = _with_defining_modules(_ALLOWED)
#: The list settings that hold objects, with the flag that adds one explicitly.
_OBJECT_LISTS = {"trainer.callbacks": "--trainer.callbacks+=", "trainer.logger": "--trainer.logger+="}


@dataclass
class TakenConfig:
    """What a command takes from a stored config.

    Attributes:
        config: the filtered config, safe to hand to the parser as the base of the command line.
        inputs: input paths taken, as ``"data.data_dir /music"`` (printed).
        not_taken: stored settings dropped because they are places or objects, as ``(key, value)``.
        loggers: the stored logger entries as stored, for `resume.repin_loggers` to continue a version
            where the user's own folder is the stored one.
    """

    config: dict[str, Any]
    inputs: list[str] = field(default_factory=list)
    not_taken: list[tuple[str, Any]] = field(default_factory=list)
    loggers: list[dict[str, Any]] = field(default_factory=list)


def is_plain(value: Any) -> bool:
    """Numbers, strings, booleans, None, and lists and dicts of them without a `class_path`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return "class_path" not in value and all(
            isinstance(k, (str, int, float)) and is_plain(v) for k, v in value.items())
    return False


def is_folder_name(value: Any) -> bool:
    """A single folder name that stays inside its parent: no separator, not `.` or `..`, not empty."""
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value \
        and "\0" not in value


def _refuse(source: Path, where: str, what: str, flag: str) -> CheckpointError:
    return CheckpointError(
        f"{source}: its stored config names {what} in {where}, which musicvae does not take from a checkpoint "
        f"(a checkpoint is data: it may name only Lightning's TensorBoard/CSV loggers and callbacks without "
        f"callables or paths). If you trust it, give it yourself: {flag}")


def _object_entry(entry: Any, where: str, source: Path, flag: str, dropped: list) -> dict[str, Any]:
    """One stored logger or callback, filtered to its allowed plain arguments, or a refusal."""
    class_path = entry.get("class_path") if isinstance(entry, dict) else entry
    if not isinstance(class_path, str) or class_path not in ALLOWED_CLASSES:
        shown = class_path if isinstance(class_path, str) else type(entry).__name__
        raise _refuse(source, where, repr(shown)[:200], f"{flag}{shown if isinstance(shown, str) else 'CLASS'}")
    allowed = ALLOWED_CLASSES[class_path]
    kept: dict[str, Any] = {}
    for key, value in ((entry.get("init_args") or {}) if isinstance(entry, dict) else {}).items():
        if not is_plain(value):
            raise _refuse(source, f"{where}.init_args.{key}", "a class or an object", f"{flag}{class_path}")
        if key in allowed and (key != "name" or value is None or is_folder_name(value)):
            kept[key] = value
        elif value not in (None, "", False):
            dropped.append((f"{where}.init_args.{key}", value))
    return {"class_path": class_path, "init_args": kept}


def _object_list(value: Any, key: str, source: Path, dropped: list) -> Any:
    if value in (None, False, True):
        return value
    flag = _OBJECT_LISTS[key]
    if isinstance(value, list):
        return [_object_entry(e, f"{key}[{i}]", source, flag, dropped) for i, e in enumerate(value)]
    return _object_entry(value, key, source, flag, dropped)


def _plain_group(group: Any, name: str, source: Path, never: Iterable[str], dropped: list) -> dict[str, Any]:
    """A settings group (`model`, `data`, the rest of `trainer`) whose values must all be plain."""
    if not isinstance(group, dict):
        raise CheckpointError(f"{source}: its stored config's {name} is not a group of settings")
    kept = {}
    for key, value in group.items():
        if key in never:
            if value not in (None, "auto", False):
                dropped.append((f"{name}.{key}", value))
            continue
        if not is_plain(value):
            raise _refuse(source, f"{name}.{key}", "a class or an object", f"--{name}.{key} VALUE")
        kept[key] = value
    return kept


def _model_group(group: Any, source: Path) -> dict[str, Any]:
    """The model's class (one of `MODEL_CLASSES`, in any layout: `hparams.current_layout`) and its plain settings."""
    if not isinstance(group, dict):
        raise CheckpointError(f"{source}: its stored config's model is not a group of settings")
    class_path, args, _ = current_layout(group, f"{source}: its stored config")
    for key, value in args.items():
        if not is_plain(value):
            raise _refuse(source, f"model.{key}", "a class or an object", f"--model.{key} VALUE")
    return {"class_path": class_path, "init_args": args}


def config_as_data(stored: Mapping[str, Any], source: str | Path, subcommand: str,
                   user_keys: Iterable[str] = ()) -> TakenConfig:
    """Filter a checkpoint's stored run config down to what a command may take from it.

    Args:
        stored: the stored config (plain YAML data).
        source: the checkpoint file, for the messages and, for `fit`, the default checkpoint folder.
        subcommand: `fit`, `validate`, `test` or `predict`.
        user_keys: dotted settings the user's own command line or config files set; a stored object list
            (`trainer.callbacks`, `trainer.logger`) the user sets is not read at all.

    Returns:
        The filtered config and what was taken or dropped.

    Raises:
        CheckpointError: a class not in `ALLOWED_CLASSES`, or an object where a plain value belongs;
            nothing has been imported.
    """
    source, user_keys = Path(source), set(user_keys)
    if not isinstance(stored, Mapping):
        raise CheckpointError(f"{source}: its stored config is not a mapping of settings")
    if isinstance(stored.get("model"), Mapping):
        stored = current_config(stored, f"{source}: its stored config")  # any earlier layout, as today's
    dropped: list[tuple[str, Any]] = []
    config: dict[str, Any] = {}
    for key, value in stored.items():
        if key not in TAKEN_SETTINGS:
            if key not in ("checkpoint_dir", "overwrite", "ckpt_path", "weights_only") and value not in (None, False):
                dropped.append((key, value))
            continue
        if key == "model":
            config[key] = _model_group(value, source)
        elif key in ("data", "media"):
            config[key] = _plain_group(value, key, source, NEVER_DATA if key == "data" else (), dropped)
        elif key == "trainer":
            objects = {k: value.get(k) for k in ("callbacks", "logger")} if isinstance(value, dict) else {}
            trainer = _plain_group({k: v for k, v in (value or {}).items() if k not in objects}, "trainer", source,
                                   NEVER_TRAINER, dropped)
            for name, entries in objects.items():
                if f"trainer.{name}" not in user_keys:
                    trainer[name] = _object_list(entries, f"trainer.{name}", source, dropped)
            config[key] = trainer
        elif not is_plain(value):
            raise _refuse(source, key, "a class or an object", f"--{key} VALUE")
        else:
            config[key] = value
    if subcommand == "fit":
        # A moved or copied run keeps writing beside itself, never where the file says it came from.
        config["checkpoint_dir"] = str(source.expanduser().resolve().parent)
    stored_logger = ((stored.get("trainer") or {}) if isinstance(stored.get("trainer"), dict) else {}).get("logger")
    loggers = [e for e in (stored_logger if isinstance(stored_logger, list) else [stored_logger]) if isinstance(e, dict)]
    inputs = [f"{key} {value}" for key in INPUT_PATHS
              if (value := (config.get(key.split(".")[0]) or {}).get(key.split(".")[1]))]
    # The pinned folder and version are compared by repin_loggers, not reported as dropped.
    dropped = [(k, v) for k, v in dropped if not k.startswith("trainer.logger") or not k.endswith(
        (".init_args.save_dir", ".init_args.version"))]
    return TakenConfig(config, inputs, dropped, loggers)


def pinned_version(entry: Mapping[str, Any]) -> Any:
    """A stored logger's pinned version when it is a plain version (an int or one folder name), else None."""
    version = (entry.get("init_args") or {}).get("version")
    if isinstance(version, bool):
        return None
    return version if isinstance(version, int) or is_folder_name(version) else None


def check_model_shapes(model_class: type, hparams: Mapping[str, Any], state_dict: Mapping[str, Any],
                       source: str | Path) -> None:
    """Build the model `hparams` describe on the meta device (no memory) and compare it with the weights.

    A crafted `channels: [1000000000]` would otherwise allocate terabytes before the weights' shapes
    are ever compared.

    Raises:
        CheckpointError: the described model exceeds `MAX_MODEL_ELEMENTS`, or a tensor's shape differs
            from the checkpoint's.
    """
    import torch

    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in model_class(**hparams).state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source}: its hyper-parameters do not describe a {model_class.__name__} "
                              f"({str(err).splitlines()[0][:200]})") from None
    total = sum(int(torch.Size(s).numel()) for s in shapes.values())
    if total > MAX_MODEL_ELEMENTS:
        raise CheckpointError(f"{source}: its hyper-parameters describe a model of {total:,} numbers, more than "
                              f"musicvae builds ({MAX_MODEL_ELEMENTS:,}); refused before allocating it")
    differ = [f"{k} {tuple(state_dict[k].shape)} (the settings give {s})" for k, s in shapes.items()
              if k in state_dict and hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != s]
    if differ:
        raise CheckpointError(f"{source}: its weights do not fit the model its settings describe: "
                              + "; ".join(differ[:3]) + (f"; ... {len(differ) - 3} more" if len(differ) > 3 else ""))


#: Bounds on mel settings read from a checkpoint (a filter bank of n_mels x (n_fft/2 + 1) is allocated).
_MEL_BOUNDS = {"sample_rate": 768_000, "n_fft": 65_536, "hop_length": 65_536, "n_mels": 4_096}


def check_mel_bounds(mel: Any, source: str | Path) -> None:
    """Refuse mel settings from a checkpoint that no real front end uses and that would allocate without bound.

    Raises:
        CheckpointError: a setting that is not a positive number within `_MEL_BOUNDS`, or more mel
            bins than STFT bins.
    """
    if not isinstance(mel, Mapping):
        raise CheckpointError(f"{source}: its stored mel settings are not a mapping")
    for key, bound in _MEL_BOUNDS.items():
        value = mel.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= bound:
            raise CheckpointError(f"{source}: its stored mel setting {key} {value!r} is outside (0, {bound:,}]; "
                                  "refused before building anything")
    n_fft, n_mels = mel.get("n_fft"), mel.get("n_mels")
    if isinstance(n_fft, int) and isinstance(n_mels, int) and n_mels > n_fft // 2 + 1:
        raise CheckpointError(f"{source}: its stored mel settings ask for {n_mels} mel bins from {n_fft // 2 + 1} "
                              "STFT bins; refused before building anything")
