"""musicvae: variational autoencoders on log-mel spectrograms of music, with PyTorch Lightning.

The public names below are imported on first use (PEP 562), so `import musicvae.losses` stays
free of Lightning, matplotlib and torchaudio. Layout: `audio/` (sound in and out), `data/`,
`models/` (plain networks), `training/` (Lightning), `inference/`, `evaluation/`; `losses.py`
and `metrics.py` are pure functions; `benchmarks/` is tooling the rest never imports.
"""

from importlib.metadata import PackageNotFoundError, version

from musicvae._lazy import lazy_exports

try:
    __version__ = version("musicvae")  # written once, in pyproject.toml
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

_EXPORTS = {
    "AudioError": "audio.decode", "LogMel": "audio.mel", "MelSettings": "audio.mel_settings",
    "audio_to_log_mel": "audio.mel", "load_audio": "audio.mel", "log_mel": "audio.mel",
    "GriffinLimVocoder": "audio.vocoder",
    "AugmentSettings": "data.augment", "MelDataModule": "data.datamodule", "build_audio_cache": "data.cache",
    "Normalizer": "data.segments",
    "ConvVAE": "models.conv2d", "TemporalConvVAE": "models.conv1d",
    "LinearPathVAE": "models.linear_path", "init_from_code": "models.linear_path",
    "LinearCode": "models.linear_codes", "fit_pca": "models.linear_codes",
    "MusicVAEModule": "training.module", "cli_main": "training.cli",
    "datamodule_for": "inference.loading", "load_module": "inference.loading",
    "load_generation_model": "inference.generation", "export_checkpoint": "inference.export",
    "load": "inference.api", "MusicVAE": "inference.api", "PretrainedVAE": "inference.pretrained",
    "export_programs": "inference.programs",
    "evaluate": "evaluation.report", "evaluate_checkpoint": "evaluation.report",
    "CheckpointError": "errors", "ConfigError": "errors", "DataError": "errors", "MusicVAEError": "errors",
    "NonFiniteError": "errors",
    "create_frequency_weights": "losses", "kl_divergence": "losses", "output_range_penalty": "losses",
    "spectral_loss": "losses", "vae_loss": "losses", "vae_loss_spectral": "losses", "weighted_mse": "losses",
    "LatentDiagnostics": "metrics", "ReconstructionDiagnostics": "metrics",
}
_SUBPACKAGES = ("audio", "data", "models", "training", "inference", "evaluation", "losses", "metrics", "errors")

#: Old public names (before the linear codes were named for what they are): still importable, with a warning.
_RENAMED = {"PCA": "LinearCode", "init_from_pca": "init_from_code"}
# musicvae.denormalize(x, mean, std) became musicvae.Normalizer(mean, std).inverse(x) (docs/migration.md).

__all__ = sorted(_EXPORTS) + ["__version__"]
_lazy_getattr, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBPACKAGES)


def __getattr__(name: str) -> object:
    if name in _RENAMED:
        import warnings

        warnings.warn(f"musicvae.{name} is now musicvae.{_RENAMED[name]} (docs/migration.md)",
                      DeprecationWarning, stacklevel=2)
        return _lazy_getattr(_RENAMED[name])
    return _lazy_getattr(name)
