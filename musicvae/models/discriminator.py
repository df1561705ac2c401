"""A PatchGAN discriminator on normalised log-mel segments, and the augmentation of what it sees.

The adversarial stage (configs/sharp.yaml, musicvae/training/sharpen.py) fine-tunes a trained
VAE's decoder against this network, as the latent-diffusion autoencoders do (Esser et al. 2021,
arXiv:2012.09841; Rombach et al. 2022; AudioLDM's mel VAE): a stack of strided 2-D convolutions
over (mel, time) whose output is a grid of logits, one per receptive-field patch (Isola et al.
2017, arXiv:1611.07004), so it judges local texture (onsets, partials, noise) rather than the
whole segment, which the reconstruction loss already pins down. Spectral normalisation keeps it
1-Lipschitz-ish and its training stable with the hinge loss (Miyato et al. 2018, arXiv:1802.05957).

A discriminator overfits a small data set within a few thousand steps unless what it sees is
augmented; `augment_pair` applies the same random, differentiable transforms to the real and
the decoded segment of each pair (DiffAugment, Zhao et al. 2020, arXiv:2006.10738), so the
decoder still gets gradients and the pair stays comparable for feature matching.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


class PatchDiscriminator(nn.Module):
    """Strided conv stack -> a grid of real/fake logits; also returns each stage's features.

    Args:
        channels: output channels per stride-2 stage; each halves both axes.
        slope: LeakyReLU negative slope.

    Shapes: ``(B, 1, n_mels, T)`` -> logits ``(B, 1, n_mels / 2^S, T / 2^S)`` and a list of the S
    stage activations (for feature matching).
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 128), slope: float = 0.2) -> None:
        super().__init__()
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"discriminator channels must be positive, got {list(channels)}")
        stages, width = [], 1
        for out in channels:
            stages.append(nn.Sequential(spectral_norm(nn.Conv2d(width, out, 4, stride=2, padding=1)),
                                        nn.LeakyReLU(slope)))
            width = out
        self.stages = nn.ModuleList(stages)
        self.head = spectral_norm(nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = []
        for stage in self.stages:
            x = stage(x)  # (B, C_in, M, T) -> (B, C_out, M/2, T/2)
            features.append(x)
        return self.head(x), features


def augment_pair(real: Tensor, fake: Tensor, generator: Optional[torch.Generator] = None,
                 max_shift: float = 0.125, max_level: float = 0.5, cutout: float = 0.25) -> tuple[Tensor, Tensor]:
    """The same random transforms for each (real, fake) pair, differentiable in `fake`.

    Per pair: a circular time shift of up to ``max_shift`` of the segment, a level offset (a gain
    in log-mel units) of up to ``max_level``, and one zeroed time span of ``cutout`` of the segment
    at a random place (DiffAugment's translation, brightness and cutout, for spectrograms).

    Args:
        real, fake: ``(B, 1, n_mels, T)`` normalised log-mels.
        generator: for the draws (None: the global generator).

    Returns:
        The transformed pair, same shapes.
    """
    b, t = real.shape[0], real.shape[-1]
    draw = lambda *shape: torch.rand(*shape, generator=generator).to(real.device)  # noqa: E731
    shifts = ((draw(b) * 2 - 1) * max_shift * t).round().long()  # (B,)
    index = (torch.arange(t, device=real.device)[None, :] - shifts[:, None]) % t  # (B, T)
    level = ((draw(b) * 2 - 1) * max_level).to(real.dtype)[:, None, None, None]
    span = max(1, int(round(cutout * t)))
    start = (draw(b) * (t - span + 1)).long().clamp_max(t - span)
    frames = torch.arange(t, device=real.device)[None, :]
    keep = ~((frames >= start[:, None]) & (frames < start[:, None] + span))  # (B, T)
    keep = keep.to(real.dtype)[:, None, None, :]

    def apply(x: Tensor) -> Tensor:
        x = torch.gather(x, -1, index[:, None, None, :].expand_as(x))
        return (x + level) * keep

    return apply(real), apply(fake)
