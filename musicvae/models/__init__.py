"""Plain nn.Module networks (no Lightning), the linear codes they can start from, and priors over their codes."""

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
    "StandardPrior": "prior",
    "GaussianPrior": "prior",
    "MixturePrior": "prior",
    "fit_prior": "prior",
    "nearest_neighbour_check": "prior",
    "SwitchedCode": "switched_codes",
    "ClusteredPCA": "switched_codes",
    "fit_switched_code": "switched_codes",
    "fit_clustered_pca": "switched_codes",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, ['conv1d', 'conv2d', 'discriminator', 'linear_codes', 'linear_path', 'prior', 'switched_codes'])
