"""Waveform metrics of `evaluate`: the vocoded reconstruction against the original audio, beside the
vocoder's own ceiling (the same vocoder on the recording's un-encoded log-mel).

All other scores are on log-mels; these say how the audio a user hears compares with the recording.
Griffin-Lim's phase dominates both scores (its phase is not the recording's), so a model's number
means something only beside the ceiling, which the report always prints with it.

The math (`multi_resolution_stft`, `si_sdr`) is pure functions on waveforms; `waveform_metrics`
picks the windows, reads their audio and runs the vocoder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio

from musicvae.audio.decode import AUDIO_SUFFIXES, decode_blocks
from musicvae.audio.mel import resample
from musicvae.audio.neural_vocoder import make_vocoder
from musicvae.data.datamodule import MelDataModule
from musicvae.io.tables import markdown_table
from musicvae.training.module import MusicVAEModule

#: STFT sizes of the multi-resolution distance, each with a Hann window of its own size and a hop of a
#: quarter: short frames see onsets, long ones pitch (Yamamoto et al. 2020, arXiv:1910.11480, use three
#: resolutions for the same reason).
FFT_SIZES = (512, 1024, 2048)
#: Windows scored by default: enough to average out one odd window, few enough that Griffin-Lim on
#: them (twice: model and ceiling) stays a small part of `evaluate`.
DEFAULT_CLIPS = 8
#: Griffin-Lim iterations, the vocoder's default for every other command.
GRIFFIN_LIM_ITERS = 64
#: Native samples read beyond each excerpt on both sides, so that resampling the excerpt gives the
#: samples resampling the whole file gave (torchaudio's default sinc kernel reaches ~14 input samples).
_MARGIN = 1024
NOT_AUDIO = "the data folder holds mel arrays, not audio"


def multi_resolution_stft(estimate: Tensor, reference: Tensor, fft_sizes: tuple[int, ...] = FFT_SIZES,
                          eps: float = 1e-8) -> dict[str, Tensor]:
    """Multi-resolution STFT distance per clip (0 for identical signals; larger is further).

    At each resolution, spectral convergence ||S - S_hat||_F / ||S||_F plus the mean absolute
    difference of the log magnitudes (Arik et al. 2018, arXiv:1808.06719), then the average over
    resolutions: the definition of Yamamoto et al. 2020 and of auraloss's MultiResolutionSTFTLoss,
    but per clip rather than pooled over a batch.

    Args:
        estimate, reference: (B, samples) waveforms of one length.
        fft_sizes: STFT sizes; those longer than the clips are left out.
        eps: floor of the squared magnitudes, as auraloss's, so silent bins have a finite log.

    Returns:
        ``total``, ``spectral_convergence`` and ``log_magnitude``, each (B,) float64.
    """
    if estimate.shape != reference.shape or estimate.dim() != 2:
        raise ValueError(f"expected two (B, samples) waveforms of one shape, got {tuple(estimate.shape)} "
                         f"and {tuple(reference.shape)}")
    sizes = [n for n in fft_sizes if n <= reference.shape[-1]]
    if not sizes:
        raise ValueError(f"clips of {reference.shape[-1]} samples are shorter than every STFT size {fft_sizes}")
    sc, log_mag = [], []
    for n_fft in sizes:
        window = torch.hann_window(n_fft, dtype=torch.float64, device=reference.device)
        est, ref = (torch.stft(w.double(), n_fft, n_fft // 4, window=window, return_complex=True)
                    .abs().square().clamp_min(eps).sqrt() for w in (estimate, reference))  # -> (B, freq, frames)
        sc.append(torch.linalg.vector_norm(ref - est, dim=(1, 2)) / torch.linalg.vector_norm(ref, dim=(1, 2)))
        log_mag.append((ref.log() - est.log()).abs().mean(dim=(1, 2)))
    parts = {"spectral_convergence": torch.stack(sc).mean(0), "log_magnitude": torch.stack(log_mag).mean(0)}
    return {"total": parts["spectral_convergence"] + parts["log_magnitude"], **parts}


def si_sdr(estimate: Tensor, reference: Tensor) -> Tensor:
    """Scale-invariant signal-to-distortion ratio in dB per clip (Le Roux et al. 2019, arXiv:1811.02508),
    both signals made zero-mean first; higher is better, and any gain on `estimate` leaves it unchanged.

    Args:
        estimate, reference: (B, samples) waveforms of one length.

    Returns:
        (B,) float64 dB.
    """
    return scale_invariant_signal_distortion_ratio(estimate.double(), reference.double(), zero_mean=True)


def pick_windows(candidates: np.ndarray, clips: int) -> np.ndarray:
    """At most `clips` of the dataset rows `candidates`, evenly spread over them (so over the
    recordings, which the rows follow in order), the same on every run."""
    if clips <= 0 or len(candidates) == 0:
        return candidates[:0]
    return candidates[np.unique(np.linspace(0, len(candidates) - 1, min(clips, len(candidates))).round().astype(int))]


def read_excerpts(path: str | Path, sample_rate: int, starts: list[int], length: int) -> Tensor:
    """Excerpts of an audio file, mixed to mono and resampled, read in one pass in bounded memory.

    Each is the slice [start, start + length) of the whole file resampled to `sample_rate`: the
    native samples it needs (plus a margin for the resampling kernel) are resampled alone, starting
    at a native sample that maps onto an output sample exactly.

    Args:
        path: the audio file.
        sample_rate: the rate `starts` and `length` count in.
        starts, length: the excerpts, in samples at `sample_rate`.

    Returns:
        (len(starts), length) float32, zero past the end of the file.

    Raises:
        AudioError: see decode_blocks.
    """
    rate, blocks = decode_blocks(path)
    g = math.gcd(rate, sample_rate)
    step_in, step_out = rate // g, sample_rate // g  # native and output samples of one aligned step
    ranges = []
    for start in starts:
        first = max(0, start - _MARGIN * sample_rate // rate) // step_out  # in aligned steps
        a = first * step_in
        ranges.append((a, a + math.ceil((start + length - first * step_out) * rate / sample_rate) + _MARGIN,
                       start - first * step_out))
    kept: list[list[np.ndarray]] = [[] for _ in ranges]
    end, total = max(b for _, b, _ in ranges), 0
    for block in blocks:
        for (a, b, _), pieces in zip(ranges, kept):
            if max(a, total) < min(b, total + len(block)):
                pieces.append(block[max(a, total) - total : min(b, total + len(block)) - total])
        total += len(block)
        if total >= end:
            break
    out = torch.zeros(len(starts), length)
    for row, ((_, _, skip), pieces) in enumerate(zip(ranges, kept)):
        wave = resample(torch.from_numpy(np.concatenate(pieces or [np.zeros(0, np.float32)])), rate, sample_rate)
        piece = wave[skip : skip + length]
        out[row, : len(piece)] = piece
    return out


def audio_file(datamodule: MelDataModule, file_index: int) -> Optional[Path]:
    """The audio file behind the data module's recording `file_index`; None for a mel array."""
    rel = datamodule.sources[file_index].rel
    if datamodule.data_dir is None or Path(rel).suffix.lower() not in AUDIO_SUFFIXES:
        return None
    return datamodule.data_dir / rel


