"""Checks that refuse a configuration that cannot work before anything is prepared or written.

Everything here only looks: folders are stat'ed, never created, and data files are read for
their headers (array shapes, audio lengths), never decoded, so a folder of thousands of
recordings is checked in seconds. The data module's own checks after preparation stay the
final word; these catch the mistakes that would otherwise surface only after minutes of work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import soundfile as sf
import torch

from musicvae.data.cache import find_audio_files
from musicvae.data.builtin import synthetic_piece_name
from musicvae.audio.mel import AUDIO_SUFFIXES, audio_to_log_mel
from musicvae.data.listing import no_recordings
from musicvae.errors import ConfigError, DataError
from musicvae.io.storage import free_bytes, payload_bytes, size_text
from musicvae.io.outputs import check_creatable_dir  # noqa: F401 - the rule lives there; the CLI imports it from here
from musicvae.data.segments import ARRAY_SUFFIXES, MelSource, scan_mel_file, summarise_mel, window_starts
from musicvae.data.split import MIN_FILES_FOR_FILE_SPLIT, segment_split_point, split_files

#: Audio formats whose length libsndfile may estimate from the header (compressed streams):
#: their bound gets a margin, so an estimate that is a little short never refuses a real run.
_ESTIMATED_LENGTH = (".ogg", ".oga", ".opus", ".mp3")
_LENGTH_MARGIN = 1.05  # relative, on top of one second


def logger_save_dirs(logger: Any) -> list[tuple[str, str]]:
    """(setting, folder) of each configured logger that writes under `init_args.save_dir`.

    Args:
        logger: the parsed `trainer.logger` value: None/bool, one `{class_path, init_args}`
            namespace or dict, or a list of them.

    Returns:
        `("--trainer.logger.init_args.save_dir", folder)` per logger with a save_dir (an index
        in the setting for a list of loggers); empty when there is none.
    """
    if logger is None or isinstance(logger, bool):
        return []
    many = isinstance(logger, (list, tuple))
    found = []
    for index, spec in enumerate(logger if many else [logger]):
        spec = spec.as_dict() if hasattr(spec, "as_dict") else spec
        if not isinstance(spec, dict):
            continue  # an already built logger object: nothing to read from the config
        save_dir = (spec.get("init_args") or {}).get("save_dir")
        if save_dir:
            setting = f"--trainer.logger[{index}].init_args.save_dir" if many else "--trainer.logger.init_args.save_dir"
            found.append((setting, str(save_dir)))
    return found


def windows(n_frames: int, frames: int) -> int:
    """Non-overlapping windows of `frames` in `n_frames` (as `segments.window_starts`, before
    silent ones are dropped)."""
    return n_frames // frames if n_frames >= frames else 0


def training_windows_bound(
    files: Sequence[tuple[str, int]], frames: int, val_split: float, seed: int
) -> int:
    """At most how many training windows the data module's split gives these files.

    The data module splits by file when at least MIN_FILES_FOR_FILE_SPLIT usable files land
    on both sides, else it keeps the first (1 - val_split) of each file for training. Which
    files turn out usable is known only after decoding, so where a split by file is possible
    the larger of the two counts is returned: either rule can apply to any subset of the files,
    and each count only grows with more files.

    Args:
        files: (path relative to the data folder, frame count) per candidate recording.
        frames: segment length.
        val_split: fraction held out for validation.
        seed: the split seed.
    """
    long_enough = [(rel, n) for rel, n in files if n >= frames]
    by_segment = sum(windows(segment_split_point(n, val_split, frames), frames) for _, n in long_enough)
    if len(long_enough) < MIN_FILES_FOR_FILE_SPLIT:
        return by_segment
    is_val = split_files([rel for rel, _ in long_enough], val_split, seed)
    if all(is_val) or not any(is_val):
        return by_segment
    by_file = sum(windows(n, frames) for (_, n), val in zip(long_enough, is_val) if not val)
    return max(by_file, by_segment)


def synthetic_piece_frames(seconds: float, sample_rate: int, hop_length: int) -> int:
    """Frames of one synthetic piece's log-mel: `round(seconds * rate)` samples, centred STFT."""
    return 1 + round(seconds * sample_rate) // hop_length


