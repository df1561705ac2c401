"""The audio -> log-mel front end: resampling, the log-mel transform, and both of them block by block.

The transform is torchaudio's mel spectrogram with a natural log; LogMelStream runs decoding
(musicvae/audio/decode.py), resampling and the STFT on a stream of blocks, so that memory does not
grow with a recording's length, and its output equals the transform of the whole waveform.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterable, Iterator

import numpy as np
import torch
import torchaudio
from torch import nn

from musicvae.audio.blocks import FRAME_BLOCK, RESAMPLE_BLOCK, centred_frame_blocks, resample_blocks
from musicvae.audio.decode import AUDIO_SUFFIXES, AudioError, decode_audio, decode_blocks, join_blocks
from musicvae.audio.mel_settings import MEL_SIDECAR, MelSettings, read_mel_sidecar, write_mel_sidecar

# AUDIO_SUFFIXES, decode_audio and the sidecar's names are not used here: they were defined here
# before decoding and the settings became modules of their own, and still import from here.

# Samples per block when an in-memory waveform is fed to the block-wise front end (views, not copies).
_PIECE = 1 << 16


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
        return join_blocks(list(self))

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
