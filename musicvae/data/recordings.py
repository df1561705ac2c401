"""A data folder -> its usable recordings (MelSource), each unusable file named once with the reason.

Arrays are read where they are; audio files through their cached log-mels (musicvae/data/cache.py),
keyed by the audio file's own relative path so the split by recording sees the music folder.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Literal, Optional

from musicvae.audio.decode import AUDIO_SUFFIXES
from musicvae.audio.mel_settings import MelSettings
from musicvae.data.cache import CacheReport, build_audio_cache, find_audio_files
from musicvae.data.listing import list_folder, no_recordings
from musicvae.data.mel_arrays import ARRAY_SUFFIXES, MelSource, scan_mel_file, window_starts
from musicvae.errors import DataError, printable


def find_array_files(folder: Path) -> list[Path]:
    """Mel array files under `folder`, recursively, through links to folders (musicvae.data.listing),
    in a stable order (dangling and looping links included, for the reader to report)."""
    return [Path(folder) / rel for rel in list_folder(folder).files if os.path.splitext(rel)[1] in ARRAY_SUFFIXES]


def update_audio_cache(data_dir: Optional[Path], cache_dir: Path, mel: MelSettings, workers: int,
                       progress: bool = False, decode_timeout: Optional[float] = None) -> Optional[CacheReport]:
    """Bring the log-mel cache of the folder's audio files up to date (None: no audio there).

    With workers=0 on a warm cache this only compares sizes and modification times.

    Args:
        data_dir: the data folder; None (the built-in music) has no audio files.
        cache_dir, mel, workers, progress, decode_timeout: as build_audio_cache takes them.
    """
    if data_dir is None:
        return None
    rels, odd_dirs = find_audio_files(data_dir)
    if not rels and not odd_dirs:
        return None
    return build_audio_cache(data_dir, cache_dir, mel, workers=workers, progress=progress,
                             decode_timeout=decode_timeout)


def _candidates(folder: Path, data_dir: Optional[Path], cache_dir: Path, mel: MelSettings,
                decode_timeout: Optional[float]) -> tuple[list[tuple[str, Path]], list[str]]:
    """(relative path, array file) of every recording, and messages about unusable files."""
    # A cache_dir placed inside data_dir holds derived arrays, not more recordings.
    cache_inside = data_dir is not None and data_dir in cache_dir.parents
    arrays = [
        (path.relative_to(folder).as_posix(), path)
        for path in find_array_files(folder)
        if not (cache_inside and cache_dir in path.parents)
    ]
    listing = list_folder(folder)
    # Folders named like array files (`take_3.npy/`): reported, since find_array_files skips them.
    named = [folder / rel for rel in listing.dirs if os.path.splitext(rel)[1] in ARRAY_SUFFIXES]
    messages = [f"{path}: is a directory, not an array file" for path in named
                if not (cache_inside and (path == cache_dir or cache_dir in path.parents))]
    report = update_audio_cache(data_dir, cache_dir, mel, workers=0, decode_timeout=decode_timeout)
    if report is not None:
        arrays += [(entry.rel, Path(entry.array)) for entry in report.entries]
        messages += [f"{path}: {reason}" for path, reason in report.problems]
    messages += [m for m in (f"{printable(path)}: {reason}" for path, reason in listing.loops) if m not in messages]
    return sorted(arrays), messages


def scan_recordings(
    folder: Path,
    data_dir: Optional[Path],
    cache_dir: Path,
    mel: MelSettings,
    frames: int,
    silence_margin: float,
    on_bad_file: Literal["skip", "error"],
    decode_timeout: Optional[float],
) -> tuple[list[MelSource], list[str]]:
    """The recordings of `folder` that can be trained on, validated and summarised.

    Unusable files and recordings shorter than one segment are skipped, and named in a warning
    (with `on_bad_file="skip"`).

    Args:
        folder: the folder of arrays actually read (MelDataModule.folder).
        data_dir: the data folder (None: the built-in music), whose audio files are read through
            the cache under `cache_dir`.
        mel, decode_timeout: the cache's mel settings and time limit per file (see MelDataModule).
        frames, silence_margin: a recording needs one segment of `frames` frames louder than
            `silence_margin` above its floor.
        on_bad_file: "skip" reports each unusable file; "error" raises at the first one.

    Returns:
        The usable recordings, by path, and one "path: reason" message per file left out.

    Raises:
        DataError: the first unusable file (`on_bad_file="error"`), or none of the files is usable.
    """
    candidates, problems = _candidates(folder, data_dir, cache_dir, mel, decode_timeout)
    problems.sort()  # "path: reason", so by path
    if problems and on_bad_file == "error":
        raise DataError(problems[0])
    if not candidates and not problems:
        raise no_recordings(folder, ARRAY_SUFFIXES + AUDIO_SUFFIXES)
    sources, too_short = [], []
    for rel, path in candidates:
        try:
            source = scan_mel_file(path, rel, mel.n_mels, mel.log_floor_value)
            if source.n_frames >= frames:
                _check_not_silent(source, folder, frames, silence_margin)
        except DataError as err:
            if on_bad_file == "error":
                raise
            problems.append(str(err))
            continue
        if source.n_frames < frames:
            too_short.append(rel)
            continue
        sources.append(source)
    problems.sort()  # "path: reason", so by path: one list whatever stage found each problem
    if too_short:
        # Every name, however many: a file left out of a run is one its owner must be able to find.
        warnings.warn(
            f"skipped {len(too_short)} file(s) shorter than one segment ({frames} frames): "
            + ", ".join(printable(rel) for rel in too_short),
            stacklevel=2,
        )
    if problems:
        warnings.warn(
            f"skipped {len(problems)} unusable file(s):\n" + "\n".join(f"  {printable(msg)}" for msg in problems),
            stacklevel=2,
        )
    if not sources:
        silent = sum(": silent" in msg for msg in problems)
        if silent and silent == len(problems) and not too_short:
            raise DataError(f"{folder}: every recording is silent ({silent} file(s); see the warnings "
                            "above): there is nothing to train on")
        raise DataError(f"{folder}: none of the files is usable (see the warnings above)")
    return sources, problems + [f"{rel}: shorter than one segment" for rel in too_short]


def _check_not_silent(source: MelSource, folder: Path, frames: int, silence_margin: float) -> None:
    """Refuse a recording none of whose windows would be trained on (all are silent), naming
    the file in the data folder (an audio file, not its cached array).

    Raises:
        DataError: the file is silent at `silence_margin`.
    """
    if window_starts(source, 0, source.n_frames, frames, silence_margin):
        return
    db = 10 * silence_margin / math.log(10)
    raise DataError(
        f"{folder / source.rel}: silent: no segment of {frames} frames rises more than "
        f"{db:.0f} dB above the file's floor (lower data.silence_margin to train on quiet material)"
    )
