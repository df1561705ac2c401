"""The parser every `musicvae` subcommand other than fit/validate/test/predict is built on.

jsonargparse, like LightningCLI: each command takes `--config FILE` (YAML of its flags, composable,
the last one winning), `--print_config` (prints a complete one), and typed, dotted flags. Mel
settings are `--data.mel.*` in every command, as in training, so one preset YAML serves fit,
prepare, evaluate and generate.
"""

from __future__ import annotations

import sys
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import argparse

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

from musicvae.audio.mel_settings import MelSettings
from musicvae.errors import ConfigError, MusicVAEError, OversizedYAMLError
from musicvae.io.safe_load import limit_config_yaml, safe_yaml_load
from musicvae.io.storage import STORAGE_EXIT, StorageError

MEL_KEY = "data.mel"


class RawDescription(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the description and epilog printed as written."""


def command_parser(name: str, description: str, config: bool = True, **kwargs: Any) -> ArgumentParser:
    """A parser for `musicvae NAME` with `--config` and `--print_config`; no prefix matching, so a
    mistyped flag fails instead of silently meaning another.

    Args:
        config: False for a command whose `--config` already names something else (benchmark-quality's
            training recipe); it then has no config file of its own.
    """
    limit_config_yaml()  # every --config file and YAML value this process parses from now on
    parser = ArgumentParser(prog=f"musicvae {name}", description=description, allow_abbrev=False,
                            exit_on_error=True, **kwargs)
    if config:
        parser.add_argument("--config", action=ActionConfigFile,
                            help="YAML file of these flags (later flags and files override it)")
    return parser


def add_mel_arguments(parser: ArgumentParser) -> None:
    """`--data.mel.sample_rate`, `--data.mel.n_mels`, ...: MelSettings' fields, as training spells them."""
    parser.add_class_arguments(MelSettings, MEL_KEY, fail_untyped=True)


def mel_settings(args: Any) -> MelSettings:
    """The MelSettings of parsed `args`.

    Raises:
        ConfigError: an invalid combination, named (`--data.mel: invalid mel settings: n_mels=0 ...`).
    """
    try:
        return MelSettings(**dict(args[MEL_KEY]))
    except ValueError as err:
        raise ConfigError(f"--{MEL_KEY}: {err}") from None


def parse_command(parser: ArgumentParser, argv: Optional[Sequence[str]] = None,
                  renames: Optional[Mapping[str, str]] = None) -> Any:
    """Parse `argv` (default: sys.argv[1:]) after renaming old flags and trimming config files.

    A `--config` file may hold more than this command takes (a training recipe: `model`,
    `trainer`, `data.batch_size`, ...): only the keys this command knows are read from it, so
    one preset serves fit, prepare, evaluate and generate. Unknown flags on the command line
    still fail.
    """
    argv = renamed_flags(list(sys.argv[1:] if argv is None else argv), renames or {}, parser.prog)
    try:
        return _parse(parser, argv)
    except OversizedYAMLError as err:  # one line, as the parser's own errors exit: status 2
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def _parse(parser: ArgumentParser, argv: list[str]) -> Any:
    if not any(isinstance(action, ActionConfigFile) for action in parser._actions):
        return parser.parse_args(argv)
    known = set(_flatten(parser.get_defaults().as_dict()))
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--config" or arg.startswith("--config="):
            source = arg.partition("=")[2] if "=" in arg else next(args, "")
            out += ["--config", _known_part(source, known)]
        else:
            out.append(arg)
    return parser.parse_args(out)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _known_part(source: str, known: set[str]) -> str:
    """A config file (path) reduced to the keys in `known`, as YAML text; anything else as given,
    for jsonargparse to read or to refuse with its own message."""
    import yaml

    path = Path(source).expanduser()
    if not path.is_file():
        return source
    try:
        tree = safe_yaml_load(path.read_text(), str(path))
    except (OSError, yaml.YAMLError):
        return source
    if not isinstance(tree, Mapping):
        return source
    nested: dict[str, Any] = {}
    for key, value in _flatten(tree).items():
        if key in known:
            *parents, leaf = key.split(".")
            node = nested
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return yaml.safe_dump(nested) if nested else "{}"


def report_error(prog: str, err: MusicVAEError) -> int:
    """Print `err` as the command's one line on stderr; returns the exit status: STORAGE_EXIT (4)
    for a write the machine refused, 2 for anything the user can change."""
    sys.stderr.write(f"{prog}: error: {err}\n")
    return STORAGE_EXIT if isinstance(err, StorageError) else 2


def renamed_flags(argv: Sequence[str], renames: Mapping[str, str], prog: str) -> list[str]:
    """`argv` with flags of the old scripts replaced by today's spelling, one note per rename.

    Args:
        argv: the command line after the subcommand.
        renames: old flag (e.g. "--n_mels") -> new flag ("--data.mel.n_mels"); "--flag=value" too.
        prog: the command, for the notes.
    """
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if flag in renames:
            sys.stderr.write(f"{prog}: note: {flag} is now {renames[flag]}\n")
            arg = renames[flag] + eq + value
        out.append(arg)
    return out


def mel_renames(names: Optional[Sequence[str]] = None) -> dict[str, str]:
    """The old scripts' bare mel flags (`--n_mels`) -> `--data.mel.n_mels`."""
    import dataclasses

    fields = names or [f.name for f in dataclasses.fields(MelSettings)]
    return {f"--{name}": f"--{MEL_KEY}.{name}" for name in fields}