@torch.no_grad()
def waveform_metrics(module: MusicVAEModule, dataset: Dataset, datamodule: MelDataModule, clips: int = DEFAULT_CLIPS,
                     alpha: float = 0.0, device: str = "cpu") -> dict[str, Any]:
    """SI-SDR and the multi-resolution STFT distance of vocoded reconstructions against the original
    audio, beside the ceiling: the same vocoder on the recording's own log-mel.

    Args:
        module: the trained module (eval mode).
        dataset: the evaluated SegmentDataset, whose rows `(file, start frame, ...)` index
            `datamodule.sources`.
        datamodule: the data module it came from (the mel settings, normalisation and files).
        clips: windows to score, evenly spread over the windows of audio recordings; 0 turns it off.
        alpha: a compensation strength also scored, when positive.
        device: where the model and the vocoder run.

    Returns:
        ``clips`` (windows scored), and with audio: ``seconds_per_clip``, ``vocoder``, ``fft_sizes``,
        ``si_sdr_db``, ``mrstft``, ``spectral_convergence`` and ``log_magnitude``, each
        ``{"model", "ceiling"}`` (plus ``"compensated"`` at `alpha` > 0) averaged over the windows,
        and ``windows`` (file and start frame of each); without: ``not_available``, the reason.
    """
    if clips <= 0:
        return {"clips": 0, "not_available": "turned off by --waveform_clips 0"}
    files = {int(f): audio_file(datamodule, int(f)) for f in np.unique(dataset.items[:, 0])}
    candidates = np.flatnonzero([files[int(f)] is not None for f in dataset.items[:, 0]])
    rows = pick_windows(candidates, clips)
    if len(rows) == 0:
        return {"clips": 0, "not_available": NOT_AUDIO}
    mel = datamodule.mel
    length = (datamodule.frames - 1) * mel.hop_length  # what the vocoder makes of `frames` frames
    reference = torch.zeros(len(rows), length)
    for file_index in sorted({int(dataset.items[r, 0]) for r in rows}):
        mine = [i for i, r in enumerate(rows) if dataset.items[r, 0] == file_index]
        starts = [int(dataset.items[rows[i], 1]) * mel.hop_length for i in mine]  # frame t is centred on sample t * hop
        reference[mine] = read_excerpts(files[file_index], mel.sample_rate, starts, length)
    x = torch.stack([dataset[int(r)] for r in rows]).to(device)  # (clips, 1, n_mels, frames), normalised
    x_hat = module.vae.decode(module.vae.encode(x)[0])  # the posterior mean, as every other score
    mels = {"model": x_hat, "ceiling": x}
    if alpha > 0:
        mels["compensated"] = module.compensated(x_hat, alpha)
    vocoder = make_vocoder(mel, GRIFFIN_LIM_ITERS, device=device)
    reference = reference.to(device)
    scores: dict[str, dict[str, float]] = {"si_sdr_db": {}, "mrstft": {}, "spectral_convergence": {},
                                           "log_magnitude": {}}
    for name, m in mels.items():
        wave = vocoder(datamodule.normalizer.inverse(m[:, 0]), length=length)  # (clips, n_mels, frames) -> (clips, length)
        distance = multi_resolution_stft(wave, reference)
        scores["si_sdr_db"][name] = float(si_sdr(wave, reference).mean())
        scores["mrstft"][name] = float(distance["total"].mean())
        for part in ("spectral_convergence", "log_magnitude"):
            scores[part][name] = float(distance[part].mean())
    return {"clips": len(rows), "seconds_per_clip": length / mel.sample_rate,
            "vocoder": f"Griffin-Lim, {GRIFFIN_LIM_ITERS} iterations",
            "fft_sizes": [n for n in FFT_SIZES if n <= length], **scores,
            "windows": [{"file": datamodule.sources[int(dataset.items[r, 0])].rel, "start_frame": int(dataset.items[r, 1])}
                        for r in rows]}


