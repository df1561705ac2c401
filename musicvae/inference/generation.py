"""Hearing what a trained model does: reconstruct a whole recording, sample from the prior, and
morph between two recordings through the latent space (`scripts/generate.py`).

Tensor functions first (cutting a piece into segments and overlap-adding them back; latent paths
are in latent_paths.py), then `GenerationModel`, which carries a checkpoint's module, mel settings,
normalisation and learned prior (priors.py), then the file-level functions the script calls; each
writes WAVs and a PNG. Everything but prior samples is decoded from posterior means, so the same
inputs always give the same outputs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import soundfile as sf
import torch
from matplotlib.figure import Figure
from torch import Tensor

from musicvae.audio.mel import AUDIO_SUFFIXES, LogMelStream, MelSettings, decode_blocks
from musicvae.training.checkpoints import DATA_STATE_KEY
from musicvae.errors import CheckpointError, ConfigError, DataError
from musicvae.io.outputs import check_output_file, check_output_folder, write_output_to
from musicvae.inference.detail import (SOURCES, CodeDetail, check_source, check_strength, checkpoint_detail,
                                      piece_detail, with_detail)
from musicvae.inference.latent_paths import latent_path
from musicvae.inference.loading import load_module, resolve_alpha
from musicvae.inference.priors import check_choice, choose_prior, describe, path_log_density, read_prior
from musicvae.models.prior import MixturePrior, StandardPrior
from musicvae.training.module import MusicVAEModule
from musicvae.plots import mel_comparison_figure, mel_grid_figure
from musicvae.data.segments import ARRAY_SUFFIXES, Normalizer, load_mel_array, segment_starts
from musicvae.audio.neural_vocoder import make_vocoder

#: Crossfade between the steps of a morph: long enough to hide the cut, short against a segment.
CROSSFADE_SECONDS = 0.05
#: Peak a written WAV is scaled down to when it would clip (16-bit PCM stops at 1.0).
MAX_PEAK = 0.99


# --- segments of a whole piece ------------------------------------------------------------------

def overlap_add(segments: Tensor, starts: list[int], total: int) -> Tensor:
    """Blend overlapping segments (N, n_mels, frames) into one (n_mels, total) by a normalised Hann window.

    Each frame is the window-weighted mean of the segments covering it, so the result passes
    from one segment to the next by a smooth crossfade, with no seam where a segment ends.
    """
    out, weight = segments.new_zeros(segments.shape[-2], total), segments.new_zeros(total)
    add_segments(out, weight, segments, starts)
    return out / weight


def add_segments(out: Tensor, weight: Tensor, segments: Tensor, starts: list[int]) -> None:
    """Add (N, n_mels, frames) segments, windowed, into the sums `out` (n_mels, T) and `weight` (T,)."""
    frames = segments.shape[-1]
    # Hann of frames + 2 without its zero ends: every frame keeps a positive weight, so the first
    # and last frames of the piece (covered by one segment only) are that segment, not 0/0.
    window = torch.hann_window(frames + 2, periodic=False, dtype=segments.dtype, device=segments.device)[1:-1]
    for segment, start in zip(segments, starts):
        out[:, start : start + frames] += segment * window
        weight[start : start + frames] += window


# --- a checkpoint ready to generate -------------------------------------------------------------

@dataclass
class GenerationModel:
    """A trained module with the features and normalisation it was trained on.

    Attributes:
        module: the MusicVAEModule, in eval mode.
        mel: the checkpoint's mel settings.
        frames: frames per segment.
        normalizer: the training split's normalisation (from the checkpoint).
        alpha: variance-compensation strength of every decoded output (musicvae/compensation.py;
            0: the plain decoder output).
        learned_prior: the learned prior the checkpoint carries (musicvae/inference/priors.py), or None.
        detail, detail_strength: generated detail (musicvae/inference/detail.py) and its strength (0: none).
    """

    module: MusicVAEModule
    mel: MelSettings
    frames: int
    normalizer: Normalizer
    alpha: float = 0.0
    learned_prior: Optional[MixturePrior] = None
    detail: Optional[CodeDetail] = None
    detail_strength: float = 0.0

    @property
    def prior(self) -> MixturePrior:
        """The learned prior, or N(0, I) (StandardPrior) for a checkpoint without one."""
        dim = int(self.module.hparams.latent_dim)
        return self.learned_prior if self.learned_prior is not None else StandardPrior(dim)

    @property
    def mean(self) -> float:
        return self.normalizer.mean

    @property
    def std(self) -> float:
        return self.normalizer.std

    @property
    def device(self) -> torch.device:
        return self.module.device

    def normalize(self, log_mel: Tensor) -> Tensor:
        return self.normalizer(log_mel)

    def denormalize(self, x: Tensor) -> Tensor:
        return self.normalizer.inverse(x)

    @torch.no_grad()
    def encode_windows(self, x: Tensor) -> Tensor:
        """Posterior means of normalised windows (the window-level step under `musicvae.load(...).encode`, which
        takes audio): (B, 1, n_mels, frames) -> (B, latent_dim)."""
        return self.module.vae.encode(x.to(self.device))[0]

    @torch.no_grad()
    def decode_windows(self, z: Tensor) -> Tensor:
        """(B, latent_dim) -> (B, 1, n_mels, frames) normalised log-mels, compensated at `alpha`."""
        decoded = self.module.vae.decode(z.to(self.device))
        return self.module.compensated(decoded, self.alpha) if self.alpha > 0 else decoded

    def vocoder(self, n_iter: int, vocoder: Optional[str | os.PathLike] = None,
                vocoder_weights: Optional[str | os.PathLike] = None, source: str = "the checkpoint") -> torch.nn.Module:
        """Griffin-Lim with `n_iter` iterations, or the Vocos download `vocoder` (musicvae/audio/neural_vocoder.py),
        refused unless it was trained on this checkpoint's mel settings."""
        return make_vocoder(self.mel, n_iter, vocoder, vocoder_weights, self.device, source)


