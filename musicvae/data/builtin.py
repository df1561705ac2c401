"""The built-in default data: synthetic music rendered once into a cache folder of mel arrays.

Rendering to ordinary `.npy` files (plus a `mel.json` sidecar) means the default data goes
through exactly the code path of a user's own folder of arrays: scanning, split, memory-mapping.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from musicvae.io.atomic import write_atomic
from musicvae.audio.mel import LogMel
from musicvae.audio.mel_settings import MelSettings, write_mel_sidecar
from musicvae.audio.synth import render_piece

#: Bump when the generator's output changes, so stale caches are not reused.
GENERATOR_VERSION = 1
_COMPLETE = ".complete"


def default_cache_dir() -> Path:
    """`$MUSICVAE_CACHE`, else `$XDG_CACHE_HOME/musicvae`, else `~/.cache/musicvae`.

    Outside any music folder, which may be read-only.
    """
    if os.environ.get("MUSICVAE_CACHE"):
        return Path(os.environ["MUSICVAE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "musicvae"


def synthetic_folder(cache_dir: Path, n_pieces: int, seconds: float, mel: MelSettings) -> Path:
    """Where the synthetic collection of these settings lives inside `cache_dir`."""
    key = json.dumps(
        {"v": GENERATOR_VERSION, "n": n_pieces, "s": seconds, "mel": mel.to_dict()}, sort_keys=True
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir) / "synthetic" / f"{n_pieces}x{seconds:g}s-{digest}"


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write `path` via a temporary file in the same folder, so a kill never leaves half a file."""
    write_atomic(path, lambda handle: np.save(handle, array, allow_pickle=False))


def synthetic_piece_name(index: int) -> str:
    """File name of synthetic piece `index`: also its key in the split by recording."""
    return f"piece_{index:03d}.npy"


def build_synthetic_collection(
    cache_dir: Path, n_pieces: int = 48, seconds: float = 20.0, mel: Optional[MelSettings] = None
) -> Path:
    """Render the synthetic pieces as log-mel `.npy` files (once) and return their folder.

    Pieces already present are kept, so an interrupted build resumes where it stopped.
    """
    mel = mel or MelSettings()
    folder = synthetic_folder(cache_dir, n_pieces, seconds, mel)
    if (folder / _COMPLETE).exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    to_mel = LogMel(mel)
    for index in range(n_pieces):
        target = folder / synthetic_piece_name(index)
        if target.exists():
            continue
        wave = render_piece(index, seconds=seconds, sample_rate=mel.sample_rate, seed=0)
        with torch.no_grad():
            spec = to_mel(torch.from_numpy(wave)).numpy().astype(np.float32)  # (samples,) -> (n_mels, T)
        save_npy_atomic(target, spec)
    write_mel_sidecar(folder, mel)
    (folder / _COMPLETE).touch()
    return folder
