"""Training-time augmentation of log-mel segments: gain, mel-bin shift, and mixing in a second segment.

Everything here works on raw log-mels, the arrays as stored: natural log of mel power (of
|STFT|**power, see MelSettings), clamped at `log_floor`. The dataset augments a segment before
z-scoring it, so no setting depends on the training statistics. Time shifts are not here: the
training crops already jitter each window by up to half its length (SegmentDataset.crop_start).

Each item's augmentation is a pure function of the sampler's `draw` for it (musicvae/data/sampling.py),
through a random stream of its own: the same (index, draw) gives the same tensor in any
DataLoader worker and after a resume, and no global generator is touched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from musicvae.errors import ConfigError
from musicvae.data.sampling import DRAW_RANGE

#: Mixed into the seed of the augmentation stream, so it is not the crop's stream: the crop uses the
#: draw itself (modulo its range), and correlating the two would tie gains and shifts to crop offsets.
STREAM_SALT = 0x61756720  # "aug "


@dataclass(frozen=True)
class AugmentSettings:
    """Random changes to training segments; every default is off (validation never sees any).

    Args:
        gain_db: each segment is made louder or quieter by a gain uniform in [-gain_db, +gain_db] dB.
        freq_shift: each segment's mel axis is shifted by a whole number of bins uniform in
            [-freq_shift, freq_shift], the vacated edge bins repeating the edge bin.
        mix_prob: probability of mixing a second random training segment into a segment (their
            powers add, as two recordings played together would).
        mix_gain_db: the second segment is quieter by a gain uniform in [0, mix_gain_db] dB.
    """

    gain_db: float = 0.0
    freq_shift: int = 0
    mix_prob: float = 0.0
    mix_gain_db: float = 6.0

    def check(self) -> "AugmentSettings":
        """These settings, if every value can work.

        Not done in __post_init__: jsonargparse builds this dataclass while parsing, and an error
        raised there reaches the user as a traceback of Union-type errors; MelDataModule calls
        this instead, so the command line prints one line naming the setting.

        Raises:
            ConfigError: naming the first setting out of range.
        """
        # `not x >= 0` also refuses NaN, which compares false to everything.
        for name in ("gain_db", "mix_gain_db"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"data.augment.{name}={value} must be a non-negative number of dB, e.g. 6")
        if isinstance(self.freq_shift, bool) or int(self.freq_shift) != self.freq_shift or self.freq_shift < 0:
            raise ConfigError(f"data.augment.freq_shift={self.freq_shift} must be a non-negative whole number of mel bins")
        if not 0.0 <= self.mix_prob <= 1.0:
            raise ConfigError(f"data.augment.mix_prob={self.mix_prob} must be in [0, 1]")
        return self

    @property
    def active(self) -> bool:
        """Whether any augmentation can change a segment (mix_gain_db alone changes nothing)."""
        return self.gain_db > 0 or self.freq_shift > 0 or self.mix_prob > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "AugmentSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown data.augment setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values).check()


@dataclass(frozen=True)
class AugmentDraw:
    """One item's augmentation, drawn by `draw_augmentation`.

    Attributes:
        gain_db: gain applied to the whole (mixed) segment.
        shift: mel bins to move the content up (positive) or down (negative).
        mix_with: (item index, crop draw) of the segment to mix in, or None for no mixing.
        mix_gain_db: gain (<= 0) of the mixed-in segment relative to the item's own.
    """

    gain_db: float = 0.0
    shift: int = 0
    mix_with: Optional[tuple[int, int]] = None
    mix_gain_db: float = 0.0


def draw_augmentation(settings: AugmentSettings, draw: int, index: int, n_items: int) -> AugmentDraw:
    """What to do to item `index` given its sampler draw: a pure function of its arguments.

    Every value is drawn whatever the settings, in a fixed order, so turning one augmentation on
    or off leaves the others' draws as they were.

    Args:
        settings: the augmentation ranges.
        draw: the sampler's random integer for this item (the crop uses it too, directly).
        index: the item's index, to pick another item to mix in.
        n_items: items in the dataset.
    """
    rng = np.random.default_rng((int(draw) % 2**64, STREAM_SALT))  # seeds must be non-negative
    mixes = rng.random() < settings.mix_prob
    # Another item than this one, unless there is no other (then another crop of the same window).
    other = (index + 1 + int(rng.integers(n_items - 1))) % n_items if n_items > 1 else index
    other_draw = int(rng.integers(DRAW_RANGE))
    mix_gain_db = -float(rng.uniform(0.0, 1.0)) * settings.mix_gain_db
    gain_db = float(rng.uniform(-1.0, 1.0)) * settings.gain_db
    shift = int(rng.integers(-settings.freq_shift, settings.freq_shift + 1))
    return AugmentDraw(gain_db, shift, (other, other_draw) if mixes else None, mix_gain_db)


def db_to_log(db: float, power: float = 2.0) -> float:
    """The natural-log offset of a gain of `db` decibels on mels of |STFT|**power.

    A gain of G dB scales amplitude by 10**(G/20), so |STFT|**power by 10**(power*G/20): for the
    default power spectrogram that is G*ln(10)/10 = 0.230 per dB.
    """
    return db * power * math.log(10.0) / 20.0


def apply_gain(raw: torch.Tensor, gain_db: float, power: float = 2.0) -> torch.Tensor:
    """Raw log-mels (..., n_mels, frames) made `gain_db` louder: the same offset on every value.

    Digital silence moves too: bins clamped at the log floor (log(1e-5) = -11.5 by default) end up
    `gain_db` above or below it, a floor no real recording at that level would show (a real gain
    of -G dB would stay clamped at the floor). Kept linear on purpose: with gains of a few dB the
    shifted floor stays far below the music, and a clamp would make the change depend on the
    floor setting of each file.
    """
    return raw + db_to_log(gain_db, power)


def shift_mel_bins(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Move (..., n_mels, frames) content `shift` bins up the mel axis (down when negative).

    The bins left empty at one edge repeat that edge bin (rather than silence, which would draw a
    hard dark band the data never has). Mel bins are close to log-spaced above ~1 kHz, so a shift
    there is roughly a small pitch shift; in the near-linear low bins it stretches less.
    """
    if shift == 0:
        return x
    n_mels = x.shape[-2]
    source = (torch.arange(n_mels) - shift).clamp_(0, n_mels - 1)  # output bin i reads bin i - shift
    return x.index_select(-2, source)