def load_generation_model(ckpt_path: str | os.PathLike, device: str = "cpu",
                          alpha: Optional[float | str] = 0.0, detail: float = 0.0,
                          detail_source: str = SOURCES[0]) -> GenerationModel:
    """Load a checkpoint for generation, decoding at compensation strength `alpha` (a number in [0, 1],
    or "perceptual": see musicvae.inference.loading.resolve_alpha), with detail at strength `detail` whose
    texture comes from `detail_source` (musicvae.models.detail.SOURCES).

    Raises:
        CheckpointError: missing or unreadable, or without the mel settings and statistics
            that turn the model's outputs back into sound.
    """
    module, ckpt = load_module(ckpt_path, device)
    state = ckpt[DATA_STATE_KEY]
    missing = [k for k in ("mel", "mean", "std") if k not in state]
    if missing:
        raise CheckpointError(f"{ckpt_path}: the checkpoint's {DATA_STATE_KEY} state lacks {missing}, so its outputs "
                              "cannot be turned back into audio (written by an older musicvae? retrain or re-save it)")
    mel = MelSettings.from_dict(state["mel"], source=f"{ckpt_path} mel settings")
    frames = int(state.get("frames", module.hparams.frames))
    if mel.n_mels != module.hparams.n_mels or frames != module.hparams.frames:
        raise CheckpointError(f"{ckpt_path}: the data state ({mel.n_mels} mels x {frames} frames) does not match the "
                              f"model ({module.hparams.n_mels} x {module.hparams.frames})")
    return GenerationModel(module, mel, frames, Normalizer(state["mean"], state["std"]), resolve_alpha(module, alpha),
                           read_prior(ckpt, int(module.hparams.latent_dim), ckpt_path),
                           checkpoint_detail(module, ckpt, ckpt_path, texture=check_source(detail_source))
                           if check_strength(detail) else None, detail)


# --- mels in, mels out --------------------------------------------------------------------------

