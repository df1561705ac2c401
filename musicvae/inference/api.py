"""`musicvae.load(path)`: a trained model on audio, in a few lines of Python (docs/api.md).

    model = musicvae.load("checkpoints/music_vae_improved/best.ckpt")  # or a saved folder, or "org/name"
    codes = model.encode(waveform, sample_rate)   # (windows, latent_dim) posterior means
    audio = model.decode(codes)                   # (samples,) at model.sample_rate

`encode` takes the same front end (resampling, log-mel, normalisation) from the checkpoint as
training did, and tiles the recording as `musicvae predict` does (musicvae.data.segments.segment_starts,
hop = one window; the tail is a last window ending at the recording's end). The log-mel is made and
encoded block by block (LogMelStream), holding at most two windows of it, so a long recording
needs the memory `prepare` needs, besides the waveform itself (or, given a path, not even that).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from musicvae.audio.mel import LogMelStream, decode_blocks
from musicvae.data.segments import segment_starts
from musicvae.errors import CheckpointError, ConfigError
from musicvae.inference.generation import GenerationModel, add_segments, load_generation_model, reconstruct_mel
from musicvae.inference.loading import resolve_alpha
from musicvae.inference.priors import choose_prior

#: Samples of an in-memory waveform mixed down and handed to the front end at a time.
_PIECE = 1 << 16
#: A Hugging Face Hub repository id, "org/name" (anything that is not a file or folder here).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _mono_pieces(waveform: Any, source: str) -> Iterator[np.ndarray]:
    """(samples,) or (channels, samples), a tensor or an array -> float32 mono pieces (channel means)."""
    if isinstance(waveform, Tensor):
        waveform = waveform.detach().cpu().numpy()
    waveform = np.asarray(waveform)
    if waveform.ndim not in (1, 2) or waveform.shape[-1] == 0 or not np.issubdtype(waveform.dtype, np.number):
        raise ConfigError(f"{source}: expected a (samples,) or (channels, samples) waveform of numbers, "
                          f"got shape {waveform.shape} of {waveform.dtype}")
    if waveform.ndim == 2 and waveform.shape[0] > waveform.shape[1]:
        raise ConfigError(f"{source}: shape {waveform.shape} reads as more channels than samples; give "
                          "(channels, samples) (soundfile.read returns (samples, channels): pass its transpose, .T)")
    for i in range(0, waveform.shape[-1], _PIECE):
        piece = waveform[..., i : i + _PIECE].astype(np.float32)
        yield piece if piece.ndim == 1 else piece.mean(axis=0)


def _windows(blocks: Iterable[np.ndarray], frames: int, floor: float) -> Iterator[tuple[int, np.ndarray]]:
    """(start, (n_mels, frames) window) of a stream of (n_mels, t) log-mel blocks, at the starts of
    `segment_starts(total, frames, frames)`; a stream shorter than a window is padded with silence."""
    held, offset, total, start = None, 0, 0, 0  # held: frames [offset, total) of the stream
    for block in blocks:
        held = block if held is None else np.concatenate([held, block], axis=1)
        total += block.shape[1]
        while start + frames <= total:
            yield start, held[:, start - offset : start - offset + frames].copy()
            start += frames
        keep = max(offset, min(start, total - frames))  # the next window's frames, and the tail's
        held, offset = held[:, keep - offset :], keep
    if held is None:
        return
    if total < frames:
        yield 0, np.pad(held, ((0, 0), (0, frames - total)), constant_values=floor)
    elif start < total:  # the tail: a last window that ends at the end
        yield total - frames, held[:, -frames:].copy()


class MusicVAE:
    """A trained model on audio: encode, decode, reconstruct, sample, save_pretrained (`musicvae.load`).

    Args:
        model: the loaded checkpoint (musicvae.inference.generation.GenerationModel).
        training: what the model card says of its training (musicvae.inference.card.training_info),
            or a callable that reads it when first needed.
    """

    def __init__(self, model: GenerationModel, training: Any = None) -> None:
        self.model = model
        self._training = training
        self._vocoders: dict[tuple, torch.nn.Module] = {}

    sample_rate = property(lambda self: self.model.mel.sample_rate, doc="Rate of `decode`'s waveforms, in Hz.")
    latent_dim = property(lambda self: int(self.model.module.hparams.latent_dim), doc="Numbers per code.")
    frames = property(lambda self: self.model.frames, doc="Log-mel frames per window (one code).")
    device = property(lambda self: self.model.device, doc="Where the network runs.")
    prior = property(lambda self: self.model.prior,
                     doc="The learned prior the model carries (musicvae fit-prior), else N(0, I) (StandardPrior).")

    @property
    def window_seconds(self) -> float:
        """Seconds between two consecutive windows' starts (a window's frames times the hop)."""
        return self.frames * self.model.mel.hop_length / self.sample_rate

    def to(self, device: str | torch.device) -> MusicVAE:
        """Move the network to `device` (Griffin-Lim follows it; the front end stays on the CPU); returns self."""
        self.model.module.to(device)
        self._vocoders.clear()
        return self

    def _log_mel_blocks(self, waveform: Any, sample_rate: Optional[int]) -> LogMelStream:
        if isinstance(waveform, (str, os.PathLike)):
            if sample_rate is not None:
                raise ConfigError(f"{waveform}: a file carries its own sample rate; leave sample_rate out")
            rate, blocks = decode_blocks(waveform)  # decoded block by block: the file is never whole in memory
            return LogMelStream(blocks, rate, self.model.mel, source=str(waveform))
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
            raise ConfigError(f"sample_rate {sample_rate!r}: give the waveform's rate in Hz, a positive integer")
        return LogMelStream(_mono_pieces(waveform, "waveform"), int(sample_rate), self.model.mel)

    @torch.no_grad()
    def encode(self, waveform: Any, sample_rate: Optional[int] = None, return_starts: bool = False,
               batch_size: int = 32) -> Tensor | tuple[Tensor, Tensor]:
        """Posterior means of every window of a recording.

        Args:
            waveform: a (samples,) or (channels, samples) tensor or array (channels are averaged),
                or the path of an audio file.
            sample_rate: the waveform's rate in Hz (any: it is resampled to `self.sample_rate`).
            return_starts: also return each window's start in seconds.
            batch_size: windows per forward pass on `self.device`.

        Returns:
            (windows, latent_dim) float32 codes on the CPU and, with `return_starts`, (windows,) float64
            start times. Windows start every `window_seconds`; the last one ends at the recording's end
            when a shorter tail is left, and a recording shorter than one window is padded with silence.

        Raises:
            ConfigError: a waveform of another shape, or no sample rate.
            AudioError: silent, shorter than one STFT window, or with NaN/Inf samples.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size {batch_size}: encode at least one window per pass")
        model = self.model
        starts, codes, batch = [], [], []

        def flush() -> None:
            x = model.normalize(torch.from_numpy(np.stack(batch)))[:, None]  # (B, n_mels, F) -> (B, 1, n_mels, F)
            codes.append(model.encode_windows(x).float().cpu())
            batch.clear()

        for start, window in _windows(self._log_mel_blocks(waveform, sample_rate), self.frames,
                                      model.mel.log_floor_value):
            starts.append(start)
            batch.append(window)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        codes = torch.cat(codes)
        if not return_starts:
            return codes
        return codes, torch.tensor(starts, dtype=torch.float64) * model.mel.hop_length / self.sample_rate

    def _vocoder(self, vocoder: Optional[str | os.PathLike], griffin_lim_iters: int) -> torch.nn.Module:
        key = (str(vocoder) if vocoder else None, griffin_lim_iters, str(self.device))
        if key not in self._vocoders:
            self._vocoders[key] = self.model.vocoder(griffin_lim_iters, vocoder)
        return self._vocoders[key]

    def _strength(self, alpha: Optional[float | str]) -> float:
        return self.model.alpha if alpha is None else resolve_alpha(self.model.module, alpha)

    @torch.no_grad()
    def decode_mel(self, codes: Tensor, starts: Optional[Tensor] = None, alpha: Optional[float | str] = None,
                   batch_size: int = 32) -> Tensor:
        """Codes -> one (n_mels, T) natural-log mel: each window decoded, overlap-added at `starts`.

        Args:
            codes: (windows, latent_dim), or (latent_dim,) for one window.
            starts: each window's start in seconds (`encode(..., return_starts=True)`); None: one after
                another, `window_seconds` apart.
            alpha: variance-compensation strength in [0, 1] or "perceptual" (None: the one loaded with).
            batch_size: windows per forward pass.
        """
        codes = torch.as_tensor(codes, dtype=torch.float32)
        codes = codes[None] if codes.dim() == 1 else codes
        if codes.dim() != 2 or codes.shape[1] != self.latent_dim or not len(codes):
            raise ConfigError(f"codes of shape {tuple(codes.shape)}: expected (windows, {self.latent_dim})")
        frames, model = self.frames, dataclasses.replace(self.model, alpha=self._strength(alpha))
        if starts is None:
            first = [i * frames for i in range(len(codes))]
        else:
            first = [int(round(float(s) * model.mel.frames_per_second)) for s in torch.as_tensor(starts)]
            if len(first) != len(codes) or min(first) < 0:
                raise ConfigError(f"starts: expected {len(codes)} non-negative start times in seconds, one per code")
        total = max(first) + frames
        joined, weight = torch.zeros(model.mel.n_mels, total), torch.zeros(total)
        for i in range(0, len(codes), batch_size):
            decoded = model.decode_windows(codes[i : i + batch_size]).float().cpu()[:, 0]  # (B, L) -> (B, n_mels, F)
            add_segments(joined, weight, decoded, first[i : i + batch_size])
        covered = weight > 0  # starts further apart than a window leave gaps: silence there
        joined[:, covered] /= weight[covered]
        joined[:, ~covered] = model.normalize(torch.tensor(model.mel.log_floor_value))
        return model.denormalize(joined)

    def decode(self, codes: Tensor, starts: Optional[Tensor] = None, alpha: Optional[float | str] = None,
               vocoder: Optional[str | os.PathLike] = None, griffin_lim_iters: int = 64) -> Tensor:
        """Codes -> a (samples,) waveform at `sample_rate` (`decode_mel`, then a vocoder).

        Args:
            codes, starts, alpha: see `decode_mel`.
            vocoder: a Vocos download trained on this model's mel settings (docs/vocoder.md); None: Griffin-Lim.
            griffin_lim_iters: Griffin-Lim's iterations (without `vocoder`).
        """
        mel = self.decode_mel(codes, starts, alpha)
        with torch.inference_mode():
            return self._vocoder(vocoder, griffin_lim_iters)(mel.to(self.device)).float().cpu()

    def reconstruct(self, waveform: Any, sample_rate: Optional[int] = None, alpha: Optional[float | str] = None,
                    vocoder: Optional[str | os.PathLike] = None, griffin_lim_iters: int = 64) -> Tensor:
        """A recording through the model, as `musicvae generate reconstruct` does it: windows half a window
        apart, overlap-added, inverted once; (samples,) at `sample_rate`, as long as the input resampled.

        Args: see `encode` (`waveform`, `sample_rate`) and `decode`.
        """
        stream = self._log_mel_blocks(waveform, sample_rate)
        log_mel = torch.from_numpy(stream.joined())
        model = dataclasses.replace(self.model, alpha=self._strength(alpha))
        mel = reconstruct_mel(model, log_mel.to(self.device))
        with torch.inference_mode():
            return self._vocoder(vocoder, griffin_lim_iters)(mel.to(self.device), length=stream.resampled).float().cpu()

    @torch.no_grad()
    def sample(self, n: int = 1, seconds: Optional[float] = None, temperature: float = 1.0,
               seed: Optional[int] = None, alpha: Optional[float | str] = None,
               vocoder: Optional[str | os.PathLike] = None, griffin_lim_iters: int = 64,
               prior: str = "auto") -> Tensor:
        """`n` waveforms decoded from draws of a prior over the codes: (n, samples) at `sample_rate`.

        Args:
            seconds: length of each; None: one window. Longer than a window, each waveform is a
                sequence of independent draws, one per window, crossfaded over half a window (the
                model has no prior over time: it is not a continuation, nor a walk).
            temperature: scales each draw's deviation from its component's mean (musicvae.models.prior;
                N(0, temperature^2 I) for the standard prior); 0 gives the component means.
            seed: seeds the draws (and nothing else); None: torch's global generator.
            prior: "auto" (the learned prior when the model carries one, else N(0, I)), "standard" or
                "learned" (musicvae.inference.priors.choose_prior).
        """
        if n < 1 or temperature < 0 or (seconds is not None and seconds <= 0):
            raise ConfigError(f"n {n}, temperature {temperature}, seconds {seconds}: n and seconds must be "
                              "positive, temperature >= 0")
        chosen = choose_prior(self.model.learned_prior, prior, self.latent_dim, "this model", "prior")
        hop, frames = self.model.mel.hop_length, self.frames
        samples = (frames - 1) * hop if seconds is None else int(round(seconds * self.sample_rate))
        total = 1 + samples // hop  # frames of the centred STFT of `samples` samples
        starts = segment_starts(total, frames, frames if seconds is None else max(1, frames // 2))
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        z = chosen.sample(n * len(starts), temperature, generator).reshape(n, len(starts), self.latent_dim)
        starts_s = torch.tensor(starts, dtype=torch.float64) / self.model.mel.frames_per_second
        mels = torch.stack([self.decode_mel(draws, starts_s, alpha)[:, :total] for draws in z])
        with torch.inference_mode():
            return self._vocoder(vocoder, griffin_lim_iters)(mels.to(self.device), length=samples).float().cpu()

    def _pretrained(self, metrics: Any = None) -> Any:
        """This model as a PretrainedVAE (shared tensors), its card facts read now if not yet."""
        from musicvae.inference.card import scalar_metrics
        from musicvae.inference.pretrained import PretrainedVAE

        training = self._training() if callable(self._training) else dict(self._training or {})
        self._training = training
        if metrics is not None:
            training = {**training, "metrics": scalar_metrics(metrics)}
        return PretrainedVAE.from_generation_model(self.model, training)

    def save_pretrained(self, folder: str | os.PathLike, metrics: Any = None, license: str = "unknown",
                        repo_id: Optional[str] = None, force: bool = False) -> Path:
        """Write `model.safetensors`, `config.json` and a model card `README.md` into `folder` (docs/api.md).

        Args:
            metrics: `musicvae evaluate`'s result (its metrics.json, or the dict) for the card.
            license: the card's license field (a Hub license id, e.g. "cc-by-4.0"); the weights
                carry the terms of the music they were trained on.
            repo_id: the Hub id the card's example loads (default: the folder's name).
            force: replace those three files if they exist.

        Raises:
            ConfigError: `folder` cannot be written, or holds them and `force` is off.
        """
        from musicvae.inference.pretrained import FILES
        from musicvae.io.outputs import check_creatable_dir

        out = check_creatable_dir(folder, "save_pretrained")
        existing = [name for name in FILES if os.path.lexists(out / name)]
        if existing and not force:
            raise ConfigError(f"save_pretrained {out}: already holds {', '.join(existing)}; pass force=True to "
                              "replace them, or choose another folder")
        wrapper = self._pretrained(metrics)
        for name in existing:  # the mixin keeps an existing card; `force` means replace
            (out / name).unlink()
        wrapper.save_pretrained(out, config=wrapper.config,
                                model_card_kwargs={"license": license, "repo_id": repo_id or out.name})
        return out

    def push_to_hub(self, repo_id: str, metrics: Any = None, license: str = "unknown", **kwargs: Any) -> Any:
        """Upload what `save_pretrained` writes to the Hugging Face Hub as `repo_id` (the mixin's push_to_hub:
        `private`, `token`, `branch`, `commit_message`, ... pass through; needs `hf auth login`)."""
        wrapper = self._pretrained(metrics)
        return wrapper.push_to_hub(repo_id, config=wrapper.config,
                                   model_card_kwargs={"license": license, "repo_id": repo_id}, **kwargs)


def load(path: str | os.PathLike, device: str = "cpu", alpha: Optional[float | str] = None,
         revision: Optional[str] = None) -> MusicVAE:
    """A trained model from a checkpoint, a `save_pretrained` folder, or a Hub repository id ("org/name").

    Args:
        device: where the network runs ("cpu", "cuda", "cuda:1").
        alpha: the default variance-compensation strength of everything decoded, in [0, 1] or
            "perceptual" (the fitted point); None: 0 for a checkpoint, the saved one for a folder.
        revision: a Hub repository's branch, tag or commit.

    Raises:
        CheckpointError: nothing of that name here or on the Hub, or a file or folder that is not a
            musicvae model (refused before anything is built from it).
    """
    from musicvae.inference.card import training_info

    text = str(path)
    if os.path.isfile(path):
        model = load_generation_model(path, device, 0.0 if alpha is None else alpha)
        return MusicVAE(model, lambda: training_info(path))
    if not os.path.isdir(path) and (not _HUB_ID.match(text) or text.endswith(".ckpt")):
        raise CheckpointError(f"{text}: no such checkpoint or folder (a Hub model is named org/name)")
    from musicvae.inference.pretrained import FILES, PretrainedVAE

    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(text, revision=revision, allow_patterns=list(FILES))
        except Exception as err:  # offline, no such repository, no access: huggingface_hub raises several types
            raise CheckpointError(f"{text}: no such checkpoint or folder here, and the Hugging Face Hub did not "
                                  f"give it ({str(err).splitlines()[0][:200]})") from None
    wrapper = PretrainedVAE.load_folder(path)
    return MusicVAE(wrapper.generation_model(device, alpha), wrapper.config["training"])