def waveform_lines(metrics: dict[str, Any]) -> list[str]:
    """The report's section on the waveform metrics (none when `metrics` has none)."""
    wave = metrics.get("waveform")
    if wave is None:
        return []
    lines = ["## Waveform metrics", ""]
    if "not_available" in wave:
        return lines + [f"Not available ({wave['not_available']}).", ""]
    names = [n for n in ("model", "compensated", "ceiling") if n in wave["si_sdr_db"]]
    labels = {"model": "model (alpha 0)", "compensated": f"model (alpha {metrics['compensation']['alpha']:g})",
              "ceiling": "vocoder alone (ceiling)"}
    return lines + [
        f"{wave['clips']} windows of {wave['seconds_per_clip']:.2f} s, vocoded by {wave['vocoder']}, against the "
        "original audio. The ceiling is the same vocoder on the recording's own log-mel: Griffin-Lim's phase "
        "dominates both scores, so a model's number says something only beside it.", "",
        *markdown_table(("metric", *(labels[n] for n in names)), [
            ("SI-SDR (dB, higher is better)", *(f"{wave['si_sdr_db'][n]:.2f}" for n in names)),
            ("multi-resolution STFT (lower is better)", *(f"{wave['mrstft'][n]:.3f}" for n in names))]), ""]


def waveform_summary(wave: dict[str, Any]) -> str:
    """One line for the console: the model's scores beside the vocoder's ceiling."""
    if "not_available" in wave:
        return f"waveform metrics: not available ({wave['not_available']})"
    return (f"waveform ({wave['clips']} windows, {wave['vocoder']}): SI-SDR {wave['si_sdr_db']['model']:.2f} dB "
            f"(vocoder alone {wave['si_sdr_db']['ceiling']:.2f} dB), multi-resolution STFT {wave['mrstft']['model']:.3f} "
            f"(vocoder alone {wave['mrstft']['ceiling']:.3f})")