def mix_power(raw_a: torch.Tensor, raw_b: torch.Tensor, gain_db: float = 0.0, power: float = 2.0) -> torch.Tensor:
    """Raw log-mels of two segments played together, `b` at `gain_db` relative to `a`.

    Powers add (the expected power of two independent sources): with P = exp(raw * 2/power),
    the mix is log(P_a + g*P_b) with g = 10**(gain_db/10), computed as a logaddexp so loud bins
    (exp(10) and up) never overflow. For the default power 2 the raw values are log-power and
    this is exactly logaddexp(raw_a, raw_b + log g); for magnitude mels (power 1) adding powers
    of mel bands is the usual approximation. The result is never below either input (g = 1) or
    below `a`; two clamped-silence bins mix to the floor + log 2 (3 dB above it).
    """
    scale = power / 2.0  # raw = scale * log(P)
    return scale * torch.logaddexp(raw_a / scale, raw_b / scale + db_to_log(gain_db, 2.0))


def augment_raw(
    raw: torch.Tensor, aug: AugmentDraw, power: float = 2.0, other: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Apply one item's augmentation to its raw log-mels (..., n_mels, frames).

    Order: mix (both segments as recorded), then the gain of the whole mix, then the mel shift.

    Args:
        raw: the item's segment, un-normalised.
        aug: what to do, from `draw_augmentation`.
        power: the mel settings' spectrogram exponent (the units of `raw`).
        other: the segment `aug.mix_with` names, un-normalised; needed when it is not None.
    """
    if aug.mix_with is not None:
        if other is None:
            raise ValueError("this augmentation mixes in another segment: pass it as `other`")
        raw = mix_power(raw, other, aug.mix_gain_db, power)
    if aug.gain_db != 0.0:
        raw = apply_gain(raw, aug.gain_db, power)
    return shift_mel_bins(raw, aug.shift)
