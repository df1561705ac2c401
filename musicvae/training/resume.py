"""Resuming with `--ckpt_path`: what the command takes from the checkpoint, and what it checks first.

The rules, in the order a resumed command meets them:
1. The checkpoint is read weights-only, and its stored run config is filtered to data
   (`stored_config.config_as_data`): that filtered config is the base, and the user's `--config`
   files and flags override it. (LightningCLI would instead merge the checkpoint's model
   hyper-parameters over the command line, silently ignoring e.g. a new `--model.lr`.)
2. A `+=` in the resumed command appends to the list the command itself builds, never to the
   stored list a second time (`restart_appended_lists`); file loggers continue their stored
   version only where the user's (or the default) folder is the stored one (`repin_loggers`).
3. Before anything is built: the settings the weights cannot follow are named, and the model the
   settings describe is compared with the weights on the meta device (`check_before_build`).
4. Before training: a folder holding another run's checkpoints is refused
   (`refuse_another_runs_folder`), and every changed setting is named (`report_changes`).
5. A new learning rate goes into the restored optimizer (callbacks.ApplyResumedLearningRate).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import yaml
from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from musicvae.errors import CheckpointError, ConfigError, MusicVAEError
from musicvae.io.safe_load import safe_yaml_load
from musicvae.training.checkpoints import (DATA_STATE_KEY, config_changes, config_from_hyperparameters, dump_yaml,
                                           foreign_checkpoints, load_checkpoint, run_config, unresumable_changes)
from musicvae.training.model_classes import model_class
from musicvae.training.stored_config import (NOT_COMPARED, TakenConfig, check_mel_bounds, check_model_shapes,
                                             config_as_data, pinned_version)

#: Which loss weights each monitorable metric depends on (for the resume warning).
MONITOR_DEPENDS = {
    "val/loss": ("loss", "beta", "spectral_weight", "output_reg_weight", "freq_bands"),
    "val/recon": ("loss", "freq_bands"),
    "val/kl": (),
    "val/kl_nats": (),
    "val/mse": (),
    "val/spectral": ("loss",),
    "val/output_reg": ("loss",),
    # Diagnostics (musicvae/metrics.py) where lower is better.
    "val/weighted_mse": ("freq_bands",),
    "val/spectral_convergence": (),
    "val/lsd_db": (),
    "val/range_frac_outside": (),
    "val/featureless_frac": (),
    # Realism and detail (Fréchet distances and the worst band ratio's log distance from 1): what the
    # adversarial stage (configs/sharp.yaml) picks best.ckpt by.
    "val/realism_frames": (),
    "val/realism_differences": (),
    "val/band_ratio_error": (),
}


def check_monitor(monitor: str, loss: str) -> str:
    """`--monitor`, refused unless validation logs it."""
    if monitor not in MONITOR_DEPENDS:
        raise ConfigError(f"--monitor {monitor!r} is not a logged validation metric; use one of {list(MONITOR_DEPENDS)}")
    if monitor in ("val/spectral", "val/output_reg") and loss != "spectral":
        raise ConfigError(f"--monitor {monitor} is only logged with --model.loss spectral")
    return monitor


def flag_value(args: list[str], flag: str = "--ckpt_path") -> Optional[str]:
    """The last value of `flag` on the command line (`--flag VALUE` or `--flag=VALUE`), or None."""
    found = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(flag + "="):
            found = arg.split("=", 1)[1]
    return found


def flatten_keys(config: Any, prefix: str = "") -> list[str]:
    """{"trainer": {"logger": {...}}} -> ["trainer", "trainer.logger", "trainer.logger.class_path", ...]."""
    if not isinstance(config, dict):
        return []
    keys = []
    for key, value in config.items():
        keys += [f"{prefix}{key}", *flatten_keys(value, f"{prefix}{key}.")]
    return keys


def user_set_keys(args: list[str]) -> set[str]:
    """The dotted settings the user's own flags and `--config` files set (`trainer.callbacks`, ...).

    A file that cannot be read is skipped here: the parser reads it next and names the problem.
    """
    keys: set[str] = set()
    for i, arg in enumerate(args):
        match = re.match(r"--([\w.]+?)\+?(=|$)", arg) or re.match(r"-(c)(=|$)", arg)
        if not match:
            continue
        if match.group(1) not in ("config", "c"):
            keys.add(match.group(1))
            continue
        value = arg.split("=", 1)[1] if "=" in arg else args[i + 1] if i + 1 < len(args) else None
        try:
            text = Path(value).read_text() if value and Path(value).is_file() else value
            keys.update(flatten_keys(safe_yaml_load(text or "", str(value))))
        except (OSError, MusicVAEError, yaml.YAMLError):
            continue
    return keys


def load_resume(args: list[str]) -> tuple[dict[str, Any], TakenConfig, list[str]]:
    """The checkpoint of `--ckpt_path`, what its stored config gives, and `args` with that config first.

    Args:
        args: `[subcommand, *the user's arguments]`, with `--ckpt_path FILE` among them.

    Returns:
        `(checkpoint, taken, [subcommand, "--config", TAKEN_YAML, *the user's arguments])`.

    Raises:
        CheckpointError: an unreadable or unsafe file, or a stored config that names what a checkpoint
            may not (nothing imported, nothing built).
    """
    path = flag_value(args, "--ckpt_path")
    ckpt = load_checkpoint(path)
    stored = run_config(ckpt, path) or config_from_hyperparameters(ckpt)
    taken = config_as_data(stored, path, args[0], user_set_keys(args[1:]))
    return ckpt, taken, [args[0], "--config", dump_yaml(taken.config), *args[1:]]


def appended_keys(args: list[str]) -> list[str]:
    """The settings a command appends to with `--KEY+=VALUE` (or `--KEY+ VALUE`), in order of first use."""
    keys: list[str] = []
    for arg in args:
        match = re.match(r"--([\w.]+)\+(=|$)", arg)
        if match and match.group(1) not in keys:
            keys.append(match.group(1))
    return keys


def restart_appended_lists(args: list[str], parser: Any) -> list[str]:
    """A resumed command's `+=` appends to the list the command itself builds, not to the stored one.

    `args` is `[subcommand, "--config", STORED_RUN_CONFIG, *the user's arguments]` (load_resume).
    Appending to the stored list would make "the same command again, with --ckpt_path" add every
    callback, logger, plugin, band or channel a second time (Lightning then refuses two stateful
    callbacks of one type). So each list a `+=` touches restarts from its default right after
    the stored config: the user's own config files and flags then build it exactly as the first
    run did, and the result replaces the stored list.
    """
    keys = appended_keys(args[3:])
    if not keys:
        return args
    defaults = parser.get_defaults()
    restarts = []
    for key in keys:
        if key not in defaults:
            continue  # not a setting: the parser's own message names it
        value = defaults.get(key)
        plain = value.as_dict() if isinstance(value, Namespace) else value
        if isinstance(plain, list):
            plain = [v.as_dict() if isinstance(v, Namespace) else v for v in plain]
        restarts.append(f"--{key}={json.dumps(plain)}")
    return [*args[:3], *restarts, *args[3:]]


def repin_loggers(loggers: Any, stored: Any) -> list[str]:
    """Continue the stored run's pinned logger versions on the same loggers of this run, in place.

    Loggers pair up by class, in order; a pair is the same logger when this run's folder (the user's,
    or the default) and name resolve to the stored ones. Only then is the stored version taken, and
    only a plain one (a number or one folder name): the stored folder itself never chooses a place.

    Returns:
        The stored folders not continued, as "save_dir/name", for a line telling the user how to.
    """
    missed = []
    new = loggers if isinstance(loggers, list) else [loggers]
    old = [e for e in (stored if isinstance(stored, list) else [stored]) if isinstance(e, dict)]
    for entry in new:
        if not isinstance(entry, Namespace) or not isinstance(entry.get("init_args"), Namespace):
            continue
        match = next((o for o in old if o.get("class_path") == entry.class_path), None)
        if match is None:
            continue
        old.remove(match)
        pinned, args = match.get("init_args") or {}, entry.init_args
        version = pinned_version(match)
        if version is None or args.get("version") is not None or not args.get("save_dir"):
            continue
        if str(Path(args.save_dir).expanduser().resolve()) == pinned.get("save_dir") and args.get("name") == pinned.get("name"):
            args.save_dir, args.version = pinned["save_dir"], version
        else:
            missed.append(f"{pinned.get('save_dir')}/{pinned.get('name')}")
    for folder in missed:
        rank_zero_info(f"musicvae: logging to a new version, not the resumed run's {folder} (a checkpoint chooses no "
                       "folder; --trainer.logger.init_args.save_dir names it to continue its curves)")
    return missed


def resume_command(command: list[str], last: Path) -> str:
    """The user's own command line with `--ckpt_path LAST` in place of any it had: the same command
    resumes the run (a `+=` in it appends to the command's own list: restart_appended_lists)."""
    args, skip = [], False
    for arg in command[1:]:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            args.append(arg)
    if not args or args[0].startswith("-"):  # `python scripts/train.py --config X` means fit; `musicvae` needs it said
        args.insert(0, "fit")
    program = command[0] if command else "musicvae"
    return f"{program} {shlex.join([*args, '--ckpt_path', str(last)])}"


def refuse_unresumable(ckpt: dict[str, Any], hparams: dict[str, Any], mel: Mapping[str, Any], subcommand: str) -> None:
    """Name every setting the checkpoint's weights cannot follow (`checkpoints.unresumable_changes`)."""
    problems = unresumable_changes(ckpt, hparams, dict(mel))
    if problems:
        raise CheckpointError(
            f"cannot {'resume' if subcommand == 'fit' else 'use the checkpoint'}: its weights do not fit the new "
            f"settings: {'; '.join(problems)}. Keep these as they were, or start a fresh run without --ckpt_path.")


def check_before_build(ckpt: dict[str, Any], path: str, subcommand: str, config: Namespace, taken: Optional[TakenConfig],
                       used: Callable[[str], Any]) -> None:
    """Before anything is built from a checkpoint's settings: what was taken from it, in words; the
    settings its weights cannot follow; and the model the settings describe, built on the meta device
    and compared with its weights.

    Args:
        ckpt, path: the checkpoint and its file.
        subcommand: fit, validate, test or predict.
        config: the parsed config of the subcommand (`model`, `data`).
        taken: what `load_resume` took from the stored config.
        used: the run's value of a dotted setting (a dropped stored value is named only where it differs).
    """
    if taken is not None and taken.inputs:
        rank_zero_info(f"musicvae: from the checkpoint's stored config: {', '.join(taken.inputs)}")
    dropped = []
    for key, value in taken.not_taken if taken else []:
        try:
            same = "[" not in key and used(key) == value
        except (KeyError, AttributeError, TypeError):
            same = False
        if not same:
            dropped.append(f"{key} {value!r}")
    if dropped:
        rank_zero_info("musicvae: not taken from the checkpoint (a checkpoint is data; give them on the command line "
                       f"if you want them): {', '.join(dropped)}")
    stored_mel = (ckpt.get(DATA_STATE_KEY) or {}).get("mel")
    if stored_mel is not None:
        check_mel_bounds(stored_mel, path)
    mel = config.data.mel.as_dict() if isinstance(config.data.mel, Namespace) else config.data.mel
    hparams = {**config.model.init_args.as_dict(), "compile": False}
    hparams["n_mels"] = int((mel or stored_mel or {}).get("n_mels", 128))
    # Named changes first (the clearest message), then the shapes the settings give, still on no memory.
    refuse_unresumable(ckpt, {"_class_path": config.model.class_path, **hparams}, mel or stored_mel or {}, subcommand)
    check_model_shapes(model_class(config.model.class_path), hparams, ckpt["state_dict"], path)


def refuse_another_runs_folder(folder: Path, ckpt: dict[str, Any], path: str, overwrite: bool) -> None:
    """A resume into a folder that holds another run's checkpoints is refused, like a fresh run."""
    foreign = foreign_checkpoints(folder, ckpt, path)
    if foreign and not overwrite:
        raise ConfigError(
            f"{folder} holds {', '.join(foreign)} of another run than {path}: resuming there would replace them. "
            "Choose another --checkpoint_dir (by default a resume writes beside the checkpoint it resumes), or pass "
            "--overwrite true to replace them.")


def report_changes(ckpt: dict[str, Any], now: dict[str, Any], defaults: dict[str, Any], monitor: str) -> None:
    """One line naming every setting that differs from the stored run, and a warning when a change alters
    the scale of the metric that picks best.ckpt."""
    old = run_config(ckpt)
    if not old:
        return
    changes = {key: change for key, change in config_changes(old, now, defaults).items()
               if not key.startswith(NOT_COMPARED)}
    if changes:
        listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
        rank_zero_info(f"musicvae: resuming with changed settings: {listed}")
    touched = [k for k in changes if k.split(".", 1)[-1] in MONITOR_DEPENDS.get(monitor, ()) and k.startswith("model.")]
    if touched or "monitor" in changes:
        rank_zero_warn(
            f"{', '.join(touched) or 'monitor'} changed on resume while best.ckpt is chosen by {monitor}: "
            "best-score comparisons across the change mix two scales (consider --monitor val/mse)."
        )
