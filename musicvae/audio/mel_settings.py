"""Mel settings: how log-mel spectrograms are made, and the sidecar that declares them.

The mel settings are one config group (`--data.mel.*`) and travel in every checkpoint, so a
model always meets the features it was trained on. A folder of precomputed arrays declares its
settings in a `mel.json` sidecar.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from musicvae.errors import ConfigError

#: Name of the sidecar file that declares the mel settings of a folder of precomputed arrays.
MEL_SIDECAR = "mel.json"


@dataclass(frozen=True)
class MelSettings:
    """How log-mel spectrograms are made.

    Args:
        sample_rate: audio is resampled to this rate before the STFT.
        n_fft: STFT size; at 22050 Hz, 1024 samples (46 ms) resolve low notes without smearing onsets.
        hop_length: STFT hop; 256 samples (11.6 ms) gives about 86 frames per second.
        n_mels: number of mel bins (the notebook's 128).
        f_min: lowest mel filter edge in Hz.
        f_max: highest mel filter edge in Hz; None means sample_rate / 2.
        mel_scale: "htk" (torchaudio's default) or "slaney".
        power: 2.0 for a power spectrogram.
        log_floor: power values are clamped to at least this before the natural log, so digital
            silence maps to log(log_floor) (about -11.5 for 1e-5) instead of -inf.
    """

    sample_rate: int = 22050
    n_fft: int = 1024
    hop_length: int = 256
    n_mels: int = 128
    f_min: float = 0.0
    f_max: Optional[float] = None
    mel_scale: Literal["htk", "slaney"] = "htk"
    power: float = 2.0
    log_floor: float = 1e-5

    def __post_init__(self) -> None:
        problems = []
        if self.sample_rate <= 0:
            problems.append(f"sample_rate={self.sample_rate} must be positive")
        if self.n_fft <= 0 or self.hop_length <= 0:
            problems.append(f"n_fft={self.n_fft} and hop_length={self.hop_length} must be positive")
        if self.n_mels <= 0 or self.n_mels > self.n_fft // 2 + 1:
            problems.append(f"n_mels={self.n_mels} must be in 1..n_fft/2+1 ({self.n_fft // 2 + 1})")
        top = self.f_max if self.f_max is not None else self.sample_rate / 2
        if not 0 <= self.f_min < top <= self.sample_rate / 2:
            problems.append(
                f"need 0 <= f_min < f_max <= sample_rate/2, got f_min={self.f_min}, f_max={self.f_max}"
            )
        if self.log_floor <= 0:
            problems.append(f"log_floor={self.log_floor} must be positive")
        if problems:
            raise ConfigError("invalid mel settings: " + "; ".join(problems))

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def log_floor_value(self) -> float:
        """The log-mel value of digital silence."""
        return math.log(self.log_floor)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "mel settings") -> "MelSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown mel setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def differences(self, other: "MelSettings") -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ, as {name: (self's, other's)}."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def read_mel_sidecar(folder: Path) -> Optional[MelSettings]:
    """The mel settings declared in `folder/mel.json`, or None when there is no sidecar."""
    path = Path(folder) / MEL_SIDECAR
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the mel settings sidecar ({err})") from err
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object of mel settings, got {type(values).__name__}")
    return MelSettings.from_dict(values, source=str(path))


def write_mel_sidecar(folder: Path, mel: MelSettings) -> Path:
    path = Path(folder) / MEL_SIDECAR
    path.write_text(json.dumps(mel.to_dict(), indent=2) + "\n")
    return path
