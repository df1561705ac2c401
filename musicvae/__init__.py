"""musicvae: variational autoencoders on log-mel spectrograms of music, with PyTorch Lightning."""

from musicvae.audio import LogMel, MelSettings, log_mel
from musicvae.data import MelDataModule
from musicvae.errors import CheckpointError, ConfigError, DataError, MusicVAEError
from musicvae.losses import (
    create_frequency_weights,
    kl_divergence,
    output_range_penalty,
    spectral_loss,
    vae_loss,
    vae_loss_spectral,
    weighted_mse,
)
from musicvae.model import ConvVAE
from musicvae.module import MusicVAEModule

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConvVAE",
    "DataError",
    "LogMel",
    "MelDataModule",
    "MelSettings",
    "MusicVAEError",
    "MusicVAEModule",
    "create_frequency_weights",
    "kl_divergence",
    "log_mel",
    "output_range_penalty",
    "spectral_loss",
    "vae_loss",
    "vae_loss_spectral",
    "weighted_mse",
]
