"""Paths through the latent space between two codes, for `generate interpolate` (musicvae/inference/generation.py).

Both paths are computed about the origin, the centre of the VAE's N(0, I) prior: "slerp" follows the
great circle between the two codes, keeping each step near the shell where N(0, I)'s draws lie;
"linear" is the chord. A learned prior (musicvae/inference/priors.py) does not change the path: its
mass need not be centred at the origin nor on a shell, so `generate interpolate` scores each step's
log-density under the prior it is given instead, which shows where a path leaves the codes of music.
"""

from __future__ import annotations

import torch
from torch import Tensor

from musicvae.errors import ConfigError

METHODS = ("slerp", "linear")


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation (D,), (D,), (S,) -> (S, D), with t=0 exactly `a` and t=1 exactly `b`.

    Draws from a Gaussian prior concentrate on a shell; a straight line between two of them
    passes nearer the origin, where the decoder saw few latents (White 2016, arXiv:1609.04468).
    """
    omega = torch.arccos(torch.clamp(torch.dot(a / a.norm(), b / b.norm()), -1.0, 1.0))
    t = t[:, None]
    if omega.abs() < 1e-4:  # (anti)parallel: sin(omega) ~ 0, and the arc is the line anyway
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def latent_path(a: Tensor, b: Tensor, steps: int, method: str = "slerp") -> Tensor:
    """`steps` latents from `a` to `b`, both included: (D,), (D,) -> (steps, D)."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: use one of {METHODS}")
    if steps < 2:
        raise ConfigError(f"--steps {steps}: a path needs at least 2 steps (its two ends)")
    t = torch.linspace(0.0, 1.0, steps, dtype=a.dtype, device=a.device)
    path = slerp(a, b, t) if method == "slerp" else (1 - t[:, None]) * a + t[:, None] * b
    path[0], path[-1] = a, b  # exact ends, whatever the rounding of the formula
    return path
