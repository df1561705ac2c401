"""musicvae: variational autoencoders on log-mel spectrograms of music, with PyTorch Lightning."""

from musicvae.audio import AudioError, LogMel, MelSettings, audio_to_log_mel, load_audio, log_mel
from musicvae.cache import build_audio_cache
from musicvae.data import MelDataModule
from musicvae.evaluation import evaluate, evaluate_checkpoint
from musicvae.export import export_checkpoint
from musicvae.generation import load_generation_model
from musicvae.inference import datamodule_for, load_module
from musicvae.errors import CheckpointError, ConfigError, DataError, MusicVAEError, NonFiniteError
from musicvae.losses import (
    create_frequency_weights,
    kl_divergence,
    output_range_penalty,
    spectral_loss,
    vae_loss,
    vae_loss_spectral,
    weighted_mse,
)
from musicvae.metrics import LatentDiagnostics, ReconstructionDiagnostics
from musicvae.augment import AugmentSettings
from musicvae.linear_path import LinearPathVAE, init_from_pca
from musicvae.model import ConvVAE
from musicvae.module import MusicVAEModule
from musicvae.quality import PCA, fit_pca
from musicvae.temporal import TemporalConvVAE
from musicvae.vocoder import GriffinLimVocoder, denormalize

__version__ = "0.1.0"

__all__ = [
    "AudioError",
    "CheckpointError",
    "LatentDiagnostics",
    "ReconstructionDiagnostics",
    "audio_to_log_mel",
    "build_audio_cache",
    "datamodule_for",
    "denormalize",
    "evaluate",
    "evaluate_checkpoint",
    "export_checkpoint",
    "load_audio",
    "load_generation_model",
    "load_module",
    "ConfigError",
    "AugmentSettings",
    "ConvVAE",
    "LinearPathVAE",
    "TemporalConvVAE",
    "init_from_pca",
    "GriffinLimVocoder",
    "DataError",
    "LogMel",
    "MelDataModule",
    "MelSettings",
    "MusicVAEError",
    "MusicVAEModule",
    "NonFiniteError",
    "PCA",
    "fit_pca",
    "create_frequency_weights",
    "kl_divergence",
    "log_mel",
    "output_range_penalty",
    "spectral_loss",
    "vae_loss",
    "vae_loss_spectral",
    "weighted_mse",
]
