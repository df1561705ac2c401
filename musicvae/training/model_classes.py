"""The model classes a checkpoint or a stored config may name, as classes: how a checkpoint's module is rebuilt.

Apart from musicvae/training/hparams.py, which holds the names and the table of earlier layouts, so that
reading a checkpoint's settings never needs the modules themselves.
"""

from __future__ import annotations

from typing import Any, Mapping

from musicvae.errors import CheckpointError
from musicvae.training.hparams import MODEL_CLASSES, SHARPEN_CLASS, VAE_CLASS, canonical, current_layout
from musicvae.training.module import MusicVAEModule
from musicvae.training.sharpen import SharpenModule

_CLASSES = {VAE_CLASS: MusicVAEModule, SHARPEN_CLASS: SharpenModule}


def model_class(class_path: str) -> type:
    """The class of an allowed class path (imported here, never from a file's say)."""
    found = _CLASSES.get(canonical(class_path))
    if found is None:
        raise CheckpointError(f"model class {class_path!r} is not one of {MODEL_CLASSES}")
    return found


def model_spec(hparams: Mapping[str, Any], source: str = "the checkpoint") -> tuple[type, dict[str, Any]]:
    """The class and init arguments that rebuild a checkpoint's module, from its hyper-parameters of any version."""
    class_path, args, _ = current_layout(hparams, source)
    return model_class(class_path), args
