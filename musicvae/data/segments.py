"""Validated recordings -> normalised fixed-length segments: the z-score, and the datasets that serve them.

The arrays stay on disk (memory-mapped `.npy`, see musicvae/data/mel_arrays.py); a dataset holds
only the (file, window) rows it serves, and reopens a file that changed since the scan.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from musicvae.data.augment import AugmentSettings, augment_raw, draw_augmentation
from musicvae.data.listing import link_problem
from musicvae.data.mel_arrays import (
    ARRAY_SUFFIXES, MelSource, load_mel_array, read_failure, scan_mel_file, summarise_mel, window_starts,
)
from musicvae.errors import DataError, printable
from musicvae.data.sampling import DRAW_RANGE

# ARRAY_SUFFIXES, scan_mel_file, summarise_mel and window_starts are not used here: they were
# defined here before the array files became a module of their own, and still import from here.


class Normalizer:
    """z-score with training-split statistics: (x - mean) / std, and back.

    The one place this rule lives: the data sets, the device crops, generation, the TensorBoard
    media and predict all call it (the exported TorchScript program carries the same two lines,
    checked against this class by tests/inference/test_export.py).
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        self.mean = float(mean)
        self.std = float(std)
        self._on: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Tensors on x's device, not Python floats: CUDA divides by a host scalar as a
        # multiplication by its reciprocal, which is not the CPU's correctly rounded division, and
        # the device crops must match the loader path bitwise. On the CPU both forms are equal.
        key = (like.device, like.dtype, self.mean, self.std)
        if key not in self._on:
            self._on = {key: (torch.tensor(self.mean, dtype=like.dtype, device=like.device),
                              torch.tensor(self.std, dtype=like.dtype, device=like.device))}
        return self._on[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._statistics(x)
        return (x - mean) / std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._statistics(x)
        return x * std + mean

    def __getstate__(self) -> dict:
        return {"mean": self.mean, "std": self.std, "_on": {}}  # loader workers rebuild their own


class SegmentDataset(Dataset):
    """Fixed-length `(1, n_mels, frames)` segments of mel arrays, normalised.

    Args:
        paths: array files, indexed by `items[:, 0]`.
        items: (N, 4) int64 rows of (file index, window start, region start, region end).
        frames: segment length.
        n_mels: mel bins (checked when the file was scanned).
        normalizer: shared with the data module, so statistics restored from a checkpoint apply.
        random_crop: training jitters each window by up to half its length inside its region;
            validation takes the windows as they are, so its loss is comparable across epochs.
        augment: random gain, mel shift and mixing (musicvae/data/augment.py), for the training set
            only; None or settings that are all off read segments as they are.
        power: the spectrogram exponent of the arrays (MelSettings.power), the units of the gains.
    """

    def __init__(
        self,
        paths: list[str],
        items: np.ndarray,
        frames: int,
        n_mels: int,
        normalizer: Normalizer,
        random_crop: bool,
        augment: Optional[AugmentSettings] = None,
        power: float = 2.0,
    ) -> None:
        self.paths = paths
        self.items = np.asarray(items, dtype=np.int64).reshape(-1, 4)
        self.frames = frames
        self.n_mels = n_mels
        self.normalizer = normalizer
        self.random_crop = random_crop
        self.augment = augment if augment is not None and augment.check().active else None
        self.power = power
        self._open: dict[int, tuple[tuple[int, ...], np.ndarray]] = {}  # file index -> (stat stamp, array)
        self._unreadable = _unreadable_flags(paths)

    def __len__(self) -> int:
        return len(self.items)

    def fixed_windows(self, rows: Optional[np.ndarray] = None) -> "SegmentDataset":
        """The same segments (or those at `rows`) with fixed crops and no augmentation: what a
        linear code is fitted on and what the quality benchmark compares on, the same on every run."""
        items = self.items if rows is None else self.items[rows]
        return SegmentDataset(self.paths, items, self.frames, self.n_mels, self.normalizer, False, power=self.power)

    def __getstate__(self) -> dict:
        # Workers re-open (re-map) arrays themselves instead of receiving copies.
        state = self.__dict__.copy()
        state["_open"] = {}
        return state

    def array(self, file_index: int) -> np.ndarray:
        """The file's array, opened again whenever the file changed on disk since it was opened.

        Each call stats the file (about a microsecond), so a file deleted, truncated or replaced
        during training is noticed before it is read: reading a memory-mapped file beyond a
        truncation would kill the process with SIGBUS, which no `except` can catch.

        Raises:
            DataError: naming the file and why it cannot be read.
        """
        path = self.paths[file_index]
        try:
            st = os.stat(path)
        except FileNotFoundError as err:
            raise DataError(f"{path}: {link_problem(path, err) or 'file not found: deleted or moved'}") from err
        except OSError as err:
            raise DataError(f"{path}: cannot read the array ({read_failure(Path(path), err)})") from err
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        opened = self._open.get(file_index)
        if opened is None or opened[0] != stamp:
            self._open.pop(file_index, None)
            opened = self._open[file_index] = (stamp, load_mel_array(Path(path), self.n_mels))
        return opened[1]

    def unreadable_files(self) -> list[str]:
        """Files found unreadable while this dataset (or one over the same files, in any DataLoader
        worker) was read: their segments are being replaced by segments of other files."""
        return [self.paths[i] for i in np.flatnonzero(self._unreadable.numpy())]

    def crop_start(self, index: int, draw: Optional[int] = None) -> int:
        """Start frame of item `index`: its window, jittered by `draw` when cropping randomly.

        `draw` is a random integer from the sampler (see musicvae/data/sampling.py), so crops repeat
        exactly on resume; without one the global torch generator is used.
        """
        _, start, lo, hi = (int(v) for v in self.items[index])
        if not self.random_crop:
            return start
        jitter = self.frames // 2
        first, last = max(lo, start - jitter), min(hi - self.frames, start + jitter)
        if draw is None:
            draw = int(torch.randint(0, DRAW_RANGE, (1,)))
        return first + draw % (last - first + 1)

    def __getitem__(self, item: Union[int, tuple[int, int]]) -> torch.Tensor:
        """Item `index`'s segment; if its file became unreadable after the scan (deleted, truncated,
        replaced by something unusable), the segment of the next item of a readable file instead.
        With `augment`, the segment is then augmented as a function of (index, draw).

        A file found unreadable is named in one warning and skipped for the rest of the run, by
        every DataLoader worker (the flags live in shared memory). Raises DataError only when no
        file of the dataset can be read any more.
        """
        index, draw = item if isinstance(item, tuple) else (item, None)  # CropSampler yields (index, draw)
        if self.augment is not None and draw is None:
            # What crop_start does without a draw (one value of the global torch generator), drawn
            # here once so that the crop and the augmentation come from the same value.
            draw = int(torch.randint(0, DRAW_RANGE, (1,)))
        raw = torch.from_numpy(self._read(index, draw))
        if self.augment is not None:
            raw = self._augmented(raw, index, draw)
        return self.normalizer(raw.unsqueeze(0))  # (n_mels, F) -> (1, n_mels, F)

    def _read(self, index: int, draw: Optional[int]) -> np.ndarray:
        """(n_mels, frames) raw segment of item `index`, or its stand-in when its file is unreadable."""
        segment = self._segment(index, draw)
        return segment if segment is not None else self._stand_in(index, draw)

    def _augmented(self, raw: torch.Tensor, index: int, draw: int) -> torch.Tensor:
        """`raw` augmented as (index, draw) decides; the segment mixed in is read like any item
        (crop from its own draw, a stand-in if its file broke), so it is just as reproducible."""
        aug = draw_augmentation(self.augment, draw, index, len(self.items))
        other = torch.from_numpy(self._read(*aug.mix_with)) if aug.mix_with is not None else None
        return augment_raw(raw, aug, self.power, other)

    def _segment(self, index: int, draw: Optional[int]) -> Optional[np.ndarray]:
        """(n_mels, frames) float32 segment of item `index`, or None when its file is unreadable."""
        file_index = int(self.items[index, 0])
        if self._unreadable.numpy()[file_index]:
            return None
        start = self.crop_start(index, draw)
        try:
            segment = np.array(self.array(file_index)[:, start : start + self.frames], dtype=np.float32)
            path = self.paths[file_index]
            if segment.shape[1] != self.frames:
                raise DataError(f"{path}: changed since the scan: frames {start}-{start + self.frames} are gone")
            if not np.isfinite(segment).all():
                raise DataError(f"{path}: changed since the scan: contains NaN or Inf in frames {start}-{start + self.frames}")
        except (OSError, ValueError) as err:  # DataError is a ValueError
            self._give_up(file_index, err)
            return None
        return segment

    def _stand_in(self, index: int, draw: Optional[int]) -> np.ndarray:
        """The segment of the first item after `index` (wrapping around) whose file is readable:
        the same stand-in in every process and on every resume, given the same unreadable files."""
        n = len(self.items)
        order = (index + 1 + np.arange(n - 1)) % n
        for candidate in order[self._unreadable.numpy()[self.items[order, 0]] == 0]:
            segment = self._segment(int(candidate), draw)
            if segment is not None:
                return segment
        files = len(np.unique(self.items[:, 0]))
        raise DataError(f"none of the {files} files of this dataset can be read any more (see the warnings above)")

    def _give_up(self, file_index: int, err: Exception) -> None:
        flags = self._unreadable.numpy()
        if flags[file_index]:
            return  # another worker found it first and said so
        flags[file_index] = 1
        path = Path(self.paths[file_index])
        reason = str(err).removeprefix(f"{printable(path)}: ") if isinstance(err, DataError) else read_failure(path, err)
        if reason.startswith("cannot read the array (") and reason.endswith(")"):
            reason = reason[len("cannot read the array (") : -1]
        worker = get_worker_info()
        where = f" [DataLoader worker {worker.id}]" if worker is not None else ""
        warnings.warn(
            f"{path}: became unreadable during training ({reason}); skipped for the rest of this run, "
            f"segments of other files take its place{where}",
            stacklevel=3,
        )


def _unreadable_flags(paths: list[str]) -> torch.Tensor:
    """One flag per file, in shared memory, so DataLoader workers (forked or spawned) and the main
    process see which files were found unreadable; datasets over the same file list (the training
    and validation splits) share one set, so each file is reported once."""
    key = tuple(paths)
    flags = _FLAGS.get(key)
    if flags is None:
        flags = torch.zeros(len(paths), dtype=torch.uint8)
        try:
            flags.share_memory_()
        except RuntimeError:  # no shared memory here: each process keeps its own flags
            pass
        _FLAGS[key] = flags
    return flags


_FLAGS: "weakref.WeakValueDictionary[tuple[str, ...], torch.Tensor]" = weakref.WeakValueDictionary()


def segment_starts(total: int, frames: int, hop: int) -> list[int]:
    """Starts of `frames`-long windows every `hop` frames covering [0, total), the last one ending at `total`.

    The one tiling of a whole recording: `musicvae predict` and `musicvae.load(...).encode` use it
    with hop = frames, `generate reconstruct` with half a window. The last window is aligned to the
    end instead of padded past it, so every window the model sees is real music and the tail is
    encoded too; it overlaps its neighbour by more than `frames - hop` (a normalised overlap-add
    absorbs that). `total <= frames` gives [0] (the caller pads).
    """
    if total <= frames:
        return [0]
    starts = list(range(0, total - frames + 1, hop))
    if starts[-1] != total - frames:
        starts.append(total - frames)
    return starts


class RecordingWindows(Dataset):
    """One item per recording: all its windows, for `musicvae predict` (latent codes per recording).

    Windows tile the recording as `segment_starts(n_frames, frames, frames)` does: one every
    `frames` frames from the first, silent ones included, so that window i < W - 1 starts at frame
    i * frames, and a last one that ends at the recording's end when a tail shorter than a window
    is left (it overlaps the window before). With DataLoader(batch_size=None) each batch is one
    whole recording, so under DDP a recording goes to exactly one process.
    """

    def __init__(self, sources: list[MelSource], frames: int, n_mels: int, normalizer: Normalizer,
                 hop_seconds: float, extra: Optional[dict] = None) -> None:
        self.sources = sources
        self.frames = frames
        self.normalizer = normalizer
        self.hop_seconds = hop_seconds  # seconds per frame, for the window start times
        self.extra = dict(extra or {})  # the same in every item (mel settings, statistics)
        # Only for SegmentDataset.array(): reopens a file that changed, names one that broke.
        self._files = SegmentDataset([s.path for s in sources], np.zeros((0, 4)), frames, n_mels, normalizer, False)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict:
        source = self.sources[index]
        array = self._files.array(index)  # (n_mels, T), memory-mapped
        starts = np.array(segment_starts(source.n_frames, self.frames, self.frames), dtype=np.int64)
        windows = np.stack([np.asarray(array[:, s:s + self.frames], dtype=np.float32) for s in starts])
        return {
            "windows": self.normalizer(torch.from_numpy(windows)).unsqueeze(1),  # (W, n_mels, F) -> (W, 1, n_mels, F)
            "source": source.rel,
            "start_frames": torch.from_numpy(starts),
            "start_seconds": torch.from_numpy(starts * self.hop_seconds),  # float64
            "n_frames": source.n_frames,
            **self.extra,
        }


def segment_statistics(dataset: SegmentDataset) -> tuple[float, float]:
    """Mean and standard deviation over the dataset's windows (un-normalised, no crop jitter)."""
    total, total_sq, count = 0.0, 0.0, 0
    for file_index, start, _, _ in dataset.items:
        block = np.asarray(dataset.array(int(file_index))[:, start : start + dataset.frames], dtype=np.float64)
        total += block.sum()
        total_sq += np.square(block).sum()
        count += block.size
    if count == 0:
        raise DataError("no training segments to compute normalisation statistics from")
    mean = float(total / count)  # plain floats: numpy scalars would break weights_only loading
    std = math.sqrt(max(float(total_sq / count) - mean * mean, 0.0))
    # A constant training set would divide by zero; 1.0 keeps it finite and the data unchanged in scale.
    return mean, std if std > 1e-6 else 1.0
