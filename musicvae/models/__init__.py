"""Plain nn.Module networks (no Lightning) and the linear codes they can start from."""

from musicvae._lazy import lazy_exports

_EXPORTS = {
    "ConvVAE": "conv2d",
    "LatentVAE": "conv2d",
    "TemporalConvVAE": "conv1d",
    "LinearPathVAE": "linear_path",
    "init_from_code": "linear_path",
    "LinearCode": "linear_codes",
    "PatchDiscriminator": "discriminator",
    "augment_pair": "discriminator",
    "fit_pca": "linear_codes",
    "fit_separable_code": "linear_codes",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, ['conv1d', 'conv2d', 'discriminator', 'linear_codes', 'linear_path'])
