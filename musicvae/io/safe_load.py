"""Reading files that may be hostile: torch pickles and YAML.

`load_weights_only` is `torch.load(weights_only=True)` with one explanation per way a file can fail
to load. Every file musicvae reads with torch (checkpoints, a vocoder's weights) goes through it,
so a missing, truncated or foreign file, and one that would run code when unpickled, each get the
same one-line message naming the file; nothing in a refused file is ever executed.

`safe_yaml_load` reads YAML (the run config stored in a checkpoint, a vocoder's config.yaml), and
`limit_config_yaml` puts the same limits on jsonargparse, which reads every `--config` file. PyYAML
builds an alias (`*a`) as a second reference to the anchored object, so a "billion laughs" file of
a few hundred bytes loads in microseconds; every consumer that walks, copies, compares or prints
the result then expands it (jsonargparse ran out of memory; docs/reliability.md has the figures). The limits are checked
on the parser's event stream, before any object is built, in memory that does not grow with the
expansion.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from musicvae.errors import CheckpointError, OversizedYAMLError

#: Most YAML nodes (mappings, sequences and scalars, keys included, each alias counted as everything
#: it stands for) a config may expand to. A complete run config has 274 (`musicvae fit --config
#: configs/improved.yaml --print_config`); a billion-laughs file of 600 bytes has 10^9.
MAX_YAML_NODES = 100_000
#: Deepest nesting of mappings and sequences a config may have (a complete run config nests 4
#: levels); code that walks the result recursively would otherwise exceed Python's recursion limit.
MAX_YAML_DEPTH = 100


def load_weights_only(path: str | os.PathLike, what: str = "checkpoint", hint: str = "",
                      map_location: str = "cpu", mmap: bool = False) -> Any:
    """The object saved in `path`, unpickling tensors and plain values only.

    Args:
        path: the file.
        what: what the file should be, in the messages ("checkpoint", "weights file").
        hint: what the user can do, appended to every message.
        map_location: where tensors go.
        mmap: map the file's tensors instead of reading them (zip-format files only), to read the
            plain values beside them cheaply.

    Raises:
        CheckpointError: missing, truncated or corrupt, or holding Python objects that would run
            code (refused, nothing executed).
    """
    path, tail = Path(path), f"; {hint}" if hint else ""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {what}{tail}")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on a bare pickle: the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # weights_only refuses globals (code) with a message naming them; anything else is garbage.
        # torch's advice to retry with weights_only=False is left out on purpose.
        if "global" not in str(err).lower():
            raise CheckpointError(f"{path}: not a readable {what} (truncated or not a {what}: "
                                  f"{_last_line(err)}){tail}") from None
        raise CheckpointError(f"{path}: refused: the file contains Python objects that would run code when loaded "
                              f"(only tensors and plain values are accepted): {_unsupported(err)}{tail}") from None
    except Exception as err:  # noqa: BLE001 - on arbitrary bytes the weights-only unpickler raises
        # EOFError (empty file), IndexError, KeyError, ... besides RuntimeError and BadZipFile.
        raise CheckpointError(f"{path}: not a readable {what} (truncated or not a {what}: "
                              f"{first_line(err)}){tail}") from None


def first_line(err: BaseException) -> str:
    """`Type: first sentence of the message`, or the type alone when the message is empty."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0].split(". ")[0][:200] if lines else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _last_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and "documentation" not in line]
    return lines[-1][:300] if lines else type(err).__name__


def _unsupported(err: Exception) -> str:
    for line in str(err).splitlines():
        if "global" in line.lower():
            return line.strip().split(". Please")[0][:300]
    return _last_line(err)


def check_yaml_size(text: str, source: str) -> None:
    """Refuse YAML `text` that expands past MAX_YAML_NODES or nests past MAX_YAML_DEPTH.

    Counts the nodes of the parser's events, an alias as the size of its anchor, stopping as soon
    as the limit is passed; nothing is built. A syntax error is left to the loader, which reports
    it with its position.

    Args:
        text: the YAML.
        source: what to call it in the message (a file name, "the run config stored in CKPT").

    Raises:
        OversizedYAMLError: naming `source`, the limit and the anchor that reached it.
    """
    import yaml
    from yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, ScalarEvent

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    sizes: dict[str, int] = {}  # anchor -> nodes it stands for
    open_: list[tuple[Optional[str], int]] = []  # (anchor, nodes before it) of each open collection
    nodes = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, AliasEvent):
                if any(anchor == event.anchor for anchor, _ in open_):
                    raise OversizedYAMLError(f"{source}: refused: the alias *{event.anchor} refers to a collection "
                                             "that contains it (a structure without end)")
                nodes += sizes.get(event.anchor, 1)
            elif isinstance(event, ScalarEvent):
                nodes += 1
                if event.anchor is not None:
                    sizes[event.anchor] = 1
            elif isinstance(event, CollectionStartEvent):
                open_.append((event.anchor, nodes))
                nodes += 1
                if len(open_) > MAX_YAML_DEPTH:
                    raise OversizedYAMLError(f"{source}: refused: nested deeper than {MAX_YAML_DEPTH} levels")
            elif isinstance(event, CollectionEndEvent):
                anchor, before = open_.pop()
                if anchor is not None:
                    sizes[anchor] = nodes - before
            if nodes > MAX_YAML_NODES:
                where = f" (at alias *{event.anchor})" if isinstance(event, AliasEvent) else ""
                raise OversizedYAMLError(
                    f"{source}: refused: it expands past {MAX_YAML_NODES} YAML nodes once its aliases (*name) are "
                    f"followed{where}; a complete musicvae config has about 300. Write the values out instead")
    except yaml.YAMLError:
        return  # the loader says what and where
    finally:
        loader.dispose()


def safe_yaml_load(text: str, source: str) -> Any:
    """`yaml.safe_load(text)` of YAML that may be hostile (the run config a checkpoint stores, a
    vocoder's config.yaml), refused past the limits of `check_yaml_size` before anything is built.

    Raises:
        OversizedYAMLError: an alias bomb, a self-referencing alias or nesting too deep, naming `source`.
        yaml.YAMLError: not YAML.
    """
    import yaml

    check_yaml_size(text, source)
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def limit_config_yaml() -> None:
    """Make jsonargparse refuse `--config` files and values past the limits of `check_yaml_size`.

    Process-wide (jsonargparse keeps one loader per mode), so commands call it, never library
    code; calling it again changes nothing. jsonargparse's own YAML loader still does the loading.
    """
    import yaml
    from jsonargparse import get_loader, set_loader

    current = get_loader("yaml")
    if getattr(current, "limited", False):
        return
    set_loader("yaml", _limited(current), (yaml.YAMLError,))


def _limited(load: Callable[[str], Any]) -> Callable[..., Any]:
    def limited_load(text: str, path: str = "") -> Any:
        # jsonargparse passes `path` for a config file, nothing for a flag's value or YAML text.
        check_yaml_size(text, str(path) if path else "a --config text or flag value")
        return load(text)

    limited_load.limited = True  # type: ignore[attr-defined]
    return limited_load