def array_frames(path: Path, n_mels: int) -> Optional[int]:
    """Frames of a `.npy` log-mel array from its header (memory-mapped, nothing read).

    Returns:
        The frame count; 0 when the data module would reject the file (unreadable, wrong shape
        or dtype); None for a `.pt` file whose shape cannot be read without loading it.
    """
    try:
        if path.suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            shape, floating = array.shape, np.issubdtype(array.dtype, np.floating)
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:
                return None  # e.g. the legacy (non-zip) format, which cannot be memory-mapped
            if not isinstance(obj, torch.Tensor):
                return 0
            shape, floating = tuple(obj.shape), True  # the data module converts any tensor to float
    except Exception:  # numpy raises many types for unreadable or corrupt files
        return 0
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2 or shape[0] != n_mels or not floating:
        return 0
    return int(shape[1])


def audio_frames(path: Path, sample_rate: int, hop_length: int) -> int:
    """At most how many log-mel frames an audio file gives, from its header (0 if unreadable)."""
    try:
        info = sf.info(str(path))
    except Exception:  # libsndfile raises several types; the data module reports the file
        return 0
    if info.frames <= 0 or info.samplerate <= 0:
        return 0
    samples = float(info.frames)
    if path.suffix.lower() in _ESTIMATED_LENGTH:
        samples = samples * _LENGTH_MARGIN + info.samplerate
    resampled = math.ceil(samples * sample_rate / info.samplerate)
    return 1 + resampled // hop_length


def recording_files(datamodule: Any) -> list[tuple[str, Path]]:
    """(path relative to the data folder, file) of every candidate recording, listed, never read:
    the built-in synthetic pieces by name (their folder may not exist yet), or a data folder's
    arrays (outside a cache_dir inside it) and audio files. Sorted by the relative path.

    Args:
        datamodule: a `MelDataModule` (only its settings are read; nothing is built).
    """
    from musicvae.data.datamodule import find_array_files  # here: musicvae.data.datamodule imports Lightning

    if datamodule.data_dir is None:
        folder = datamodule.folder
        names = [synthetic_piece_name(index) for index in range(int(datamodule.synthetic_pieces))]
        return [(name, folder / name) for name in names]
    data_dir: Path = datamodule.data_dir
    cache_dir = Path(datamodule.cache_dir).expanduser().resolve()
    cache_inside = data_dir in cache_dir.parents
    files = [(path.relative_to(data_dir).as_posix(), path) for path in find_array_files(data_dir)
             if not (cache_inside and cache_dir in path.parents)]
    rels, _ = find_audio_files(data_dir)
    return sorted(files + [(rel, data_dir / rel) for rel in rels])


def _folder_files(datamodule: Any) -> Optional[list[tuple[str, int]]]:
    """(relative path, frame bound) of every candidate recording of a data folder, or None."""
    mel = datamodule.mel
    files: list[tuple[str, int]] = []
    for rel, path in recording_files(datamodule):
        if path.suffix in ARRAY_SUFFIXES:
            n = array_frames(path, mel.n_mels)
            if n is None:
                return None
        else:
            n = audio_frames(path, mel.sample_rate, mel.hop_length)
        files.append((rel, n))
    return files


def _synthetic_files(datamodule: Any) -> list[tuple[str, int]]:
    mel = datamodule.mel
    n = synthetic_piece_frames(datamodule.synthetic_seconds, mel.sample_rate, mel.hop_length)
    return [(synthetic_piece_name(index), n) for index in range(int(datamodule.synthetic_pieces))]