def load_log_mel(path: str | os.PathLike, mel: MelSettings) -> tuple[Tensor, int]:
    """A recording as (n_mels, T) natural-log mel power: audio files through `mel`, arrays as they are.

    Returns:
        The log-mel and the recording's length in samples at `mel.sample_rate` (for an array,
        (T - 1) * hop_length, the length whose centred STFT has T frames).

    Raises:
        DataError: unreadable, silent, too short, non-finite, or an array of other mel bins.
    """
    path = Path(path)
    if path.suffix.lower() in ARRAY_SUFFIXES:
        array = torch.from_numpy(np.array(load_mel_array(path, mel.n_mels), dtype=np.float32))
        if array.shape[-1] == 0:
            raise DataError(f"{path}: the array has no frames")
        if not torch.isfinite(array).all():
            raise DataError(f"{path}: the array contains NaN or Inf")
        if array.max() <= array.min():
            raise DataError(f"{path}: silent (the log-mel is constant at {float(array.min()):.3g})")
        return array, (array.shape[-1] - 1) * mel.hop_length
    if path.suffix.lower() not in AUDIO_SUFFIXES and path.is_file():
        raise DataError(f"{path}: unknown file type; use audio ({', '.join(AUDIO_SUFFIXES)}) or a .npy log-mel")
    rate, blocks = decode_blocks(path)
    stream = LogMelStream(blocks, rate, mel, source=str(path))  # the cache's block-wise path, in bounded memory
    return torch.from_numpy(stream.joined()), stream.resampled


def pad_to(log_mel: Tensor, frames: int, floor: float) -> Tensor:
    """(n_mels, T) -> (n_mels, max(T, frames)), padded at the end with silence (the log floor)."""
    if log_mel.shape[-1] >= frames:
        return log_mel
    return torch.nn.functional.pad(log_mel, (0, frames - log_mel.shape[-1]), value=floor)


