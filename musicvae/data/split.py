"""Train/validation split rules: by recording, stable under additions, seeded.

A file's side depends only on its path relative to the data folder and the seed, so adding
recordings never moves an existing one across the split (no silent leakage between runs), and
the rule can be re-applied from a checkpoint to recover the exact validation set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

#: Below this many recordings a split by file is too coarse to be meaningful.
MIN_FILES_FOR_FILE_SPLIT = 5


def file_hash_fraction(rel_path: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the path and the seed."""
    key = f"{seed}:{rel_path.replace(chr(92), '/')}".encode()
    digest = hashlib.sha256(key).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_validation_file(rel_path: str, seed: int, val_split: float) -> bool:
    """True when the recording at `rel_path` belongs to the validation split."""
    return file_hash_fraction(rel_path, seed) < val_split


def split_files(rel_paths: Sequence[str], val_split: float, seed: int) -> list[bool]:
    """Validation membership of each path (see `is_validation_file`)."""
    return [is_validation_file(p, seed, val_split) for p in rel_paths]


def segment_split_point(n_frames: int, val_split: float, frames: int) -> int:
    """Frame index where a recording's validation tail starts, for the fallback segment split.

    The tail, not interleaved windows, is held out so that no training crop overlaps a
    validation window. The tail is stretched to one whole segment when the recording has room
    for a segment on each side, so a short recording still contributes to validation.
    """
    cut = int(round(n_frames * (1.0 - val_split)))
    if n_frames - cut < frames and n_frames >= 2 * frames:
        cut = n_frames - frames
    return cut