def train_segments_upper_bound(datamodule: Any) -> Optional[int]:
    """At most how many training segments `datamodule` will have, without preparing any data.

    The built-in synthetic music is counted from its settings; a data folder from the headers
    of its arrays (memory-mapped `.npy`, `.pt` where memory-mappable) and audio files
    (`soundfile.info`). Silent windows, which the data module drops, are counted, and so are
    files it will reject whose headers look fine: the result is an upper bound, never a guess
    that could be too low. Files whose header cannot be read count as 0 (the data module
    reports them).

    Args:
        datamodule: a `MelDataModule` (only its settings are read; nothing is built).

    Returns:
        The bound, or None when it cannot be known cheaply (a `.pt` file that cannot be
        memory-mapped).
    """
    files = _candidates(datamodule)
    return None if files is None else training_windows_bound(files, datamodule.frames, datamodule.val_split,
                                                              datamodule.seed)


def _candidates(datamodule: Any) -> Optional[list[tuple[str, int]]]:
    return _synthetic_files(datamodule) if datamodule.data_dir is None else _folder_files(datamodule)


def check_batch_size(datamodule: Any) -> Optional[int]:
    """Refuse a batch larger than the training set can ever be, before any data is prepared.

    When a data folder cannot fill a batch, the reason may be the folder rather than the batch:
    then the folder is refused instead, with what is wrong with it (no recording at all, none as
    long as a segment, or only silent ones). Silence needs the recordings read: only the few
    whose headers promise a segment are (fewer than a batch of segments, so seconds of audio),
    in memory, with the data module's own rule; nothing is written.

    Args:
        datamodule: a `MelDataModule`.

    Returns:
        The bound on training segments (None when unknown; then the data module's own check
        after preparation decides).

    Raises:
        DataError: a data folder without a usable recording, named, with the reason.
        ConfigError: `data.batch_size` exceeds the bound, with the bound and what to change.
    """
    files = _candidates(datamodule)
    if files is None:
        return None
    bound = training_windows_bound(files, datamodule.frames, datamodule.val_split, datamodule.seed)
    if bound < datamodule.batch_size:
        if datamodule.data_dir is None:
            where = (f"the built-in synthetic music: data.synthetic_pieces={datamodule.synthetic_pieces} "
                     f"of data.synthetic_seconds={datamodule.synthetic_seconds:g}")
        else:
            check_folder_has_music(datamodule, files)
            where = str(datamodule.data_dir)
        raise ConfigError(
            f"data.batch_size={datamodule.batch_size} is larger than the training set (at most {bound} "
            f"segments of {datamodule.frames} frames in {where}): lower data.batch_size or add data"
        )
    return bound


def check_folder_has_music(datamodule: Any, files: Sequence[tuple[str, int]]) -> None:
    """Refuse a data folder none of whose recordings has a segment the data module would train on.

    Args:
        datamodule: a `MelDataModule` with a data folder.
        files: (relative path, frame bound) of its candidate recordings (`_folder_files`).

    Raises:
        DataError: naming the folder: no recording found, none as long as a segment, or every
            one that is silent (or unreadable), with the counts.
    """
    folder, frames = datamodule.data_dir, datamodule.frames
    if not files:
        raise no_recordings(folder, ARRAY_SUFFIXES + AUDIO_SUFFIXES)
    longest = max(n for _, n in files)
    if longest < frames:
        raise DataError(f"{folder}: none of its {len(files)} recording(s) is as long as one segment of {frames} "
                        f"frames (the longest has {longest}): lower data.frames or add longer recordings")
    silent, unusable = 0, 0
    for rel, n in files:
        if n < frames:
            continue
        try:
            source = _summary(datamodule, rel)
        except DataError as err:
            silent += ": silent" in str(err)  # the audio reader's "silent (every sample is zero ...)"
            unusable += ": silent" not in str(err)
            continue
        if window_starts(source, 0, source.n_frames, frames, datamodule.silence_margin):
            return  # real music, too little of it: the batch size is the problem
        silent += 1
    short = sum(n < frames for _, n in files)
    db = 10 * datamodule.silence_margin / math.log(10)
    if not unusable and not short:
        raise DataError(f"{folder}: every recording is silent ({silent} file(s) in which no segment of {frames} frames "
                        f"rises {db:.0f} dB above the file's floor): there is nothing to train on. Add music, or lower "
                        "data.silence_margin for quiet material")
    raise DataError(f"{folder}: no recording has a segment to train on ({silent} silent, {unusable} unreadable, "
                    f"{short} shorter than {frames} frames); `musicvae prepare {folder}` names each file and why")


