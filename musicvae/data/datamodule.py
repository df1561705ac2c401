"""MelDataModule: folders of mel arrays (or the built-in synthetic music) as Lightning data."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.trainer.states import TrainerFn
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from musicvae.audio.mel_settings import MelSettings, read_mel_sidecar
from musicvae.data.augment import AugmentSettings
from musicvae.data.device_crops import CropPlan, DeviceCrops, cache_bytes, check_fits
from musicvae.data.builtin import build_synthetic_collection, default_cache_dir, synthetic_folder
from musicvae.data.loader_workers import ignore_stop_signals, whole_item
from musicvae.data.mel_arrays import MelSource, window_starts
from musicvae.data.recordings import find_array_files, scan_recordings, update_audio_cache
from musicvae.errors import ConfigError, DataError
from musicvae.data.sampling import CropSampler
from musicvae.data.segments import Normalizer, RecordingWindows, SegmentDataset, segment_statistics
from musicvae.data.split import MIN_FILES_FOR_FILE_SPLIT, segment_split_point, split_files

# find_array_files is not used here: it was defined here before the scan of a data folder became a
# module of its own (musicvae/data/recordings.py), and still imports from here.


class MelDataModule(L.LightningDataModule):
    """Log-mel segments for training a MusicVAE, split by recording and z-scored.

    Args:
        data_dir: folder of music files (WAV, FLAC, OGG, Opus, MP3, AIFF) and/or `.npy`/`.pt`
            log-mel arrays of shape (n_mels, frames) or (1, n_mels, frames), searched
            recursively. None uses the built-in synthetic music.
        cache_dir: where derived data (audio log-mels, the synthetic collection) is written; defaults to
            `$MUSICVAE_CACHE` or `~/.cache/musicvae`, never inside `data_dir`.
        frames: segment length in frames (128 frames are about 1.5 s at the default settings).
        batch_size: examples per batch on each device.
        val_split: fraction of recordings held out for validation, in (0, 1).
        seed: seeds the split; the CLI links it to `seed_everything`.
        num_workers: DataLoader worker processes.
        mel: the mel settings of the arrays; None reads `data_dir/mel.json`, else the defaults.
        synthetic_pieces: number of synthetic recordings when `data_dir` is None.
        synthetic_seconds: length of each synthetic recording.
        silence_margin: a segment whose loudest value is within this many natural-log units of
            silence (6.9 = 30 dB) is skipped, because silent segments teach dark outputs.
        on_bad_file: "skip" reports each unusable file once and trains on the rest; "error"
            stops at the first one.
        prepare_workers: processes that decode audio into the cache (None: every CPU core).
        decode_timeout: seconds one audio file may take to decode into the cache; each file is
            decoded in a process of its own that is killed when it runs over, and the file is
            reported as unusable like any broken one (null: no limit). A 1-hour recording takes
            well under a minute on one core.
        augment: random gain, mel-bin shift and mixing of training segments (see
            musicvae/data/augment.py); None (the default) changes nothing. Validation, evaluation and
            the normalisation statistics always see the segments as they are.
        device_cache: keep the training log-mels on the training device and cut each batch's crops
            there (musicvae/data/device_crops.py): the loader then delivers only crop positions (and
            augmentation draws), not segments. Batches are the loader path's, bitwise on a CPU.
            Refused when the log-mels would not fit in the device's free memory.
    """

    def __init__(
        self,
        data_dir: Optional[str] = None,
        cache_dir: Optional[str] = None,
        frames: int = 128,
        batch_size: int = 32,
        val_split: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        mel: Optional[MelSettings] = None,
        synthetic_pieces: int = 48,
        synthetic_seconds: float = 20.0,
        silence_margin: float = 6.9,
        on_bad_file: Literal["skip", "error"] = "skip",
        prepare_workers: Optional[int] = None,
        augment: Optional[AugmentSettings] = None,
        device_cache: bool = False,
        decode_timeout: Optional[float] = 600.0,
    ) -> None:
        super().__init__()
        if decode_timeout is not None and decode_timeout <= 0:
            raise ConfigError(f"data.decode_timeout={decode_timeout} must be positive seconds (or null: no limit)")
        if not 0.0 < val_split < 1.0:
            raise ConfigError(f"data.val_split={val_split} must be between 0 and 1 (exclusive), e.g. 0.1")
        if frames < 1 or batch_size < 1 or num_workers < 0:
            raise ConfigError(
                f"data.frames={frames} and data.batch_size={batch_size} must be positive, "
                f"data.num_workers={num_workers} non-negative"
            )
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else None
        self.cache_dir = Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir()
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise DataError(f"data.data_dir={data_dir}: no such folder; point it at a folder of music files or mel arrays")
        self.mel = self._resolve_mel(mel)
        self.augment = self._resolve_augment(augment)
        self.frames, self.batch_size, self.val_split, self.seed = frames, batch_size, val_split, seed
        self.num_workers, self.silence_margin, self.on_bad_file = num_workers, silence_margin, on_bad_file
        self.synthetic_pieces, self.synthetic_seconds = synthetic_pieces, synthetic_seconds
        self.prepare_workers = prepare_workers
        self.decode_timeout = decode_timeout
        self.device_cache = device_cache
        self.device_crops: Optional[DeviceCrops] = None  # built by setup("fit") when device_cache
        self.normalizer = Normalizer()
        self.stats_restored = False
        self.trained_on: Optional[str] = None  # the checkpoint's training folder (None: built-in data)
        self.predict_reconstructions = False  # set by `musicvae predict --predict_reconstructions true`
        self._resume_position: Optional[dict[str, int]] = None
        self.split_mode: Optional[str] = None
        self.sources: list[MelSource] = []
        self.problems: list[str] = []  # one message per unusable file, for reports
        self.train_set: Optional[SegmentDataset] = None
        self.val_set: Optional[SegmentDataset] = None
        self.save_hyperparameters(ignore=["mel", "augment"])
        self.hparams["mel"] = self.mel.to_dict()  # plain values keep checkpoints weights_only-loadable
        self.hparams["augment"] = self.augment.to_dict()

    @property
    def n_mels(self) -> int:
        return self.mel.n_mels

    def _resolve_mel(self, mel: Optional[MelSettings]) -> MelSettings:
        declared = read_mel_sidecar(self.data_dir) if self.data_dir else None
        if declared and mel and declared != mel:
            diffs = ", ".join(f"{k}: mel.json {a!r} vs config {b!r}" for k, (a, b) in declared.differences(mel).items())
            raise ConfigError(
                f"{self.data_dir}/mel.json declares other mel settings than data.mel ({diffs}); "
                "drop data.mel to use the folder's settings, or make them agree"
            )
        return declared or mel or MelSettings()

    def _resolve_augment(self, augment: Optional[AugmentSettings | dict]) -> AugmentSettings:
        # A dict is what the hyper-parameters hold (load_from_checkpoint passes it back).
        augment = AugmentSettings.from_dict(augment) if isinstance(augment, dict) else augment or AugmentSettings()
        augment.check()
        if augment.freq_shift >= self.mel.n_mels:
            raise ConfigError(
                f"data.augment.freq_shift={augment.freq_shift} must be smaller than the number of mel bins "
                f"({self.mel.n_mels}); a few bins (1-3) is typical"
            )
        return augment

    @property
    def folder(self) -> Path:
        """The folder of arrays actually read."""
        if self.data_dir is not None:
            return self.data_dir
        return synthetic_folder(self.cache_dir, self.synthetic_pieces, self.synthetic_seconds, self.mel)

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node, so processes never race on the cache.
        if self.data_dir is None:
            build_synthetic_collection(self.cache_dir, self.synthetic_pieces, self.synthetic_seconds, self.mel)
        else:
            workers = self.prepare_workers if self.prepare_workers is not None else (os.cpu_count() or 1)
            update_audio_cache(self.data_dir, self.cache_dir, self.mel, workers, progress=True,
                               decode_timeout=self.decode_timeout)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in ("test", "predict"):
            return  # their loaders are built after the checkpoint's statistics are restored
        if self.train_set is None:
            self._setup_sets(stage)
        if self.device_cache and stage in (None, "fit") and self.device_crops is None:
            device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
            check_fits(cache_bytes(self.train_set), device)  # before reading anything
            self.device_crops = DeviceCrops(self.train_set, power=self.mel.power)

    def _setup_sets(self, stage: Optional[str]) -> None:
        self._ensure_sources()
        train_items, val_items = self._split(self.sources)
        paths = [s.path for s in self.sources]
        # Only the training set is augmented; the statistics (`_raw`) and validation see the data as it is.
        self.train_set = SegmentDataset(paths, train_items, self.frames, self.n_mels, self.normalizer, True,
                                        augment=self.augment, power=self.mel.power)
        self.val_set = SegmentDataset(paths, val_items, self.frames, self.n_mels, self.normalizer, False)
        if stage in (None, "fit") and len(self.train_set) < self.batch_size:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is larger than the training set "
                f"({len(self.train_set)} segments of {self.frames} frames): lower data.batch_size or add data"
            )
        if not self.stats_restored:
            self.normalizer.mean, self.normalizer.std = segment_statistics(self._raw(self.train_set))

    def _ensure_sources(self) -> None:
        if self.sources:
            return
        if self.data_dir is None:
            self.prepare_data()  # a no-op once built; builds on demand outside a Trainer (notebooks)
        self.sources, self.problems = scan_recordings(self.folder, self.data_dir, self.cache_dir, self.mel, self.frames,
                                                      self.silence_margin, self.on_bad_file, self.decode_timeout)

    def evaluation_set(self, split: Literal["val", "all"] = "val") -> SegmentDataset:
        """Deterministic windows for evaluation: the validation split, or every recording whole.

        "all" is for a folder the model never trained on (e.g. another album); it needs the
        normalisation statistics restored from a checkpoint (`load_state_dict`).
        """
        if split == "val":
            self.setup("validate")
            return self.val_set
        if not self.stats_restored:
            raise ConfigError("evaluation_set('all') needs the training statistics: call load_state_dict first")
        self._ensure_sources()
        items = [
            (index, start, 0, source.n_frames)
            for index, source in enumerate(self.sources)
            for start in window_starts(source, 0, source.n_frames, self.frames, self.silence_margin)
        ]
        if not items:
            raise DataError(f"{self.folder}: no non-silent segment of {self.frames} frames to evaluate")
        return SegmentDataset([s.path for s in self.sources], np.array(items, dtype=np.int64), self.frames,
                              self.n_mels, self.normalizer, False)

    def _raw(self, dataset: SegmentDataset) -> SegmentDataset:
        return SegmentDataset(dataset.paths, dataset.items, self.frames, self.n_mels, Normalizer(), False)

    def _split(self, sources: list[MelSource]) -> tuple[np.ndarray, np.ndarray]:
        is_val = split_files([s.rel for s in sources], self.val_split, self.seed)
        self.split_mode = "file"
        if len(sources) < MIN_FILES_FOR_FILE_SPLIT or all(is_val) or not any(is_val):
            warnings.warn(
                f"{len(sources)} recording(s) cannot be split by file with val_split={self.val_split}: "
                "holding out the last part of each recording instead (segment split); "
                "add recordings for a split by recording",
                stacklevel=2,
            )
            self.split_mode = "segment"
        train, val = [], []
        for index, source in enumerate(sources):
            if self.split_mode == "file":
                regions = [(0, source.n_frames, val if is_val[index] else train)]
            else:
                cut = segment_split_point(source.n_frames, self.val_split, self.frames)
                regions = [(0, cut, train), (cut, source.n_frames, val)]
            for lo, hi, target in regions:
                for start in window_starts(source, lo, hi, self.frames, self.silence_margin):
                    target.append((index, start, lo, hi))
        if not train or not val:
            side = "training" if not train else "validation"
            raise DataError(
                f"{self.folder}: the {side} split has no non-silent segment of {self.frames} frames; "
                "add recordings, shorten data.frames or change data.val_split"
            )
        return np.array(train, dtype=np.int64), np.array(val, dtype=np.int64)

    def _loader(self, dataset: Optional[SegmentDataset | CropPlan], shuffle: bool) -> StatefulDataLoader:
        """A resumable loader: its position goes into checkpoints (Lightning saves any loader
        with `state_dict`), and order and crops come from CropSampler, so a run resumed mid-epoch
        sees the same batches as an uninterrupted one."""
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        kwargs = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        replicas = dict(num_replicas=kwargs.get("num_replicas", 1), rank=kwargs.get("rank", 0))
        if shuffle:
            sampler = CropSampler(dataset, seed=self.seed, **replicas)
            if self._resume_position is not None:
                sampler.load_state_dict(self._resume_position)
                self._resume_position = None
        elif kwargs:
            # Lightning's default DistributedSampler pads by repeating examples, which would count
            # them twice in the validation metrics; this one gives each example to exactly one rank.
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False, **replicas)
        else:
            sampler = None
        return StatefulDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator),
            # Worker seeds come from this generator, not the global one, so creating a loader
            # never shifts the random stream of the training steps (dropout, reparameterisation).
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=ignore_stop_signals,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        if self.device_cache:
            self.setup("fit")  # a no-op after Lightning's setup; builds the cache outside a Trainer
            return self._loader(self.device_crops.plan, shuffle=True)
        return self._loader(self.train_set, shuffle=True)

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self.device_crops = None  # frees the device's copy for what follows (testing, evaluation)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this with the batch on the training device: a crop plan becomes its crops.
        if self.device_crops is not None and DeviceCrops.is_plan(batch):
            return self.device_crops.batch(batch)
        return batch

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> StatefulDataLoader:
        # Called after Lightning restored the checkpoint's statistics (load_state_dict).
        return self._loader(self.evaluation_set(self.test_split()), shuffle=False)

    def test_split(self) -> Literal["val", "all"]:
        """What `musicvae test` scores: the validation recordings of the folder the checkpoint was
        trained on, or every recording of another folder (music the model never saw)."""
        if not self.stats_restored or self.trained_on == (str(self.data_dir) if self.data_dir else None):
            return "val"
        return "all"

    def predict_dataloader(self) -> DataLoader:
        """Every usable recording of the folder, one batch each (RecordingWindows)."""
        if not self.stats_restored:
            raise ConfigError("predict needs a trained model's statistics: give --ckpt_path")
        self._ensure_sources()
        extra = {"frames": self.frames, "mel": self.mel.to_dict(), "mean": self.normalizer.mean,
                 "std": self.normalizer.std, "chunk": self.batch_size, "reconstructions": self.predict_reconstructions}
        dataset = RecordingWindows(self.sources, self.frames, self.n_mels, self.normalizer,
                                   self.mel.hop_length / self.mel.sample_rate, extra)
        kwargs = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        # Each recording to exactly one rank, none repeated to even out the ranks (a repeat would
        # write its file twice, from two processes).
        sampler = UnrepeatedDistributedSampler(dataset, shuffle=False, **kwargs) if kwargs else None
        return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=whole_item, worker_init_fn=ignore_stop_signals)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild the data exactly: features, split rule, statistics."""
        return {
            "mel": self.mel.to_dict(),
            "frames": self.frames,
            "mean": self.normalizer.mean,
            "std": self.normalizer.std,
            "val_split": self.val_split,
            "seed": self.seed,
            "split_mode": self.split_mode,
            "data_dir": str(self.data_dir) if self.data_dir else None,
            "silence_margin": self.silence_margin,
            "train_position": self._train_position(),
        }

    def _train_position(self) -> Optional[dict[str, int]]:
        """Where the training epoch stands: its number and the examples this rank has consumed.

        Counted from Lightning's finished batches, not from the sampler, which the loader's
        workers have already read ahead of the training step.
        """
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return None
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "yielded": done * self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The statistics of the run being resumed win over freshly computed ones, so the model
        # keeps seeing inputs on the scale it was trained on.
        self.normalizer.mean = float(state["mean"])
        self.normalizer.std = float(state["std"])
        self.stats_restored = True
        self.trained_on = state.get("data_dir")
        # Applied to the next training sampler. Lightning 2.6 restores the loader's own state
        # only mid-epoch: from a checkpoint of an epoch's last step it would replay that epoch's
        # order (the iterator is built before set_epoch), so the position travels here as well.
        self._resume_position = state.get("train_position")
