"""`torch.load(weights_only=True)` with one explanation per way a file can fail to load.

Every file musicvae reads with torch (checkpoints, a vocoder's weights) goes through here, so a
missing, truncated or foreign file, and one that would run code when unpickled, each get the same
one-line message naming the file; nothing in a refused file is ever executed.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from musicvae.errors import CheckpointError


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


def load_yaml(text: str, source: str = "config") -> Any:
    """YAML text as plain data (the safe loader: no Python objects)."""
    import yaml

    return yaml.safe_load(text)