def reconstruct_mel(model: GenerationModel, log_mel: Tensor, hop: Optional[int] = None,
                    batch_size: int = 32, seed: int = 0) -> Tensor:
    """Reconstruct a piece of any length through the model, segment by segment.

    Args:
        model: the loaded checkpoint.
        log_mel: (n_mels, T) natural-log mel power of the whole piece.
        hop: frames between segment starts; default half a segment.
        batch_size: segments per forward pass.

    Returns:
        (n_mels, T) natural-log mel power: each segment decoded from its posterior mean, the
        normalised outputs overlap-added (see `overlap_add`), detail from `seed` added, denormalised once.
    """
    hop = hop or max(1, model.frames // 2)
    if not 1 <= hop <= model.frames:
        raise ConfigError(f"--hop {hop}: must be 1..{model.frames} (a segment) so that segments leave no gaps")
    total = log_mel.shape[-1]
    padded = pad_to(log_mel.float(), model.frames, model.mel.log_floor_value)
    starts = segment_starts(padded.shape[-1], model.frames, hop)
    joined, weight, codes = padded.new_zeros(padded.shape), padded.new_zeros(padded.shape[-1]), []
    # Batch by batch into running sums: a three-hour piece's segments at half overlap are twice its
    # log-mel (1 GB at 128 mels), their outputs as much again.
    for i in range(0, len(starts), batch_size):
        batch = starts[i : i + batch_size]
        x = torch.stack([model.normalize(padded[:, s : s + model.frames]) for s in batch])[:, None]  # -> (B, 1, n_mels, frames)
        codes.append(model.encode_windows(x))
        add_segments(joined, weight, model.decode_windows(codes[-1]).to(joined.device)[:, 0], batch)
    joined = joined / weight
    if model.detail_strength > 0:  # one noise over the whole piece (piece_detail), so overlaps keep its energy
        joined += model.detail_strength * piece_detail(model.detail, torch.cat(codes), starts, model.frames,
                                                       joined.shape[-1], add_segments, torch.Generator().manual_seed(seed))
    return model.denormalize(joined[:, :total])  # (n_mels, T') -> (n_mels, T)


def segment_at(log_mel: Tensor, offset_s: float, frames: int, mel: MelSettings, source: str) -> tuple[Tensor, float]:
    """The `frames`-long segment of a (n_mels, T) log-mel starting `offset_s` seconds in.

    An offset too close to the end is moved back so the segment fits; a piece shorter than a
    segment is padded with silence.

    Returns:
        (n_mels, frames) and the offset actually used, in seconds.
    """
    start = int(round(offset_s * mel.frames_per_second))
    total = log_mel.shape[-1]
    if offset_s < 0 or start >= total:
        raise ConfigError(f"{source}: offset {offset_s:g} s is outside the recording (0 to {total / mel.frames_per_second:.2f} s)")
    start = max(0, min(start, total - frames))
    return pad_to(log_mel, frames, mel.log_floor_value)[:, start : start + frames], start / mel.frames_per_second


# --- writing ------------------------------------------------------------------------------------

def audio_format(path: str | os.PathLike) -> str:
    """soundfile's name of the format `path`'s suffix asks for (`.wav` -> "WAV"), checked to take 16-bit PCM.

    Raises:
        ConfigError: a suffix soundfile cannot write 16-bit PCM to (`.txt`, `.mp3`, none).
    """
    name = Path(path).suffix[1:].upper()
    if not name or not sf.check_format(name, "PCM_16"):
        raise ConfigError(f"--out {path}: not the name of an audio file 16-bit PCM can be written to; "
                          "name a .wav file (or .flac, .aiff)")
    return name


def write_wav(path: Path, wave: Tensor, sample_rate: int) -> float:
    """Write a mono waveform as 16-bit PCM (the format its suffix names, see `audio_format`), whole or
    not at all; returns the gain applied (< 1 only when it would clip).

    Raises:
        StorageError: the machine refused the write.
    """
    wave = wave.detach().float().cpu()
    peak = float(wave.abs().max()) if wave.numel() else 0.0
    gain = MAX_PEAK / peak if peak > MAX_PEAK else 1.0
    samples, kind = (wave * gain).numpy(), audio_format(path)
    write_output_to(path, lambda tmp: sf.write(tmp, samples, sample_rate, subtype="PCM_16", format=kind))
    return gain


def _for_display(log_mel: Tensor, columns: int = 4800) -> Tensor:
    """(n_mels, T) -> (n_mels, <= columns): means of runs of frames, for a figure at most 2400 pixels wide;
    a three-hour piece has 930,000 frames."""
    group = -(-log_mel.shape[-1] // columns)
    if group == 1:
        return log_mel
    usable = log_mel.shape[-1] // group * group
    return log_mel[:, :usable].reshape(log_mel.shape[0], -1, group).mean(-1)


def crossfade_concat(waves: list[Tensor], fade: int) -> Tensor:
    """Join (samples,) waveforms, each overlapping the next by `fade` samples with an equal-power fade.

    Equal power (sin/cos) rather than linear: consecutive steps are different sounds, whose
    powers add, so a linear fade would dip by 3 dB in the middle.
    """
    fade = min(fade, *(w.shape[-1] // 2 for w in waves))
    ramp = torch.sin(torch.linspace(0.0, math.pi / 2, fade)) if fade else torch.zeros(0)
    out = waves[0]
    for wave in waves[1:]:
        mixed = out[out.shape[-1] - fade :] * ramp.flip(0) + wave[:fade] * ramp
        out = torch.cat([out[: out.shape[-1] - fade], mixed, wave[fade:]])
    return out


def save_figure(fig: Figure, path: Path) -> Path:
    return write_output_to(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def sample_names(n: int) -> list[str]:
    """The files `sample_files` writes into its folder."""
    return [f"sample_{i:02d}.wav" for i in range(n)] + ["samples.png"]


def interpolation_names(steps: int) -> list[str]:
    """The files `interpolate_files` writes into its folder."""
    return [f"step_{i:02d}.wav" for i in range(steps)] + ["morph.wav", "interpolation.png"]


def _inputs(ckpt_path: Any, *paths: Any) -> list[str | os.PathLike]:
    """The files a generation reads, none of which an output may replace."""
    return [p for p in (ckpt_path, *paths) if p]


# --- the three things a user can hear -----------------------------------------------------------

def reconstruct_file(ckpt_path: str | os.PathLike, input_path: str | os.PathLike, out_wav: str | os.PathLike,
                     device: str = "cpu", griffin_lim_iters: int = 64, hop: Optional[int] = None,
                     alpha: Optional[float | str] = 0.0, vocoder: Optional[str | os.PathLike] = None,
                     vocoder_weights: Optional[str | os.PathLike] = None, force: bool = False,
                     detail: float = 0.0, seed: int = 0, detail_source: str = SOURCES[0]) -> dict[str, Any]:
    """Reconstruct a whole recording through a checkpoint; write `out_wav` and a PNG beside it.

    The piece's mel is reconstructed by `reconstruct_mel` and inverted once, so the audio has no seams
    between segments; by Griffin-Lim, or by the Vocos download `vocoder` (with its weights file
    `vocoder_weights` when not beside its config), detail at `detail` (texture `detail_source`) from
    `seed`. Returns the paths written and the piece's length.

    Raises:
        ConfigError: before any work, when `out_wav` is not an audio file name, cannot be written,
            is an input, or exists (it or the PNG) and `force` is off.
    """
    if not os.path.isdir(out_wav):  # a folder is refused as one, below
        audio_format(out_wav)
    inputs = _inputs(ckpt_path, input_path, vocoder, vocoder_weights)
    out_wav = check_output_file(out_wav, "--out", inputs, force)
    check_output_file(out_wav.with_suffix(".png"), "--out", inputs, force)
    model = load_generation_model(ckpt_path, device, alpha, detail, detail_source)
    synthesise = model.vocoder(griffin_lim_iters, vocoder, vocoder_weights, str(ckpt_path))  # refused before any work
    log_mel, samples = load_log_mel(input_path, model.mel)
    recon = reconstruct_mel(model, log_mel.to(model.device), hop, seed=seed)
    with torch.inference_mode():
        wave = synthesise(recon.to(model.device), length=samples)
    gain = write_wav(out_wav, wave, model.mel.sample_rate)
    fig = mel_comparison_figure(model.normalize(_for_display(log_mel))[None], model.normalize(_for_display(recon.cpu()))[None],
                                f"{Path(input_path).name}: input (top) and reconstruction"
                                + (f", variance compensation alpha {model.alpha:g}" if model.alpha else "")
                                + (f", detail {detail:g}" if detail else ""))
    fig.set_size_inches(min(24.0, max(6.0, log_mel.shape[-1] / 100)), 5.2)  # long pieces get a wide figure
    png = save_figure(fig, out_wav.with_suffix(".png"))
    return {"wav": str(out_wav), "png": str(png), "frames": int(log_mel.shape[-1]), "samples": int(wave.shape[-1]),
            "seconds": wave.shape[-1] / model.mel.sample_rate, "gain": gain}


def sample_files(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, n: int = 8, temperature: float = 1.0,
                 seed: Optional[int] = None, device: str = "cpu", griffin_lim_iters: int = 64,
                 alpha: Optional[float | str] = 0.0, vocoder: Optional[str | os.PathLike] = None,
                 vocoder_weights: Optional[str | os.PathLike] = None, force: bool = False,
                 prior: str = "auto", detail: float = 0.0, detail_source: str = SOURCES[0]) -> dict[str, Any]:
    """Decode `n` draws of the prior `prior` names (musicvae.inference.priors) at `temperature` (musicvae.models.prior),
    detail at `detail` (texture `detail_source`) after them (both from `seed`); write `sample_XX.wav` and `samples.png` (audio by Griffin-Lim, or
    by the Vocos download `vocoder`: see `reconstruct_file`), refusing before any work a folder holding them unless `force`."""
    if n < 1 or temperature < 0:
        raise ConfigError(f"-n {n} / --temperature {temperature}: draw at least one sample, at a temperature >= 0")
    check_choice(prior)
    out = check_output_folder(out_dir, sample_names(n), "--out", _inputs(ckpt_path, vocoder, vocoder_weights), force)
    model = load_generation_model(ckpt_path, device, alpha, detail, detail_source)
    synthesise = model.vocoder(griffin_lim_iters, vocoder, vocoder_weights, str(ckpt_path))
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    chosen = choose_prior(model.learned_prior, prior, int(model.module.hparams.latent_dim), ckpt_path)
    with torch.inference_mode():
        codes = chosen.sample(n, temperature, generator)
        mels = model.denormalize(with_detail(model.decode_windows(codes), codes, model.detail, model.detail_strength,
                                             generator)[:, 0])  # -> (n, n_mels, frames)
        waves = synthesise(mels).cpu()  # -> (n, samples)
    *wavs, png = [out / name for name in sample_names(n)]
    for path, wave in zip(wavs, waves):
        write_wav(path, wave, model.mel.sample_rate)
    fig = mel_grid_figure(mels, [f"sample {i}" for i in range(n)], min(n, 4),
                          f"prior samples ({describe(chosen)}), temperature {temperature:g}"
                          + (f", seed {seed}" if seed is not None else ""))
    return {"wavs": [str(p) for p in wavs], "png": str(save_figure(fig, png)), "prior": describe(chosen)}


def interpolation_mels(model: GenerationModel, segment_a: Tensor, segment_b: Tensor, steps: int,
                       method: str = "slerp") -> Tensor:
    """Decode the latent path between two (n_mels, frames) log-mel segments -> (steps, n_mels, frames).

    Step 0 decodes A's posterior mean and the last step B's: they equal `reconstruct_mel` of
    the segments alone.
    """
    return model.denormalize(model.decode_windows(interpolation_path(model, segment_a, segment_b, steps, method))[:, 0])


def interpolation_path(model: GenerationModel, segment_a: Tensor, segment_b: Tensor, steps: int,
                       method: str = "slerp") -> Tensor:
    """The `latent_path` ``(steps, latent_dim)`` from segment A's posterior mean to B's."""
    x = model.normalize(torch.stack([segment_a, segment_b]).float())[:, None]  # -> (2, 1, n_mels, frames)
    return latent_path(*model.encode_windows(x), steps, method)


def interpolate_files(ckpt_path: str | os.PathLike, path_a: str | os.PathLike, path_b: str | os.PathLike,
                      out_dir: str | os.PathLike, steps: int = 8, method: str = "slerp", offset_a: float = 0.0,
                      offset_b: float = 0.0, device: str = "cpu", griffin_lim_iters: int = 64,
                      alpha: Optional[float | str] = 0.0, vocoder: Optional[str | os.PathLike] = None,
                      vocoder_weights: Optional[str | os.PathLike] = None, force: bool = False,
                      prior: str = "auto") -> dict[str, Any]:
    """Morph from a segment of A to one of B; write `step_XX.wav`, `morph.wav` and `interpolation.png`
    (audio by Griffin-Lim, or by the Vocos download `vocoder`: see `reconstruct_file`), refusing
    before any work a folder that holds them already unless `force`. The path is the same whatever
    `prior`; ``log_density`` scores each step under it (musicvae.inference.priors.path_log_density)."""
    latent_path(torch.zeros(1), torch.ones(1), steps, method)  # refuse bad settings before any work
    check_choice(prior)
    out = check_output_folder(out_dir, interpolation_names(steps), "--out",
                              _inputs(ckpt_path, path_a, path_b, vocoder, vocoder_weights), force)
    model = load_generation_model(ckpt_path, device, alpha)
    synthesise = model.vocoder(griffin_lim_iters, vocoder, vocoder_weights, str(ckpt_path))
    seg_a, used_a = segment_at(load_log_mel(path_a, model.mel)[0], offset_a, model.frames, model.mel, str(path_a))
    seg_b, used_b = segment_at(load_log_mel(path_b, model.mel)[0], offset_b, model.frames, model.mel, str(path_b))
    chosen = choose_prior(model.learned_prior, prior, int(model.module.hparams.latent_dim), ckpt_path)
    with torch.inference_mode():
        codes = interpolation_path(model, seg_a, seg_b, steps, method)
        mels = model.denormalize(model.decode_windows(codes)[:, 0])  # (steps, latent_dim) -> (steps, n_mels, frames)
        waves = synthesise(mels).cpu()  # -> (steps, samples)
    *wavs, morph_wav, png = [out / name for name in interpolation_names(steps)]
    for path, wave in zip(wavs, waves):
        write_wav(path, wave, model.mel.sample_rate)
    morph = crossfade_concat(list(waves), int(CROSSFADE_SECONDS * model.mel.sample_rate))
    write_wav(morph_wav, morph, model.mel.sample_rate)
    titles = [f"{i}: A" if i == 0 else f"{i}: B" if i == steps - 1 else str(i) for i in range(steps)]
    fig = mel_grid_figure(mels, titles, steps, f"{method} from {Path(path_a).name} @ {used_a:.2f} s "
                          f"to {Path(path_b).name} @ {used_b:.2f} s")
    return {"wavs": [str(p) for p in wavs], "morph": str(morph_wav),
            "png": str(save_figure(fig, png)), "offsets": [used_a, used_b], "prior": describe(chosen),
            "log_density": path_log_density(chosen, codes)}
