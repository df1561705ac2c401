"""Training crops cut on the device from a copy of the training log-mels kept there (`--data.device_cache`).

Why: the loader path (musicvae/data/segments.py) reads, crops, augments and normalises every example
in Python, in the loader's workers, and copies each batch host->device (B x n_mels x frames
floats: 2 MiB a step at the defaults). When the training log-mels fit in accelerator memory,
they can stay there: the loader then only delivers each example's crop plan (its start column;
with augmentation also its drawn gains, mel shift and mix partner), so one integer per example
crosses PCIe per step (six numbers with augmentation), and one gather per batch cuts every crop
on the device: when the cache fits in GPU memory it stays there and the crops are cut there.

Exactness: the plans come from the same CropSampler `(index, draw)` pairs, through the same
`SegmentDataset.crop_start` and `augment.draw_augmentation` as the loader path, so order, crops
and augmentation draws are the same, and resuming restores the same sampler state. The tensor
operations then give the loader path's values bitwise on a CPU (tests/test_device_data.py). On
a GPU the crops, gains, mel shifts and normalisation should be exact too (copies, and float32
adds and true divisions, which are correctly rounded everywhere; not yet checked on one), and
a mix's `logaddexp` may differ from the CPU's in the last bit.

What the device path does not do: files changed or deleted after setup are not noticed (the
copy was taken at setup), so the loader path's stand-in segments for broken files never apply.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from musicvae.data.augment import AugmentSettings, db_to_log, draw_augmentation, mix_power
from musicvae.errors import ConfigError
from musicvae.data.segments import Normalizer, SegmentDataset

#: Share of the accelerator's free memory the cache may take: the model, its optimizer state,
#: activations and cuDNN workspaces need the rest (the default model at batch 32 needs ~1-2 GiB).
DEVICE_SHARE = 0.75

#: The key that marks a batch as a crop plan (see `DeviceCrops.is_plan`).
PLAN_KEY = "position"


def training_spans(items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The frames each file's training items can crop from: (file indices, first frame, end frame).

    A crop of an item stays inside its region [lo, hi) (SegmentDataset.crop_start), so only the
    union of a file's training regions is kept: under a segment split, not the held-out tail.
    """
    files = np.unique(items[:, 0])
    lo = np.array([items[items[:, 0] == f, 2].min() for f in files], dtype=np.int64)
    hi = np.array([items[items[:, 0] == f, 3].max() for f in files], dtype=np.int64)
    return files, lo, hi


def cache_bytes(dataset: SegmentDataset) -> int:
    """Bytes of the float32 training log-mels `load_training_frames` would build."""
    _, lo, hi = training_spans(dataset.items)
    return int((hi - lo).sum()) * dataset.n_mels * 4


def check_fits(nbytes: int, device: torch.device, share: float = DEVICE_SHARE) -> None:
    """Refuse a cache that would not fit on `device`; a CPU (host memory) is always allowed.

    Raises:
        ConfigError: naming data.device_cache, the cache's size and the device's free memory.
    """
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    if nbytes > share * free:
        gib = 2**30
        raise ConfigError(
            f"data.device_cache=true: the training log-mels need {nbytes / gib:.2f} GiB on {device}, more than "
            f"{share:.0%} of its {free / gib:.2f} GiB free (of {total / gib:.2f} GiB; the rest is for the model, "
            "its optimizer and activations); set data.device_cache false to stream them from pinned host memory"
        )


def load_training_frames(dataset: SegmentDataset) -> tuple[torch.Tensor, np.ndarray]:
    """The raw (un-normalised) float32 log-mels of the training spans, concatenated along time.

    Raw, not normalised: augmentation acts on raw values, and the statistics may still be
    replaced by a checkpoint's after setup (MelDataModule.load_state_dict); crops are normalised
    when gathered. float32 whatever the files hold: the loader path converts each crop the same way.

    Returns:
        frames: (n_mels, total) tensor in host memory.
        offset: (n_files,) int64: column of file f's frame t is `t + offset[f]` (files without
            training items have no columns).
    """
    files, lo, hi = training_spans(dataset.items)
    frames = torch.empty((dataset.n_mels, int((hi - lo).sum())), dtype=torch.float32)
    offset = np.zeros(len(dataset.paths), dtype=np.int64)
    column = 0
    for f, a, b in zip(files.tolist(), lo.tolist(), hi.tolist()):
        # DataError (naming the file) if it became unreadable since the scan.
        frames[:, column : column + b - a] = torch.from_numpy(np.array(dataset.array(f)[:, a:b], dtype=np.float32))
        offset[f] = column - a
        column += b - a
    return frames, offset


class CropPlan(Dataset):
    """What the device needs to cut item `(index, draw)`: a dict of plain numbers.

    `position` is the crop's first column in the device frames; with augmentation, also
    `gain_db`, `shift`, `mix` (bool), `mix_position` (the mixed-in crop's column, the item's own
    when not mixing) and `mix_gain_db`, all drawn as the loader path draws them.
    """

    def __init__(self, dataset: SegmentDataset, offset: np.ndarray) -> None:
        self.dataset, self.offset = dataset, offset

    def __len__(self) -> int:
        return len(self.dataset)

    def _position(self, index: int, draw: int) -> int:
        return self.dataset.crop_start(index, draw) + int(self.offset[self.dataset.items[index, 0]])

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, draw = item  # CropSampler's pairs; the device path always has a draw
        plan: dict[str, Any] = {PLAN_KEY: self._position(index, draw)}
        if self.dataset.augment is None:
            return plan
        aug = draw_augmentation(self.dataset.augment, draw, index, len(self.dataset))
        plan.update(gain_db=aug.gain_db, shift=aug.shift, mix=aug.mix_with is not None,
                    mix_position=self._position(*aug.mix_with) if aug.mix_with is not None else plan[PLAN_KEY],
                    mix_gain_db=aug.mix_gain_db)
        return plan


