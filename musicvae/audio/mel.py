"""Mel settings and the audio -> log-mel front end (soundfile decode, torchaudio resample and mel).

The mel settings are one config group (`--data.mel.*`) and travel in every checkpoint, so a
model always meets the features it was trained on. Audio files are decoded with the libsndfile
bundled in soundfile's wheel (WAV, FLAC, OGG/Vorbis, Opus, MP3, AIFF), because torchaudio.load
needs torchcodec and FFmpeg.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch import nn

from musicvae.audio.blocks import FRAME_BLOCK, RESAMPLE_BLOCK, centred_frame_blocks, resample_blocks
from musicvae.errors import ConfigError, DataError

#: Name of the sidecar file that declares the mel settings of a folder of precomputed arrays.
MEL_SIDECAR = "mel.json"

#: File suffixes decoded as audio (compared in lower case); libsndfile reads every one of them.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")

# Bytes decoded per read, into one reused buffer that stays in the L2 cache while it is mixed to
# mono: faster than a fresh 1M-frame array per read, and memory stays bounded on long
# multichannel files.
_DECODE_BLOCK_BYTES = 1 << 19
# libsndfile's frame count of a stream that does not declare its length (SF_COUNT_MAX).
_UNKNOWN_FRAMES = (1 << 63) - 1
# Samples per block when an in-memory waveform is fed to the block-wise front end (views, not copies).
_PIECE = 1 << 16


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
        """(..., samples) -> (..., n_mels, 1 + samples // hop_length) for an even n_fft: a centred STFT."""
        flat = waveform.float().reshape(-1, waveform.shape[-1])
        pad = self.mel.n_fft // 2
        # What torch.stft(center=True) does (reflect padding, then uncentred frames), spelled out so
        # that the block-wise front end (musicvae/audio/blocks.py) runs the very same frames().
        padded = nn.functional.pad(flat[:, None], (pad, pad), mode="reflect")[:, 0]  # -> (B, samples + 2 pad)
        spec = self.frames(padded)  # -> (B, n_mels, frames)
        return spec.reshape(waveform.shape[:-1] + spec.shape[-2:])

    def frames(self, padded: torch.Tensor) -> torch.Tensor:
        """(..., samples) already padded -> (..., n_mels, 1 + (samples - n_fft) // hop_length): log-mels
        of the uncentred STFT frames."""
        if self.mel.power == 2.0:
            power = self._mel_power(padded)
        else:
            stft = self.spectrogram.spectrogram
            spec = torchaudio.functional.spectrogram(
                padded, 0, stft.window, stft.n_fft, stft.hop_length, stft.win_length, self.mel.power,
                normalized=False, center=False, onesided=stft.onesided,
            )  # (..., samples) -> (..., n_fft/2+1, frames)
            power = self.spectrogram.mel_scale(spec)  # -> (..., n_mels, frames)
        return torch.log(power.clamp_min(self.mel.log_floor))

    def _mel_power(self, padded: torch.Tensor) -> torch.Tensor:
        """What `self.spectrogram` computes for power 2, but faster: torchaudio takes the
        magnitude (a square root per bin) and squares it again; re^2 + im^2 skips both."""
        stft, fbanks = self.spectrogram.spectrogram, self.spectrogram.mel_scale.fb
        spec = torch.stft(
            padded.reshape(-1, padded.shape[-1]), stft.n_fft, stft.hop_length, stft.win_length,
            stft.window, center=False, normalized=False, onesided=stft.onesided, return_complex=True,
        )  # (..., samples) -> (B, n_fft/2+1, frames)
        mel = torch.matmul(fbanks.T, spec.real.square() + spec.imag.square())  # -> (B, n_mels, frames)
        return mel.reshape(padded.shape[:-1] + mel.shape[-2:])


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


def _audio_error(path: Path, err: Exception) -> AudioError:
    """The one-line AudioError for what opening or reading `path` raised."""
    if isinstance(err, FileNotFoundError):
        return AudioError(f"{path}: {'broken symbolic link' if path.is_symlink() else 'file not found'}")
    if isinstance(err, IsADirectoryError):
        return AudioError(f"{path}: is a directory, not an audio file")
    return AudioError(f"{path}: {_decode_reason(path, err)}")


def decode_blocks(path: str | os.PathLike) -> tuple[int, Iterator[np.ndarray]]:
    """Open an audio file to decode it block by block, mixed to mono, in bounded memory.

    Args:
        path: any file libsndfile reads (see AUDIO_SUFFIXES); 16/24/32-bit PCM and float, any
            number of channels, any sample rate.

    Returns:
        Its native sample rate, and an iterator of (frames,) float32 mono blocks (the mean of the
        channels, each a new array) that joined are decode_audio's waveform.

    Raises:
        AudioError: here when the file is missing, empty, unreadable or visibly cut short; from the
            iterator for what only reading finds (corrupt data, a FLAC stream that ends early,
            not a single frame). A MemoryError is not the file's fault and passes unchanged.
    """
    path = Path(path)
    handle = None
    try:
        if os.stat(path).st_size == 0:
            raise AudioError(f"{path}: empty file (0 bytes)")
        handle = sf.SoundFile(str(path))
        truncated = _truncation(path, handle)
        if truncated:
            raise AudioError(f"{path}: {truncated}")
    except BaseException as err:
        if handle is not None:
            handle.close()
        if isinstance(err, (AudioError, MemoryError)) or not isinstance(err, Exception):
            raise
        raise _audio_error(path, err) from err  # libsndfile and its codecs raise several types
    return int(handle.samplerate), _read_blocks(path, handle)


def _read_blocks(path: Path, handle: sf.SoundFile) -> Iterator[np.ndarray]:
    with handle:
        try:
            channels = handle.channels
            weights = np.full(channels, 1.0 / channels, dtype=np.float32)
            buffer = np.empty((max(1024, _DECODE_BLOCK_BYTES // (4 * channels)), channels), np.float32)
            decoded = 0
            unknown_length = handle.format == "FLAC" and handle.frames >= _UNKNOWN_FRAMES
            while True:
                # Until a read comes back short: the header's frame count (which SoundFile.blocks()
                # trusts) is an estimate for MP3, wrong in a file cut short, and absent from a FLAC
                # written by a streaming encoder.
                if unknown_length:
                    block = _read_to_unknown_end(handle, buffer)
                else:
                    block = handle.read(len(buffer), out=buffer)  # (frames, channels), a view of the reused buffer
                if len(block):
                    decoded += len(block)
                    # A matrix-vector product mixes far faster than block.mean(axis=1). (frames, C) -> (frames,)
                    yield block[:, 0].copy() if channels == 1 else block @ weights
                if len(block) < len(buffer):
                    break
            declared, container = handle.frames, handle.format
        except (AudioError, MemoryError):
            raise
        except Exception as err:
            raise _audio_error(path, err) from err
    # FLAC's header count is exact when known (streamed encoders may leave it unset).
    if container == "FLAC" and 0 < decoded < declared < 1 << 40:
        raise AudioError(f"{path}: truncated: decoded {decoded} of the {declared} frames its header promises")
    if not decoded:
        raise AudioError(f"{path}: no audio frames could be decoded (empty or truncated)")


def _read_to_unknown_end(handle: sf.SoundFile, buffer: np.ndarray) -> np.ndarray:
    """SoundFile.read into `buffer` for a FLAC stream of unknown length.

    soundfile seeks to the new position after every read, and libsndfile cannot seek to the end
    of a FLAC stream whose header leaves the length unset (streaming encoders do): the read that
    reaches the end fills the buffer, then raises "Internal psf_fseek() failed". FLAC is integer
    PCM, which never decodes to NaN, so the frames read are those before the first NaN.
    """
    buffer.fill(np.nan)
    try:
        return handle.read(len(buffer), out=buffer)
    except sf.LibsndfileError as err:
        if "psf_fseek" not in str(err):
            raise
    unread = np.isnan(buffer[:, 0])
    return buffer[: int(unread.argmax()) if unread.any() else len(buffer)]


def decode_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode a whole audio file, mixed to mono (see decode_blocks, which bounds the memory).

    Returns:
        (samples,) float32 mono waveform and its native sample rate.

    Raises:
        AudioError: missing, empty, unreadable, corrupt, or without a single decodable frame.
    """
    rate, blocks = decode_blocks(path)
    return _joined(list(blocks)), rate


def _joined(blocks: list[np.ndarray], axis: int = -1) -> np.ndarray:
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=axis)


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


def _resampled_blocks(blocks: Iterable[torch.Tensor], orig_rate: int, new_rate: int,
                      block: int = RESAMPLE_BLOCK) -> Iterable[torch.Tensor]:
    """`resample` of a stream of (samples,) blocks, block by block (musicvae/audio/blocks.py)."""
    if orig_rate == new_rate:
        return blocks
    resampler = _resampler(int(orig_rate), int(new_rate))
    return resample_blocks(blocks, resampler, int(orig_rate), int(new_rate), resampler.width, block)


def load_audio(path: str | os.PathLike, sample_rate: int) -> torch.Tensor:
    """Decode, mix to mono and resample an audio file.

    Args:
        path: the audio file.
        sample_rate: the rate of the result.

    Returns:
        (samples,) float32 waveform at `sample_rate`.

    Raises:
        AudioError: see decode_blocks.
    """
    rate, blocks = decode_blocks(path)
    waves = _resampled_blocks((torch.from_numpy(b) for b in blocks), rate, sample_rate)
    return torch.cat(list(waves))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=8)
def _log_mel_module(mel: MelSettings) -> LogMel:
    return LogMel(mel)  # the mel filterbank is built once per process and setting


class LogMelStream:
    """The log-mel of a mono stream, computed block by block so that memory does not grow with its length.

    Iterating yields (n_mels, frames) float32 arrays that, joined on the last axis, equal LogMel
    of the whole waveform resampled at once: decoding, resampling and the STFT each carry their
    context across the seams (musicvae/audio/blocks.py). Once iterated, `samples` and `resampled`
    hold the stream's length at its own rate and at `mel.sample_rate`.

    Args:
        blocks: (samples,) float32 mono arrays at `rate` (decode_blocks' iterator).
        rate: their sample rate.
        mel: the mel settings; the stream is resampled to `mel.sample_rate` first.
        source: the name errors give (the file's path).
        resample_block, frame_block: input samples per resampler call and frames per STFT call.

    Raises (while iterating):
        AudioError: naming `source`, for silent, too short or non-finite input.
    """

    def __init__(self, blocks: Iterable[np.ndarray], rate: int, mel: MelSettings, source: str = "waveform",
                 resample_block: int = RESAMPLE_BLOCK, frame_block: int = FRAME_BLOCK) -> None:
        self.blocks, self.rate, self.mel, self.source = blocks, int(rate), mel, source
        self.resample_block, self.frame_block = resample_block, frame_block
        self.samples = 0
        self.resampled = 0
        self._audible = False

    def __iter__(self) -> Iterator[np.ndarray]:
        waves = _resampled_blocks(self._received(), self.rate, self.mel.sample_rate, self.resample_block)
        to_mel = _log_mel_module(self.mel)
        pieces = centred_frame_blocks(self._checked(waves), to_mel.frames, self.mel.n_fft, self.mel.hop_length,
                                      self.frame_block)
        while True:
            # One thread per piece, the caller's setting back before each yield: torch's intra-op
            # threads cost more than they gain on pieces this small, and where another process
            # holds a core their spinning makes the whole stream several times slower.
            with _one_thread():
                spec = next(pieces, None)  # (n_mels, frames)
            if spec is None:
                return
            if not torch.isfinite(spec).all():
                raise AudioError(f"{self.source}: contains NaN or Inf samples")
            yield spec.numpy()

    def joined(self) -> np.ndarray:
        """The whole (n_mels, frames) log-mel in one array."""
        return _joined(list(self))

    def _received(self) -> Iterator[torch.Tensor]:
        for block in self.blocks:
            self.samples += block.shape[-1]
            self._audible = self._audible or bool(block.any())
            yield torch.from_numpy(block)

    def _checked(self, waves: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        for wave in waves:
            self.resampled += wave.shape[-1]
            yield wave
        # Raised before the last frames are released, so a consumer never takes a bad stream for whole.
        if not self._audible:
            raise AudioError(f"{self.source}: silent (every sample is zero after mixing to mono)")
        if self.resampled < self.mel.n_fft:
            raise AudioError(
                f"{self.source}: too short ({self.samples / self.rate:.3f} s); needs at least one STFT window "
                f"of {self.mel.n_fft} samples at {self.mel.sample_rate} Hz"
            )


def audio_to_log_mel(path: str | os.PathLike, mel: MelSettings) -> np.ndarray:
    """The log-mel spectrogram of an audio file, as the models are trained on it.

    Decoded, resampled and transformed block by block (LogMelStream); only the result is whole.

    Args:
        path: the audio file.
        mel: the mel settings; audio is resampled to `mel.sample_rate` first.

    Returns:
        (n_mels, frames) float32 natural-log mel power, frames = 1 + samples // hop_length.

    Raises:
        AudioError: unreadable, empty, silent (every sample zero), shorter than one STFT window,
            or with NaN/Inf samples.
    """
    rate, blocks = decode_blocks(path)
    return LogMelStream(blocks, rate, mel, source=str(path)).joined()


def mono_to_log_mel(wave: np.ndarray, rate: int, mel: MelSettings, source: str = "waveform") -> np.ndarray:
    """(samples,) mono float32 at `rate` -> (n_mels, frames) float32 log-mel (see audio_to_log_mel).

    Raises:
        AudioError: naming `source`, for silent, too short or non-finite input.
    """
    wave = np.asarray(wave, dtype=np.float32)
    pieces = (wave[i : i + _PIECE] for i in range(0, len(wave), _PIECE))
    return LogMelStream(pieces, rate, mel, source=source).joined()
