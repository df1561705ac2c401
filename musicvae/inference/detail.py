"""Fitting the detail generator (musicvae.models.detail) to a decoder, and adding it to a whole piece.

**Fitted on the fly, not stored.** The detail model is a closed-form function of a decoder and the
windows it was trained on (a ridge regression and two sums): one encode-decode pass over at most
MAX_FIT_WINDOWS training windows, seconds to a minute on a CPU. Fitting it where it is used keeps
it in step with whatever decoder it serves (the VAE, PCA, a later checkpoint) and adds no second
record to the checkpoint for a loader to validate as untrusted data; the price is that
`generate --detail` needs the checkpoint's training folder (or `data_dir`) on this machine. Storing
it as plain buffers under its own checkpoint key (DetailModel holds nothing else) is the step to
take when checkpoints travel without their music.

The windows are the training split's at fixed crops without augmentation, evenly thinned, so the
same checkpoint and folder give the same detail model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from musicvae.errors import ConfigError, MusicVAEError
from musicvae.inference.loading import datamodule_for
from musicvae.metrics import band_edges
from musicvae.models.detail import SOURCES, DetailModel, DetailStats, add_detail, window_features

#: Training windows a detail model is fitted on at most (evenly spaced): ~16 per ridge feature at 128
#: latent numbers times the band count, and one decoding pass of a few seconds per hundred on a CPU.
#: The exemplar source keeps each one's residual: 64 MiB at 128 x 128 frames in float16.
MAX_FIT_WINDOWS = 2048


def check_strength(beta: float, flag: str = "--detail") -> float:
    """`beta` as a float, refused unless in [0, 1]."""
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= float(beta) <= 1.0:
        raise ConfigError(f"{flag} {beta!r}: a detail strength in [0, 1] (0: the plain decoder output)")
    return float(beta)


def check_source(source: str, flag: str = "--detail_source") -> str:
    """`source` unchanged, refused unless one of musicvae.models.detail.SOURCES."""
    if source not in SOURCES:
        raise ConfigError(f"{flag} {source!r}: one of {', '.join(SOURCES)} (the texture of the generated detail)")
    return source


@dataclass
class CodeDetail:
    """A decoder's detail generator: codes -> the alpha-0 decoding's window_features -> shaped noise."""

    model: DetailModel
    decode: Callable[[Tensor], Tensor]
    edges: list[tuple[int, int]]

    @torch.no_grad()
    def features(self, codes: Tensor, batch_size: int = 64) -> Tensor:
        """``(N, D)`` codes -> ``(N, 2 n_bands)`` features of their decoding at alpha 0, batch by batch."""
        return torch.cat([window_features(self.decode(chunk), self.edges).cpu() for chunk in codes.split(batch_size)])


def with_detail(x: Tensor, codes: Tensor, detail: Optional[CodeDetail], beta: float,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """`x` (decoded from `codes`, compensated or not) plus `detail`'s noise at strength `beta`; `x` itself at 0."""
    if check_strength(beta) == 0 or detail is None:
        return add_detail(x, codes, None, beta)
    return add_detail(x, detail.features(codes).to(x.device), detail.model, beta, generator)


