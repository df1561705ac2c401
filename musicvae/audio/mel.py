"""Mel settings and the audio -> log-mel front end (soundfile decode, torchaudio resample and mel).

The mel settings are one config group (`--data.mel.*`) and travel in every checkpoint, so a
model always meets the features it was trained on. Audio files are decoded with the libsndfile
bundled in soundfile's wheel (WAV, FLAC, OGG/Vorbis, Opus, MP3, AIFF), because torchaudio.load
needs torchcodec and FFmpeg.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch import nn

from musicvae.errors import ConfigError, DataError

#: Name of the sidecar file that declares the mel settings of a folder of precomputed arrays.
MEL_SIDECAR = "mel.json"

#: File suffixes decoded as audio (compared in lower case); libsndfile reads every one of them.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")

# Bytes decoded per read, into one reused buffer that stays in the L2 cache while it is mixed to
# mono: twice as fast as a fresh 1M-frame array per read (OGG/Vorbis 48 kHz stereo: 72 vs 140 ms
# per minute of audio), and memory stays bounded on long multichannel files.
_DECODE_BLOCK_BYTES = 1 << 19


class AudioError(DataError):
    """A recording that cannot be used; the message starts with its path and gives the reason."""


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


class LogMel(nn.Module):
    """Waveform (..., samples) at `mel.sample_rate` -> natural-log mel power (..., n_mels, frames).

    An nn.Module, so it moves to the GPU with `.to(device)` like any layer.
    """

    def __init__(self, mel: MelSettings) -> None:
        super().__init__()
        self.mel = mel
        self.spectrogram = torchaudio.transforms.MelSpectrogram(
            sample_rate=mel.sample_rate,
            n_fft=mel.n_fft,
            hop_length=mel.hop_length,
            n_mels=mel.n_mels,
            f_min=mel.f_min,
            f_max=mel.f_max,
            mel_scale=mel.mel_scale,
            power=mel.power,
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        waveform = waveform.float()
        if self.mel.power == 2.0:
            power = self._mel_power(waveform)
        else:
            power = self.spectrogram(waveform)  # (..., samples) -> (..., n_mels, frames)
        return torch.log(power.clamp_min(self.mel.log_floor))

    def _mel_power(self, waveform: torch.Tensor) -> torch.Tensor:
        """What `self.spectrogram` computes for power 2, a quarter faster: torchaudio takes the
        magnitude (a square root per bin) and squares it again; re^2 + im^2 skips both."""
        stft, fbanks = self.spectrogram.spectrogram, self.spectrogram.mel_scale.fb
        spec = torch.stft(
            waveform.reshape(-1, waveform.shape[-1]), stft.n_fft, stft.hop_length, stft.win_length,
            stft.window, center=stft.center, pad_mode=stft.pad_mode, normalized=False,
            onesided=stft.onesided, return_complex=True,
        )  # (..., samples) -> (B, n_fft/2+1, frames)
        mel = torch.matmul(fbanks.T, spec.real.square() + spec.imag.square())  # -> (B, n_mels, frames)
        return mel.reshape(waveform.shape[:-1] + mel.shape[-2:])


def log_mel(waveform: torch.Tensor, mel: MelSettings) -> torch.Tensor:
    """One-off log-mel of a waveform already at `mel.sample_rate` (see LogMel)."""
    return LogMel(mel)(waveform)


def _decode_reason(path: Path, err: Exception) -> str:
    message = str(err).replace(f"'{path}'", "the file").strip()
    # libsndfile answers "not a regular file (possibly a pipe?)" for some plain files it cannot
    # parse (text named .mp3); say what is actually wrong.
    if "not a regular file" in message and path.is_file():
        message = "format not recognised"
    if "lost sync" in message:  # a FLAC stream that ends (or turns to garbage) mid-frame
        return f"truncated or corrupt ({message.removeprefix('Error : ').rstrip('.')})"
    kind = "" if isinstance(err, sf.LibsndfileError) else f"{type(err).__name__}: "
    return f"cannot decode ({kind}{message})"


# libsndfile's header log notes a data chunk longer than the file: "data : 88200 (should be 44078)".
_SHORT_CHUNK = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_OGG_MAX_PAGE = 27 + 255 + 255 * 255  # header, segment table, body: the longest possible Ogg page


def _truncation(path: Path, handle: sf.SoundFile) -> Optional[str]:
    """Why an opened file looks cut short (an interrupted copy or download), or None.

    libsndfile decodes what is there without complaint for two common containers, so they are
    checked here: WAV/AIFF whose data chunk is longer than the file, and Ogg streams whose last
    page is incomplete or lacks the end-of-stream flag every encoder writes on the final page.
    (FLAC reports a lost sync itself, see _decode_reason; MP3 frame counts are often estimates,
    so MP3 is not judged.)
    """
    if handle.format in ("WAV", "WAVEX", "AIFF", "AIFC", "W64", "CAF"):
        match = _SHORT_CHUNK.search(handle.extra_info)
        if match:
            declared, present = int(match.group(1)), int(match.group(2))
            # 0 and 0xFFFFFFFF are placeholders of writers that stream to disk, and a few bytes
            # short is a writer's miscount: neither is a cut file, whose loss is large.
            if declared < 0xFFFFFFF0 and declared - present >= max(1024, declared // 1000):
                return (f"truncated: the header promises {declared} bytes of audio, the file holds {present} "
                        "(an interrupted copy or download?)")
    elif handle.format == "OGG":
        with open(path, "rb") as raw:
            raw.seek(max(0, os.fstat(raw.fileno()).st_size - _OGG_MAX_PAGE))
            tail = raw.read()
        at = tail.rfind(b"OggS")
        if at < 0 or at + 27 > len(tail) or tail[at + 4] != 0:
            return None  # no page header in reach: leave it to the decoder
        segments = tail[at + 26]
        table = tail[at + 27 : at + 27 + segments]
        end = at + 27 + segments + sum(table)
        if len(table) < segments or end > len(tail):
            return "truncated: the last Ogg page is incomplete (an interrupted copy or download?)"
        if not tail[at + 5] & 0x04:
            return "truncated: the Ogg stream has no end-of-stream page (an interrupted copy, download or recording?)"
    return None


def decode_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode an audio file and mix it to mono.

    Args:
        path: any file libsndfile reads (see AUDIO_SUFFIXES); 16/24/32-bit PCM and float, any
            number of channels, any sample rate.

    Returns:
        (samples,) float32 mono waveform (the mean of the channels) and its native sample rate.

    Raises:
        AudioError: missing, empty, unreadable, corrupt, or without a single decodable frame.
    """
    path = Path(path)
    try:
        if os.stat(path).st_size == 0:
            raise AudioError(f"{path}: empty file (0 bytes)")
        blocks = []
        with sf.SoundFile(str(path)) as handle:
            truncated = _truncation(path, handle)
            if truncated:
                raise AudioError(f"{path}: {truncated}")
            sample_rate, channels = handle.samplerate, handle.channels
            weights = np.full(channels, 1.0 / channels, dtype=np.float32)
            buffer = np.empty((max(1024, _DECODE_BLOCK_BYTES // (4 * channels)), channels), np.float32)
            while True:
                block = handle.read(out=buffer)  # (frames, channels), a view of the reused buffer
                if not len(block):
                    break
                # A matrix-vector product mixes ~30x faster than block.mean(axis=1). (frames, C) -> (frames,)
                blocks.append(block[:, 0].copy() if channels == 1 else block @ weights)
            decoded, declared = sum(len(b) for b in blocks), handle.frames
            # FLAC's header count is exact when known (streamed encoders may leave it unset).
            if handle.format == "FLAC" and 0 < decoded < declared < 1 << 40:
                raise AudioError(f"{path}: truncated: decoded {decoded} of the {declared} frames its header promises")
    except AudioError:
        raise
    except FileNotFoundError as err:
        reason = "broken symbolic link" if path.is_symlink() else "file not found"
        raise AudioError(f"{path}: {reason}") from err
    except IsADirectoryError as err:
        raise AudioError(f"{path}: is a directory, not an audio file") from err
    except Exception as err:  # libsndfile and its codecs raise several types for corrupt data
        raise AudioError(f"{path}: {_decode_reason(path, err)}") from err
    if not blocks:
        raise AudioError(f"{path}: no audio frames could be decoded (empty or truncated)")
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0], int(sample_rate)


@functools.lru_cache(maxsize=32)
def _resampler(orig_rate: int, new_rate: int) -> torchaudio.transforms.Resample:
    # Building the windowed-sinc kernel costs as much as applying it to a minute of audio, so
    # each process builds it once per source rate.
    return torchaudio.transforms.Resample(orig_rate, new_rate)


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """(..., samples) at `orig_rate` -> (..., ceil(samples * new_rate / orig_rate)) at `new_rate`."""
    if orig_rate == new_rate:
        return waveform
    return _resampler(int(orig_rate), int(new_rate))(waveform)


def load_audio(path: str | os.PathLike, sample_rate: int) -> torch.Tensor:
    """Decode, mix to mono and resample an audio file.

    Args:
        path: the audio file.
        sample_rate: the rate of the result.

    Returns:
        (samples,) float32 waveform at `sample_rate`.

    Raises:
        AudioError: see decode_audio.
    """
    wave, rate = decode_audio(path)
    with torch.inference_mode():
        return resample(torch.from_numpy(wave), rate, sample_rate)


@functools.lru_cache(maxsize=8)
def _log_mel_module(mel: MelSettings) -> LogMel:
    return LogMel(mel)  # the mel filterbank is built once per process and setting


def audio_to_log_mel(path: str | os.PathLike, mel: MelSettings) -> np.ndarray:
    """The log-mel spectrogram of an audio file, as the models are trained on it.

    Args:
        path: the audio file.
        mel: the mel settings; audio is resampled to `mel.sample_rate` first.

    Returns:
        (n_mels, frames) float32 natural-log mel power, frames = 1 + samples // hop_length.

    Raises:
        AudioError: unreadable, empty, silent (every sample zero), shorter than one STFT window,
            or with NaN/Inf samples.
    """
    wave, rate = decode_audio(path)
    return mono_to_log_mel(wave, rate, mel, source=str(path))


def mono_to_log_mel(wave: np.ndarray, rate: int, mel: MelSettings, source: str = "waveform") -> np.ndarray:
    """(samples,) mono float32 at `rate` -> (n_mels, frames) float32 log-mel (see audio_to_log_mel).

    Raises:
        AudioError: naming `source`, for silent, too short or non-finite input.
    """
    if not wave.any():
        raise AudioError(f"{source}: silent (every sample is zero after mixing to mono)")
    with torch.inference_mode():
        wave_t = resample(torch.from_numpy(wave), rate, mel.sample_rate)
        if wave_t.numel() < mel.n_fft:
            raise AudioError(
                f"{source}: too short ({wave.size / rate:.3f} s); needs at least one STFT window "
                f"of {mel.n_fft} samples at {mel.sample_rate} Hz"
            )
        spec = _log_mel_module(mel)(wave_t)  # (samples,) -> (n_mels, frames)
    if not torch.isfinite(spec).all():
        raise AudioError(f"{source}: contains NaN or Inf samples")
    return spec.numpy()
