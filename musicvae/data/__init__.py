"""Log-mel data for training: the DataModule, the audio cache, segments, the split, the sampler, augmentation."""

from musicvae._lazy import lazy_exports

_EXPORTS = {
    "MelDataModule": "datamodule",
    "build_audio_cache": "cache",
    "Normalizer": "segments",
    "SegmentDataset": "segments",
    "AugmentSettings": "augment",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, ['augment', 'cache', 'datamodule', 'segments'])
