"""VAE with 1-D convolutions over time, mel bins as channels, in plain PyTorch.

A log-mel segment (B, 1, M, T) is read as M channels over T frames: each conv mixes every mel
bin of a few neighbouring frames. Against ConvVAE's 2-D convs over the (M, T) image this gives
up translation along the mel axis (a pitch shift is a shift there) but costs far fewer FLOPs
per example for the same depth: on a CPU it takes several times the training steps per second
(docs/speed.md gives the figure and its command); docs/experiments.md compares what both learn. Shapes: B batch, C channels, M mel bins, T frames.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from musicvae.models.conv2d import LOGVAR_MAX, LOGVAR_MIN, LatentVAE, _check_divisible, check_network, num_groups


def norm_act1d(channels: int) -> nn.Sequential:
    """GroupNorm then SiLU, as in model.norm_act (GroupNorm over (C, T) works for any rank)."""
    return nn.Sequential(nn.GroupNorm(num_groups(channels), channels), nn.SiLU())


class ResidualBlock1d(nn.Module):
    """Pre-activation residual block over time, kernel 3, identity at initialisation. Keeps (B, C, T)."""

    def __init__(self, channels: int, dropout: float = 0.0):
        super().__init__()
        self.branch = nn.Sequential(
            norm_act1d(channels),
            nn.Conv1d(channels, channels, 3, padding=1),
            norm_act1d(channels),
            nn.Dropout(dropout),
            nn.Conv1d(channels, channels, 3, padding=1),
        )
        # Zero-initialised last conv: see model.ResidualBlock.
        nn.init.zeros_(self.branch[-1].weight)
        nn.init.zeros_(self.branch[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


class TemporalConvVAE(LatentVAE):
    """VAE over log-mels (B, 1, n_mels, frames) with 1-D convolutions along time.

    Each entry of ``channels`` is one stage that halves the time resolution (a strided conv);
    the decoder mirrors it with nearest-neighbour upsampling and a conv. The mel axis is the
    channel axis of the first and last conv, so ``n_mels`` needs no divisibility.

    Args:
        n_mels: Mel bins of the input.
        frames: Frames of the input; must be divisible by ``2 ** len(channels)``.
        latent_dim: Size of the latent vector.
        channels: Width of each stage, from the full-resolution end inwards.
        blocks_per_stage: Residual blocks in each stage.
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
        channels: Sequence[int] = (256, 256, 256, 256),
        blocks_per_stage: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        channels = check_network(channels, latent_dim, blocks_per_stage, dropout)
        if n_mels < 1 or frames < 1:
            raise ValueError(f"n_mels and frames must be positive, got {n_mels} and {frames}")
        factor = 2 ** len(channels)
        _check_divisible("frames", frames, factor, channels)

        self.n_mels, self.frames, self.latent_dim = n_mels, frames, latent_dim
        # Attributes rather than the module constants: TorchScript (export.py) cannot read Python globals.
        self.logvar_min, self.logvar_max = LOGVAR_MIN, LOGVAR_MAX
        self.channels = channels
        self.bottleneck_shape = (channels[-1], frames // factor)
        flat = channels[-1] * (frames // factor)

        def blocks(ch: int) -> list[nn.Module]:
            return [ResidualBlock1d(ch, dropout) for _ in range(blocks_per_stage)]

        enc: list[nn.Module] = []
        for i, ch in enumerate(channels):
            # The first conv reads the raw log-mel: no normalisation before it (see model.Downsample).
            pre = [norm_act1d(channels[i - 1])] if i else []
            enc += [*pre, nn.Conv1d(channels[i - 1] if i else n_mels, ch, 3, stride=2, padding=1), *blocks(ch)]
        enc += [norm_act1d(channels[-1]), nn.Flatten()]
        self.encoder = nn.Sequential(*enc)
        self.to_latent = nn.Linear(flat, 2 * latent_dim)  # mu and logvar side by side

        self.from_latent = nn.Linear(latent_dim, flat)
        dec: list[nn.Module] = []
        for i in reversed(range(len(channels))):
            out = channels[i - 1] if i else n_mels
            dec += [*blocks(channels[i]), norm_act1d(channels[i]), nn.Upsample(scale_factor=2.0, mode="nearest"),
                    nn.Conv1d(channels[i], out, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def output_layer(self) -> nn.Conv1d:
        """The decoder's last conv (a linear path zeroes it, see musicvae.models.linear_path)."""
        return self.decoder[-1]

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)`` of normalised log-mels (B, 1, M, T), unchecked (scriptable)."""
        h = self.encoder(x.squeeze(1))  # (B, 1, M, T) -> (B, M, T) -> (B, C_last * T/2^S)
        mu, logvar = self.to_latent(h).chunk(2, dim=1)  # -> 2 x (B, latent_dim)
        return mu, logvar.clamp(self.logvar_min, self.logvar_max)

    def generate(self, z: Tensor) -> Tensor:
        """Log-mels (B, 1, M, T) of latents (B, latent_dim), unchecked (scriptable)."""
        c, t = self.bottleneck_shape
        h = self.from_latent(z).view(-1, c, t)  # (B, L) -> (B, C_last, T/2^S)
        return self.decoder(h).unsqueeze(1)  # -> (B, M, T) -> (B, 1, M, T)