@torch.no_grad()
def fit_detail(encode: Callable[[Tensor], Tensor], decode: Callable[[Tensor], Tensor], dataset: Dataset,
               n_mels: int, edges: Sequence[tuple[int, int]], batch_size: int = 32,
               max_windows: int = MAX_FIT_WINDOWS, source: str = SOURCES[0]) -> DetailModel:
    """A DetailModel of the decoder ``decode(encode(x))`` on (at most `max_windows` of) `dataset`, predicting
    each window's detail energy from the window_features of its decoding, with texture from `source`
    (musicvae.models.detail.SOURCES: the exemplar source keeps these windows' residuals).

    Args:
        encode: normalised windows ``(B, 1, M, T)`` -> codes (a VAE's posterior means, a linear code's coordinates).
        decode: codes -> decoded windows ``(B, 1, M, T)`` (alpha 0: the residual is what the code lost).
        dataset: the decoder's training windows.
        n_mels, edges: mel bins and the bands whose energies are predicted (musicvae.metrics.band_edges).
    """
    count = min(len(dataset), max_windows)
    picked = Subset(dataset, torch.linspace(0, len(dataset) - 1, count).round().long().tolist())  # evenly spaced
    stats = DetailStats(n_mels, edges, exemplars=check_source(source) == "exemplar")
    for x in DataLoader(picked, batch_size=batch_size, shuffle=False):
        x_hat = decode(encode(x)).to(x)
        stats.update(window_features(x_hat, edges), x - x_hat)
    kept = stats.exemplars or []
    bank = (sum(len(e) for e in kept), int(kept[0].shape[-1])) if kept else (0, 0)
    return DetailModel(2 * len(edges), n_mels, len(edges), *bank).fit(stats)


def module_edges(module: Any) -> list[tuple[int, int]]:
    """The band edges of a trained module's frequency bands (the ones its compensation uses)."""
    bands = [tuple(float(v) for v in band) for band in module.hparams.freq_bands]
    return band_edges(int(module.hparams.n_mels), bands)


def checkpoint_detail(module: Any, ckpt: dict, source: str | os.PathLike, data_dir: Optional[str] = None,
                      batch_size: int = 32, texture: str = SOURCES[0]) -> CodeDetail:
    """The detail model of a checkpoint's VAE, fitted on its training split (module docstring), with
    texture from `texture` (musicvae.models.detail.SOURCES).

    Raises:
        ConfigError: the training folder is not on this machine, or holds no training windows.
    """
    try:
        datamodule = datamodule_for(ckpt, data_dir=data_dir)
        datamodule.prepare_data()
        datamodule.setup("validate")
        windows = datamodule.train_set.fixed_windows()
    except MusicVAEError as err:
        raise ConfigError(f"--detail: the detail generator is fitted on {source}'s training music, which could "
                          f"not be read here ({err}); use --detail 0") from err
    if len(windows) < 2:
        raise ConfigError(f"--detail: {datamodule.folder} has {len(windows)} training window(s); fitting detail "
                          "needs at least 2")
    device, edges = module.device, module_edges(module)

    def encode(x: Tensor) -> Tensor:
        return module.vae.encode(x.to(device))[0]

    def decode(z: Tensor) -> Tensor:
        return module.vae.decode(z.to(device)).cpu()

    model = fit_detail(encode, decode, windows, int(module.hparams.n_mels), edges, batch_size, source=texture)
    return CodeDetail(model, decode, edges)


def piece_detail(detail: CodeDetail, codes: Tensor, starts: list[int], frames: int, total: int,
                 add_segments: Callable[[Tensor, Tensor, Tensor, list[int]], None],
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """Detail for a whole piece decoded window by window: ``(M, total)`` unit-strength noise.

    Noise added per window and then overlap-added would lose energy where windows overlap (the mean
    of independent draws), so one texture runs over the whole piece (exemplars cross-faded, see
    musicvae.models.detail.exemplar_texture, or one stationary noise), scaled per frame by the
    windows' predicted variances overlap-added with the piece's own weights (`add_segments`).

    Args:
        codes: ``(N, D)`` the windows' codes; starts: their first frames; frames: window length.
        total: frames of the piece (at least the last window's end).
    """
    model = detail.model
    variance = model.bin_scale(detail.features(codes)).float().cpu().pow(2)[:, :, None].expand(-1, -1, frames)  # (N, M) -> (N, M, frames)
    summed, weight = variance.new_zeros(variance.shape[1], total), variance.new_zeros(total)
    add_segments(summed, weight, variance, starts)
    return model.unit_noise(1, total, generator)[0] * (summed / weight).sqrt()