def _summary(datamodule: Any, rel: str) -> MelSource:
    """The MelSource the data module would make of one recording, in memory (nothing cached)."""
    path, mel = datamodule.data_dir / rel, datamodule.mel
    if path.suffix in ARRAY_SUFFIXES:
        return scan_mel_file(path, rel, mel.n_mels, mel.log_floor_value)
    # The block-wise front end, as the cache reads it: memory does not grow with the recording's length.
    return summarise_mel(audio_to_log_mel(path, mel), path, rel, mel.log_floor_value)


def check_linear_path(model: Any, bound: Optional[int]) -> None:
    """Refuse a PCA-initialised linear path that the training set cannot fill, before any data is prepared.

    PCA with `latent_dim` components needs at least that many training segments; `bound` (from
    `check_batch_size`) is an upper bound, so this only refuses what must fail. The module checks
    the real count again when training starts.

    Raises:
        ConfigError: naming model.latent_dim and the bound.
    """
    hp = getattr(model, "hparams", {})
    if bound is None or not hp.get("linear_path") or bound >= hp.get("latent_dim", 0):
        return
    raise ConfigError(
        f"model.linear_path needs at least model.latent_dim={hp['latent_dim']} training segments for its PCA, "
        f"and the training set has at most {bound}: lower model.latent_dim, add data, or set model.linear_path false"
    )


def check_mel_settings(mel: Any) -> None:
    """Refuse invalid ``--data.mel.*`` values before the data module is built.

    Built inside jsonargparse, a MelSettings that refuses its values surfaces as a traceback that
    lists every Union subtype; built here first, the same problems read as one line.
    """
    if mel is None:
        return
    from musicvae.audio.mel import MelSettings  # audio pulls in torchaudio; only needed when mel is set

    values = mel.as_dict() if hasattr(mel, "as_dict") else dict(mel)
    try:
        MelSettings(**values)
    except ConfigError as err:
        raise ConfigError(f"--data.mel: {err}") from None


def room_warning(module: torch.nn.Module, folder: Path) -> Optional[str]:
    """A warning when the checkpoint folder's disk holds fewer than three checkpoints: best and last,
    and the temporary file each is written to before it replaces the old one (None: room enough)."""
    weights = payload_bytes(module.state_dict())
    params = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    ema = bool(getattr(module, "hparams", {}).get("ema_decay"))
    size = weights + 2 * params + (weights if ema else 0)  # + Adam's 2 moments, + EMA's average
    free = free_bytes(folder)
    if free is None or free >= 3 * size:
        return None
    return (f"--checkpoint_dir {folder}: {size_text(free)} free, room for {free // max(size, 1)} checkpoint(s) of about "
            f"{size_text(size)}; best.ckpt and last.ckpt need 3 (each is written beside the old one first). Free space "
            "or choose another folder.")


def check_run_folders(subcommand: str, config: Any) -> None:
    """The folders a run will write into (checkpoints, logs, the cache), checked, never created, before
    anything is built: one line naming the setting when one cannot be made or written."""
    if subcommand == "fit":
        check_creatable_dir(config.checkpoint_dir, "--checkpoint_dir")
    for setting, folder in logger_save_dirs(config.trainer.get("logger")):
        check_creatable_dir(folder, setting)
    if config.data.get("cache_dir"):
        check_creatable_dir(config.data.cache_dir, "--data.cache_dir")