def gather(frames: torch.Tensor, position: torch.Tensor, length: int) -> torch.Tensor:
    """Crops of `length` columns starting at `position`: (n_mels, T), (B,) -> (B, n_mels, length), one op."""
    rows = torch.arange(frames.shape[0], device=frames.device)[None, :, None]  # (1, n_mels, 1)
    columns = position[:, None, None] + torch.arange(length, device=frames.device)  # (B, 1, length)
    return frames[rows, columns]  # broadcast (B, n_mels, length), contiguous


def augment_batch(raw: torch.Tensor, other: torch.Tensor, plan: dict[str, torch.Tensor], settings: AugmentSettings,
                  power: float, exact_mix: bool) -> torch.Tensor:
    """augment.augment_raw on a batch (B, n_mels, F): mix, gain, then mel shift, as per item.

    Args:
        raw: the items' crops, un-normalised.
        other: the crops at `plan["mix_position"]`.
        plan: the batch's CropPlan values, on raw's device.
        exact_mix: mix one example at a time with augment.mix_power, exactly as the loader path
            does. torch's vectorised and scalar exp/log differ in the last bit on a CPU, and which
            elements take which depends on the tensor's length, so a batched logaddexp on a CPU
            could differ from the per-item one; on a GPU the batched one is used (CPU and GPU
            transcendentals differ anyway).
    """
    if settings.mix_prob > 0:
        if exact_mix:
            raw = raw.clone()
            for i in torch.nonzero(plan["mix"]).flatten().tolist():
                raw[i] = mix_power(raw[i], other[i], float(plan["mix_gain_db"][i]), power)
        else:
            scale = power / 2.0
            offset = db_to_log(plan["mix_gain_db"], 2.0).to(raw.dtype)[:, None, None]  # float64 math, as in Python
            mixed = scale * torch.logaddexp(raw / scale, other / scale + offset)
            raw = torch.where(plan["mix"][:, None, None], mixed, raw)
    if settings.gain_db > 0:
        gain = db_to_log(plan["gain_db"], power)
        # The loader path skips a zero gain; adding -0.0 leaves every value as it is (x + 0.0 would
        # turn a -0.0 into +0.0), so zero gains add -0.0.
        gain = torch.where(plan["gain_db"] == 0, torch.full_like(gain, -0.0), gain)
        raw = raw + gain.to(raw.dtype)[:, None, None]
    if settings.freq_shift > 0:
        n_mels = raw.shape[1]
        source = (torch.arange(n_mels, device=raw.device) - plan["shift"][:, None]).clamp_(0, n_mels - 1)  # (B, n_mels)
        raw = raw.gather(1, source[:, :, None].expand_as(raw))  # output bin i reads bin i - shift
    return raw


class DeviceCrops:
    """The training log-mels, moved to the batch's device on first use, and the plan dataset.

    Args:
        dataset: the training set (its items, crop rule, augmentation and normalizer are used).
        power: the arrays' spectrogram exponent (MelSettings.power), the units of the gains.
    """

    def __init__(self, dataset: SegmentDataset, power: float = 2.0) -> None:
        self.host_frames: Optional[torch.Tensor]
        self.host_frames, offset = load_training_frames(dataset)
        self.nbytes = self.host_frames.numel() * self.host_frames.element_size()
        self.plan = CropPlan(dataset, offset)
        self.length, self.augment, self.power = dataset.frames, dataset.augment, power
        self.normalizer: Normalizer = dataset.normalizer  # shared: restored statistics apply
        self._on: dict[torch.device, torch.Tensor] = {}

    @staticmethod
    def is_plan(batch: Any) -> bool:
        """Whether `batch` is a collated CropPlan batch (the validation loader yields tensors)."""
        return isinstance(batch, dict) and PLAN_KEY in batch

    def frames_on(self, device: torch.device) -> torch.Tensor:
        """The frames on `device`, copied there once.

        The host copy is dropped once the frames are on an accelerator: a collection that just
        fits on the GPU would otherwise be held twice, once in each memory (once per DDP rank).
        """
        if device not in self._on:
            source = self.host_frames if self.host_frames is not None else next(iter(self._on.values()))
            self._on[device] = source.to(device)
            if device.type != "cpu":
                self.host_frames = None
        return self._on[device]

    def batch(self, plan: dict[str, torch.Tensor], exact_mix: Optional[bool] = None) -> torch.Tensor:
        """The normalised training batch (B, 1, n_mels, F) a plan batch describes, on its device."""
        position = plan[PLAN_KEY]
        device = position.device
        frames = self.frames_on(device)
        raw = gather(frames, position, self.length)
        if self.augment is not None:
            other = gather(frames, plan["mix_position"], self.length) if self.augment.mix_prob > 0 else raw
            exact = device.type == "cpu" if exact_mix is None else exact_mix
            raw = augment_batch(raw, other, plan, self.augment, self.power, exact)
        return self.normalizer(raw).unsqueeze(1)  # (B, n_mels, F) -> (B, 1, n_mels, F)
