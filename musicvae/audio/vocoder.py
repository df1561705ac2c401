"""Log-mel -> waveform: undo the normalisation and the log, invert the mel filterbank, and
recover a phase with Griffin-Lim; plus the ceiling that inversion puts on what can be heard
(`measure_ceiling`: a recording's own log-mel, inverted, against the recording).

The vocoder is an nn.Module with a one-method interface (`forward(log_mel) -> waveform`), so a
neural vocoder trained on the same MelSettings can replace it without touching its callers.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Optional

import numpy as np
import torch
import torchaudio
from torch import Tensor, nn

from musicvae.audio.decode import decode_blocks
from musicvae.audio.mel import LogMel, resample
from musicvae.audio.mel_settings import MelSettings
from musicvae.errors import ConfigError, DataError


def mel_filterbank(mel: MelSettings) -> Tensor:
    """The (n_fft/2+1, n_mels) filterbank LogMel applies as fb^T @ spectrogram."""
    return torchaudio.functional.melscale_fbanks(
        n_freqs=mel.n_fft // 2 + 1,
        f_min=mel.f_min,
        f_max=mel.f_max if mel.f_max is not None else mel.sample_rate / 2,
        n_mels=mel.n_mels,
        sample_rate=mel.sample_rate,
        norm=None,
        mel_scale=mel.mel_scale,
    )


def mel_pseudo_inverse(mel: MelSettings) -> Tensor:
    """The (n_fft/2+1, n_mels) pseudo-inverse of the mel filterbank, float32.

    torchaudio's InverseMelScale solves the same least-squares problem with `torch.linalg.lstsq`
    on every call. With 128 mels at n_fft 1024 the filterbank has rank 126: the default `gels`
    driver fails on CPU, and on CUDA `gels` is the only driver lstsq has. The minimum-norm
    solution `gelsd` returns is exactly `pinv(fb^T) @ mel` (max difference 5e-13), so the SVD is
    done once per process and setting and each inversion is one matmul, on any device, far cheaper
    than a least-squares solve per call (and small beside Griffin-Lim itself).
    """
    return _pseudo_inverse(mel).clone()  # a copy: the cached tensor must not be moved or edited in place


@functools.lru_cache(maxsize=8)
def _pseudo_inverse(mel: MelSettings) -> Tensor:
    fb = mel_filterbank(mel)
    # One thread: MKL's threaded SVD of this small matrix took seconds instead of milliseconds on a
    # busy 2-core machine (its OpenMP workers wait on each other); one thread is never slower here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # float64: the smallest non-zero singular values of the rank-deficient fb are ~1e-3 of the largest.
        return torch.linalg.pinv(fb.T.double()).float()  # (n_mels, freq) -> (freq, n_mels)
    finally:
        torch.set_num_threads(threads)


#: Frames Griffin-Lim inverts at once (47 s at 22050 Hz with a 256 hop). A longer piece is inverted in
#: blocks that overlap their neighbours by GRIFFIN_LIM_OVERLAP frames (1.5 s) on each side, each block
#: starting from the phase the previous one found in their overlap, and joined by a crossfade there:
#: memory stays that of one block (a three-hour piece inverted at once needs tens of GB), and the two
#: phase estimates agree where they meet, so the crossfade does not cancel. Not the same samples
#: as one inversion of the whole, which no block-wise Griffin-Lim can be: its phase is global.
GRIFFIN_LIM_BLOCK = 4096
GRIFFIN_LIM_OVERLAP = 128


class GriffinLimVocoder(nn.Module):
    """Natural-log mel power (..., n_mels, T) -> waveform (..., samples) at `mel.sample_rate`.

    Args:
        mel: the settings the log-mels were made with (a checkpoint's, or the ceiling's).
        n_iter: Griffin-Lim iterations; the spectral convergence on real music improves by
            ~0.006 from 32 to 64 and ~0.002 from 64 to 128, at linear cost (64: ~2.2 s per 30 s
            of audio on one CPU thread).
        momentum: fast Griffin-Lim momentum (Perraudin et al. 2013), torchaudio's default.
        seed: seeds the random initial phase, so the same mel always gives the same waveform;
            None draws from the global generator.
    """

    def __init__(self, mel: MelSettings, n_iter: int = 64, momentum: float = 0.99, seed: Optional[int] = 0) -> None:
        super().__init__()
        if n_iter < 1:
            raise ValueError(f"n_iter={n_iter}: Griffin-Lim needs at least one iteration")
        self.mel, self.n_iter, self.momentum, self.seed = mel, n_iter, momentum, seed
        # Buffers, not persistent state: they follow `.to(device)` and are rebuilt from `mel`.
        self.register_buffer("pinv", mel_pseudo_inverse(mel), persistent=False)
        self.register_buffer("window", torch.hann_window(mel.n_fft), persistent=False)  # LogMel's window

    def mel_to_linear(self, log_mel: Tensor) -> Tensor:
        """(..., n_mels, T) natural-log mel power -> (..., n_fft/2+1, T) linear spectrogram (power `mel.power`)."""
        if log_mel.shape[-2] != self.mel.n_mels:
            raise ValueError(f"expected (..., {self.mel.n_mels}, T) log-mels, got {tuple(log_mel.shape)}")
        # Subtract the floor: a value at the floor means "below what the features resolve", which
        # should play as silence, not as broadband hiss at the floor's level (-50 dB for 1e-5).
        power = (log_mel.float().exp() - self.mel.log_floor).clamp_min(0.0)
        # Clamped at 0: the minimum-norm solution rings negative next to strong bins.
        return torch.matmul(self.pinv, power).clamp_min(0.0)  # (freq, n_mels) @ (..., n_mels, T) -> (..., freq, T)

    def forward(self, log_mel: Tensor, length: Optional[int] = None) -> Tensor:
        """Invert log-mels to audio.

        Args:
            log_mel: (..., n_mels, T) natural-log mel power (denormalised: Normalizer.inverse).
            length: samples of the result; default (T - 1) * hop_length, the length whose
                centred STFT has T frames.

        Returns:
            (..., samples) float32 waveform at `mel.sample_rate`.
        """
        invert = self._griffin_lim if log_mel.shape[-1] <= GRIFFIN_LIM_BLOCK else self._griffin_lim_blocks
        if self.seed is None:
            return invert(log_mel, length)
        # manual_seed reseeds every CUDA device too: fork them all, so the caller's streams are untouched.
        devices = list(range(torch.cuda.device_count())) if log_mel.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            return invert(log_mel, length)

    def _griffin_lim(self, log_mel: Tensor, length: Optional[int]) -> Tensor:
        # power=mel.power: the inverted filterbank gives back the spectrogram LogMel started from
        # (power 2 by default), and griffinlim takes its 1/power root to get the magnitude.
        return torchaudio.functional.griffinlim(
            self.mel_to_linear(log_mel), self.window, self.mel.n_fft, self.mel.hop_length, self.mel.n_fft,
            self.mel.power, self.n_iter, self.momentum, length, rand_init=True,
        )  # (..., freq, T) -> (..., samples)

    def _griffin_lim_blocks(self, log_mel: Tensor, length: Optional[int]) -> Tensor:
        """Griffin-Lim of a long piece, block by block (see GRIFFIN_LIM_BLOCK)."""
        hop, total = self.mel.hop_length, log_mel.shape[-1]
        fade = GRIFFIN_LIM_OVERLAP * hop // 2  # well inside the overlap, away from each block's own edges
        ramp = torch.linspace(0.0, 1.0, fade, device=log_mel.device)
        batch = log_mel.shape[:-2]
        # Filled in place: a three-hour waveform is 0.95 GB, and joining pieces would double it.
        out = log_mel.new_zeros(math.prod(batch), (total - 1) * hop if length is None else length)
        carried = None
        for start in range(0, total, GRIFFIN_LIM_BLOCK):
            end = min(total, start + GRIFFIN_LIM_BLOCK)
            a, b = max(0, start - GRIFFIN_LIM_OVERLAP), min(total, end + GRIFFIN_LIM_OVERLAP)
            magnitude = self.mel_to_linear(log_mel[..., a:b]).pow(1 / self.mel.power)  # -> (..., freq, b - a)
            magnitude = magnitude.reshape(-1, *magnitude.shape[-2:])
            angles = torch.rand(magnitude.shape, dtype=torch.complex64, device=magnitude.device)  # as torchaudio starts
            if carried is not None:
                first, previous = carried  # the previous block's frames [first, first + its length)
                angles[..., : first + previous.shape[-1] - a] = previous[..., a - first :]
            wave, angles = griffin_lim_from(magnitude, angles, self.window, self.mel.n_fft, hop, self.n_iter,
                                            self.momentum)  # -> (B, (b - a - 1) * hop)
            carried = (a, angles)
            # This block's samples from the seam at `start` on, and into the overlap for the crossfade.
            piece = wave[:, (start - a) * hop : (end - a) * hop + (fade if end < total else wave.shape[-1])]
            at = start * hop
            piece = piece[:, : max(0, out.shape[-1] - at)]
            if start:  # fade in over the previous block's tail, already in `out`
                n = min(fade, piece.shape[-1])
                out[:, at : at + n] *= 1 - ramp[:n]
                out[:, at : at + n] += piece[:, :n] * ramp[:n]
                out[:, at + n : at + piece.shape[-1]] = piece[:, n:]
            else:
                out[:, : piece.shape[-1]] = piece
        return out.reshape(batch + out.shape[-1:])


def griffin_lim_from(magnitude: Tensor, angles: Tensor, window: Tensor, n_fft: int, hop: int, n_iter: int,
                     momentum: float) -> tuple[Tensor, Tensor]:
    """Fast Griffin-Lim (Perraudin et al. 2013) from given initial phases: torchaudio's
    `functional.griffinlim`, which can only start from random or zero phase.

    Args:
        magnitude: (B, n_fft/2+1, T) STFT magnitudes.
        angles: (B, n_fft/2+1, T) complex initial phases.
        window, n_fft, hop: the STFT's.
        n_iter, momentum: as GriffinLimVocoder's.

    Returns:
        The (B, (T - 1) * hop) waveform and the (B, n_fft/2+1, T) unit-modulus phases it was made with.
    """
    momentum = momentum / (1 + momentum)
    length = (magnitude.shape[-1] - 1) * hop
    previous = None
    for _ in range(n_iter):
        inverse = torch.istft(magnitude * angles, n_fft, hop, n_fft, window, length=length)
        rebuilt = torch.stft(inverse, n_fft, hop, n_fft, window, center=True, pad_mode="reflect", normalized=False,
                             onesided=True, return_complex=True)
        angles = rebuilt - previous * momentum if previous is not None and momentum else rebuilt
        angles = angles / (angles.abs() + 1e-16)
        previous = rebuilt
    return torch.istft(magnitude * angles, n_fft, hop, n_fft, window, length=length), angles


def stft_magnitude(wave: Tensor, mel: MelSettings) -> Tensor:
    """(..., samples) -> (..., n_fft/2+1, frames) STFT magnitude with the Hann window and hop of `mel`."""
    window = torch.hann_window(mel.n_fft, device=wave.device)
    flat = wave.reshape(-1, wave.shape[-1])
    spec = torch.stft(flat, mel.n_fft, mel.hop_length, window=window, return_complex=True).abs()
    return spec.reshape(wave.shape[:-1] + spec.shape[-2:])


def waveform_spectral_convergence(estimate: Tensor, reference: Tensor, mel: MelSettings,
                                  in_band: bool = False) -> float:
    """||S - S_hat||_F / ||S||_F between the STFT magnitudes of two waveforms (0 = identical).

    Args:
        estimate, reference: (samples,) at `mel.sample_rate`; the longer is cut to the shorter,
            so frames line up.
        mel: the STFT size and hop (and, for `in_band`, the filterbank).
        in_band: only the STFT bins some mel filter covers. With f_min 0 the DC bin is outside
            every filter, and a recording with strong sub-bass (one measured track keeps 33 % of
            its STFT energy there) is dominated by what the features never see.
    """
    n = min(estimate.shape[-1], reference.shape[-1])
    ref = stft_magnitude(reference[..., :n].double(), mel)
    est = stft_magnitude(estimate[..., :n].double(), mel)
    if in_band:
        covered = (mel_filterbank(mel).sum(dim=1) > 0).to(ref.device)  # (freq,)
        ref, est = ref[..., covered, :], est[..., covered, :]
    return float(torch.linalg.vector_norm(ref - est) / torch.linalg.vector_norm(ref))


def griffin_lim_ceiling(wave: Tensor, mel: MelSettings, n_iter: int = 64,
                        vocoder: Optional[nn.Module] = None) -> dict[str, float]:
    """How close audio made from a perfect log-mel can get to the recording it came from.

    The recording's own log-mel is inverted with GriffinLimVocoder (or `vocoder`) and compared
    with it by `waveform_spectral_convergence`: no model can sound better than this through this vocoder.

    Args:
        wave: (samples,) mono waveform at `mel.sample_rate`.
        mel: the mel settings to measure.
        n_iter: Griffin-Lim iterations.
        vocoder: another vocoder of the same interface made for `mel` (a VocosVocoder) to measure instead.

    Returns:
        ``spectral_convergence`` over every STFT bin, and ``in_band`` over the bins the mel
        filters cover.
    """
    with torch.inference_mode():
        log_mel = LogMel(mel).to(wave.device)(wave)  # (samples,) -> (n_mels, T)
        vocoder = vocoder if vocoder is not None else GriffinLimVocoder(mel, n_iter=n_iter).to(wave.device)
        inverted = vocoder(log_mel, length=wave.shape[-1])
        return {"spectral_convergence": waveform_spectral_convergence(inverted, wave, mel),
                "in_band": waveform_spectral_convergence(inverted, wave, mel, in_band=True)}


def measure_ceiling(audio_path: str | os.PathLike, mel: MelSettings, offset: float = 0.0,
                    seconds: Optional[float] = 30.0, griffin_lim_iters: int = 64,
                    device: str = "cpu", vocoder: Optional[nn.Module] = None) -> dict[str, Any]:
    """The Griffin-Lim ceiling (`griffin_lim_ceiling`) measured on an excerpt of a recording.

    Args:
        audio_path: any file audio.py decodes.
        mel: the mel settings to measure (the project's defaults, or a checkpoint's).
        offset: start of the excerpt, seconds.
        seconds: its length; None for the rest of the file.
        griffin_lim_iters: Griffin-Lim iterations.
        device: where to invert.
        vocoder: a vocoder made for `mel` to measure instead of Griffin-Lim (already on `device`).

    Returns:
        ``spectral_convergence`` and ``in_band`` (see `griffin_lim_ceiling`), the excerpt's
        ``seconds`` and the settings measured.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here; use --device cpu")
    rate, blocks = decode_blocks(audio_path)
    # Cut at the native rate, block by block: only the excerpt is kept, and resampled, however
    # long the recording (a three-hour one is 1.9 GB decoded).
    start = int(offset * rate)
    end = None if seconds is None else start + int(seconds * rate)
    kept, total = [], 0
    for block in blocks:
        a, b = max(start, total), total + len(block) if end is None else min(end, total + len(block))
        if a < b:
            kept.append(block[a - total : b - total])
        total += len(block)
        if end is not None and total >= end:
            break  # the rest is not needed
    excerpt = np.concatenate(kept) if kept else np.zeros(0, np.float32)
    if excerpt.size < mel.n_fft or not excerpt.any():
        length = f" of {total / rate:.2f} s" if end is None or total < end else ""
        raise DataError(f"{audio_path}: the excerpt at {offset:g} s ({excerpt.size / rate:.2f} s{length}) is empty, "
                        "silent or shorter than one STFT window")
    with torch.inference_mode():
        excerpt_t = resample(torch.from_numpy(excerpt), rate, mel.sample_rate).to(device)
    return {**griffin_lim_ceiling(excerpt_t, mel, griffin_lim_iters, vocoder), "seconds": excerpt.size / rate,
            "offset": offset, "griffin_lim_iters": griffin_lim_iters, "mel": mel.to_dict()}
