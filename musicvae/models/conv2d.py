"""Convolutional VAE over log-mel spectrograms, in plain PyTorch.

Small building blocks first, the model last. Shapes use B for batch, C for
channels, M for mel bins and T for frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# exp(logvar) overflows float32 and bfloat16 past logvar ~ 88; a diverging encoder can
# get there within a few steps, and one inf turns the KL and every gradient into NaN.
# exp(20) ~ 5e8 and exp(-30) ~ 1e-13 already lie far outside any useful variance.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def num_groups(channels: int, max_groups: int = 32, min_per_group: int = 4) -> int:
    """Picks a GroupNorm group count that divides ``channels``.

    32 groups is the default of the GroupNorm paper (Wu & He, 2018); narrow layers get
    fewer groups so that each keeps at least ``min_per_group`` channels to normalise over.

    Args:
        channels: Number of channels to normalise.
        max_groups: Upper bound on the number of groups.
        min_per_group: Lower bound on channels per group (relaxed to 1 for tiny layers).

    Returns:
        The largest divisor of ``channels`` within both bounds, at least 1.
    """
    limit = max(1, min(max_groups, channels // min_per_group))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def norm_act(channels: int) -> nn.Sequential:
    """GroupNorm then SiLU: the pre-activation used before every conv but the first."""
    # GroupNorm rather than BatchNorm: its statistics do not depend on the batch, which
    # may be a handful of examples per device once DDP splits it.
    return nn.Sequential(nn.GroupNorm(num_groups(channels), channels), nn.SiLU())


class ResidualBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(act(norm(conv(act(norm(x))))))``.

    Keeps shape (B, C, H, W).
    """

    def __init__(self, channels: int, dropout: float = 0.0):
        super().__init__()
        self.branch = nn.Sequential(
            norm_act(channels),
            nn.Conv2d(channels, channels, 3, padding=1),
            norm_act(channels),
            nn.Dropout(dropout),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        # Zero the last conv so every block starts as the identity: the net then trains
        # like a shallow one at first and activations do not grow with depth
        # (Goyal et al. 2017, arXiv:1706.02677, sec. 5.1; Fixup, arXiv:1901.09321).
        nn.init.zeros_(self.branch[-1].weight)
        nn.init.zeros_(self.branch[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


class Downsample(nn.Module):
    """Strided 3x3 conv: (B, C_in, H, W) -> (B, C_out, H/2, W/2).

    With ``preact=False`` (the first layer) the raw input goes straight into the conv:
    normalising a single-channel log-mel per example would throw away its loudness.
    """

    def __init__(self, in_ch: int, out_ch: int, preact: bool = True):
        super().__init__()
        self.pre = norm_act(in_ch) if preact else nn.Identity()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.pre(x))


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: (B, C_in, H, W) -> (B, C_out, 2H, 2W).

    With ``shuffle=True`` (the last layer) the conv runs at the input resolution and
    produces 4 * C_out channels that PixelShuffle rearranges into a 2x2 neighbourhood
    (Shi et al. 2016, arXiv:1609.05158). It never materialises a C_in-channel map at full
    resolution, which made a training step of the default model faster on a CPU.
    """

    def __init__(self, in_ch: int, out_ch: int, shuffle: bool = False):
        super().__init__()
        self.pre = norm_act(in_ch)
        self.shuffle = shuffle
        self.conv = nn.Conv2d(in_ch, out_ch * 4 if shuffle else out_ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x)
        if self.shuffle:
            return F.pixel_shuffle(self.conv(x), 2)  # (B, 4*C_out, H, W) -> (B, C_out, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_divisible(name: str, size: int, factor: int, channels: tuple[int, ...]) -> None:
    if size % factor == 0:
        return
    below, above = size // factor * factor, (size // factor + 1) * factor
    examples = f"{below} or {above}" if below > 0 else f"{above}"
    # The stages this size does allow: n_mels is often fixed by the features (a vocoder's preset has
    # 100 mels), so the message names the networks that take it, not only the sizes that fit this one.
    stages = (size & -size).bit_length() - 1  # the power of 2 in size
    fewer = f", or fewer stages ({name}={size} takes at most {stages}: channels={list(channels[:stages])})" if stages else ""
    conv1d = ", or the conv1d architecture, which takes any n_mels" if name == "n_mels" else ""
    raise ValueError(
        f"{name}={size} is not divisible by {factor} ({len(channels)} stages in "
        f"channels={channels}): use a multiple of {factor} such as {examples}{fewer}{conv1d}"
    )


def check_network(channels: Sequence[int], latent_dim: int, blocks_per_stage: int, dropout: float) -> tuple[int, ...]:
    """Validates the settings every network shares; returns ``channels`` as a tuple of ints.

    Raises:
        ValueError: naming the setting and what it must be.
    """
    channels = tuple(int(c) for c in channels)
    if not channels or min(channels) < 1:
        raise ValueError(f"channels must be a non-empty sequence of positive widths, got {channels}")
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
    if blocks_per_stage < 0:
        raise ValueError(f"blocks_per_stage must be >= 0, got {blocks_per_stage}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return channels


class LatentVAE(nn.Module):
    """What every VAE here shares: checked ``encode``/``decode`` around the subclass's unchecked
    ``posterior``/``generate`` (which export.py scripts), sampling, and the forward pass.

    Subclasses set ``n_mels``, ``frames``, ``latent_dim`` and define ``posterior`` and ``generate``
    (not declared here: TorchScript cannot read this module's postponed annotations).
    """

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Maps log-mels to the posterior's parameters.

        Args:
            x: Log-mel spectrograms, (B, 1, n_mels, frames).

        Returns:
            ``(mu, logvar)``, each (B, latent_dim); logvar is clamped to
            [LOGVAR_MIN, LOGVAR_MAX].

        Raises:
            ValueError: If ``x`` does not have shape (B, 1, n_mels, frames).
        """
        expected = (1, self.n_mels, self.frames)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected input of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        return self.posterior(x)

    def decode(self, z: Tensor) -> Tensor:
        """Maps latent vectors to log-mels.

        Args:
            z: Latent vectors, (B, latent_dim).

        Returns:
            Reconstructed log-mels, (B, 1, n_mels, frames), unbounded.

        Raises:
            ValueError: If ``z`` does not have shape (B, latent_dim).
        """
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"expected latent of shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        return self.generate(z)

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """Draws ``z = mu + eps * std`` with ``eps ~ N(0, I)``, differentiably.

        Always samples; callers that want the mean (eval) use ``mu`` directly.

        Args:
            mu: Posterior means, (B, latent_dim).
            logvar: Posterior log-variances, (B, latent_dim).

        Returns:
            Latent samples, (B, latent_dim).
        """
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    @torch.jit.unused  # export.py scripts posterior/generate; forward samples, which a program does not
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encodes, samples (training) or takes the mean (eval), and decodes.

        Args:
            x: Log-mel spectrograms, (B, 1, n_mels, frames).

        Returns:
            ``(x_hat, mu, logvar)``: reconstruction (B, 1, n_mels, frames) and the
            posterior's parameters, each (B, latent_dim).
        """
        mu, logvar = self.encode(x)
        # Eval decodes the mean so that validation metrics and listening are repeatable.
        z = self.reparameterize(mu, logvar) if self.training else mu
        return self.decode(z), mu, logvar


class ConvVAE(LatentVAE):
    """Convolutional VAE on log-mel spectrograms of shape (B, 1, n_mels, frames).

    Each entry of ``channels`` is one stage that halves both the mel and the time
    resolution; the decoder mirrors the encoder. The output is linear (unbounded), in
    the same units as the input.

    Args:
        n_mels: Mel bins of the input; must be divisible by ``2 ** len(channels)``.
        frames: Frames of the input; must be divisible by ``2 ** len(channels)``.
        latent_dim: Size of the latent vector.
        channels: Width of each stage, from the full-resolution end inwards.
        blocks_per_stage: Residual blocks in each stage (0 gives a plain conv net).
        dropout: Dropout inside the residual blocks, in [0, 1).

    Raises:
        ValueError: If the sizes or the configuration cannot work, saying which would.
    """

    __jit_unused_properties__ = ["output_layer"]  # a module, for Python callers only

    def __init__(
        self,
        n_mels: int = 128,
        frames: int = 128,
        latent_dim: int = 64,
        channels: Sequence[int] = (32, 64, 128, 256),
        blocks_per_stage: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        channels = check_network(channels, latent_dim, blocks_per_stage, dropout)
        factor = 2 ** len(channels)
        for name, size in (("n_mels", n_mels), ("frames", frames)):
            if size < 1:
                raise ValueError(f"{name} must be positive, got {size}")
            _check_divisible(name, size, factor, channels)

        self.n_mels, self.frames, self.latent_dim = n_mels, frames, latent_dim
        # Attributes rather than the module constants: TorchScript (export.py) cannot read Python globals.
        self.logvar_min, self.logvar_max = LOGVAR_MIN, LOGVAR_MAX
        self.channels = channels
        self.bottleneck_shape = (channels[-1], n_mels // factor, frames // factor)
        flat = channels[-1] * (n_mels // factor) * (frames // factor)

        def blocks(ch: int) -> list[nn.Module]:
            return [ResidualBlock(ch, dropout) for _ in range(blocks_per_stage)]

        # Encoder: the first conv is strided and reads one channel, so no wide conv ever
        # runs at full resolution (on a 2-core CPU that alone caps training near 20 ex/s).
        enc: list[nn.Module] = []
        for i, ch in enumerate(channels):
            enc += [Downsample(channels[i - 1] if i else 1, ch, preact=i > 0), *blocks(ch)]
        enc += [norm_act(channels[-1]), nn.Flatten()]
        self.encoder = nn.Sequential(*enc)
        self.to_latent = nn.Linear(flat, 2 * latent_dim)  # mu and logvar side by side

        # Decoder: mirror order; the last upsample uses PixelShuffle (see Upsample).
        self.from_latent = nn.Linear(latent_dim, flat)
        dec: list[nn.Module] = []
        for i in reversed(range(len(channels))):
            out = channels[i - 1] if i else 1
            dec += [*blocks(channels[i]), Upsample(channels[i], out, shuffle=i == 0)]
        self.decoder = nn.Sequential(*dec)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)`` of log-mels (B, 1, M, T), without encode's shape check."""
        h = self.encoder(x)  # (B, 1, M, T) -> (B, C_last * M/2^S * T/2^S)
        mu, logvar = self.to_latent(h).chunk(2, dim=1)  # -> 2 x (B, latent_dim)
        return mu, logvar.clamp(self.logvar_min, self.logvar_max)

    def generate(self, z: Tensor) -> Tensor:
        """Log-mels (B, 1, M, T) of latents (B, latent_dim), without decode's shape check."""
        c, m, t = self.bottleneck_shape  # unpacked: TorchScript (export.py) has no star-arguments
        h = self.from_latent(z).view(-1, c, m, t)  # (B, L) -> (B, C_last, M/2^S, T/2^S)
        return self.decoder(h)  # -> (B, 1, M, T)

    @property
    def output_layer(self) -> nn.Conv2d:
        """The decoder's last conv (a linear path zeroes it, see musicvae.models.linear_path)."""
        return self.decoder[-1].conv
