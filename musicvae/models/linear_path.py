"""A linear path beside a VAE's nonlinear one, initialised from PCA of the training segments.

PCA with k components is the best linear autoencoder with a k-dimensional code, and
docs/experiments.md measured that a convolutional VAE takes long to even match it on music it has not heard. So
the latent mean is ``mu = A (x - m) + f(x)`` and the reconstruction ``x_hat = m + B z + g(z)``,
with A and B set from PCA at the start of training and f, g (the wrapped VAE) starting at zero:
step 0 *is* whitened PCA, and training only has to learn what is nonlinear. The code is whitened
(A = Lambda^-1/2 P^T, B = P Lambda^1/2), so it has unit variance over the data, the variance
the N(0, I) prior expects: prior samples are Gaussian draws in the PCA space from the start.
A and B stay trainable (at their own rate, possibly 0).

"PCA" here is any orthonormal code with per-component variances (musicvae.models.linear_codes.LinearCode): the
separable bases of musicvae/models/linear_codes.py (mel basis x time DCT) fit in the same way and
generalise better to music unlike the training's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from musicvae.models.conv2d import LatentVAE
from musicvae.models.linear_codes import LinearCode, fit_pca, fit_separable_code, stack_segments


class LinearPathVAE(LatentVAE):
    """Wraps a VAE (``ConvVAE`` or ``TemporalConvVAE``) with a PCA-initialisable linear path.

    The wrapped VAE's mean head and last decoder layer are scaled by ``init_scale`` (0: zeroed), so until :func:`init_from_code`
    runs the model is linear (with random A, B), and right after it, exactly PCA.

    Args:
        inner: the nonlinear VAE; needs ``posterior``, ``generate``, ``to_latent`` and ``output_layer``.
        init_scale: multiplies the default initialisation of the mean head and output layer.
        n_linear: codes the linear path uses (PCA components; default all ``latent_dim``). The
            others start with the nonlinear encoder's default initialisation and no linear decoder.
    """

    def __init__(self, inner: nn.Module, init_scale: float = 0.0, n_linear: int | None = None):
        super().__init__()
        n_linear = inner.latent_dim if n_linear is None else n_linear
        if not 1 <= n_linear <= inner.latent_dim:
            raise ValueError(f"linear_path_components (n_linear)={n_linear} must be in [1, latent_dim={inner.latent_dim}]")
        self.n_linear = n_linear
        self.inner = inner
        self.n_mels, self.frames, self.latent_dim = inner.n_mels, inner.frames, inner.latent_dim
        size = inner.n_mels * inner.frames
        self.lin_encoder = nn.Linear(size, inner.latent_dim)
        self.lin_decoder = nn.Linear(inner.latent_dim, size)
        # Scaled (by default zeroed) so that step 0 is PCA. Exactly zero is a stationary point,
        # though: LinearCode's codes are least-squares optimal for its decoder, so the mean head gets
        # no gradient, and the output layer only the residual's (weak) correlation with features
        # of z; a small non-zero scale starts near PCA without sitting on that point.
        with torch.no_grad():
            # Rows of the linear path's mu; the free codes' rows (n_linear:) and logvar's stay.
            inner.to_latent.weight[:n_linear].mul_(init_scale)
            inner.to_latent.bias[:n_linear].mul_(init_scale)
            inner.output_layer.weight.mul_(init_scale)
            inner.output_layer.bias.mul_(init_scale)
        if n_linear < inner.latent_dim:
            # The free codes stay out of the linear path for good, not only at step 0: their rows of
            # A and columns of B get no gradient (so Adam never moves them; AdamW decays zeros to zeros).
            self.lin_encoder.weight.register_hook(self._rows_only)
            self.lin_encoder.bias.register_hook(self._rows_only)
            self.lin_decoder.weight.register_hook(self._columns_only)
        # Saved in checkpoints: a resumed run must not redo (and overwrite) the initialisation.
        self.register_buffer("pca_initialised", torch.zeros((), dtype=torch.bool))

    def _rows_only(self, grad: Tensor) -> Tensor:
        grad = grad.clone()
        grad[self.n_linear:] = 0
        return grad

    def _columns_only(self, grad: Tensor) -> Tensor:
        grad = grad.clone()
        grad[:, self.n_linear:] = 0
        return grad

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)`` of normalised log-mels (B, 1, M, T), unchecked."""
        mu, logvar = self.inner.posterior(x)
        return mu + self.lin_encoder(x.flatten(1)), logvar  # (B, 1, M, T) -> (B, M*T) -> (B, L)

    def generate(self, z: Tensor) -> Tensor:
        """Log-mels (B, 1, M, T) of latents (B, L), unchecked."""
        linear = self.lin_decoder(z).view(-1, 1, self.n_mels, self.frames)  # (B, L) -> (B, 1, M, T)
        return linear + self.inner.generate(z)


@torch.no_grad()
def init_from_code(vae: LinearPathVAE, pca: LinearCode, beta: float, min_variance: float = 1e-8) -> None:
    """Sets the linear path to whitened PCA: ``A = Lambda^-1/2 P^T``, ``B = P Lambda^1/2``, and the
    posterior variances to their optimum for that linear decoder.

    With ``loss = MSE + beta * KL / D`` (D elements per example) and decoder column k of squared
    norm ``lambda_k`` (the component's variance, summed over elements), posterior noise of variance
    s^2 on code k costs ``s^2 lambda_k / D`` of MSE and ``beta/(2D) (s^2 - 1 - log s^2)`` of KL; the
    sum is least at ``s^2 = beta / (2 lambda_k + beta)``. Starting there rather than at the encoder's
    random ``s^2 ~ 1`` spares the first hundreds of steps, in which decoding prior-wide noise would
    drag the linear path away from PCA.

    Args:
        vae: the model to initialise (in place); marks it initialised.
        pca: fitted on flattened normalised training segments, with ``latent_dim`` components.
        beta: the KL weight of the loss (on the per-element scale, as in musicvae.losses).
        min_variance: floor on a component's variance, so a dead direction (e.g. fewer distinct
            segments than components) does not divide by zero.

    Raises:
        ValueError: if the PCA's size does not match the model's.
    """
    k, d = pca.components.shape
    if k != vae.n_linear or d != vae.n_mels * vae.frames:
        raise ValueError(f"PCA of shape {(k, d)} does not fit a model with {vae.n_linear} linear codes and "
                         f"{vae.n_mels}x{vae.frames} inputs")
    scale = pca.variances.double().clamp_min(min_variance).sqrt()  # (k,) standard deviation per component
    comps, mean = pca.components.double(), pca.mean.double()  # (k, D), (D,)
    encoder = comps / scale[:, None]  # (k, D)
    # Codes k: (if any) are free: the linear path ignores them, the nonlinear one learns them.
    vae.lin_encoder.weight.zero_()
    vae.lin_encoder.bias.zero_()
    vae.lin_decoder.weight.zero_()
    vae.lin_encoder.weight[:k].copy_(encoder)
    vae.lin_encoder.bias[:k].copy_(-(encoder @ mean))
    vae.lin_decoder.weight[:, :k].copy_((comps * scale[:, None]).T)  # (D, k)
    vae.lin_decoder.bias.copy_(mean)
    # lambda_k: the variance of code k's PCA coordinate, i.e. decoder column k's squared norm.
    # beta = 0 (a plain autoencoder) would want s^2 = 0; e^-20 is as good as nothing there.
    logvar = torch.log(beta / (2 * scale.pow(2) + beta)) if beta > 0 else torch.full_like(scale, -20.0)
    first = vae.latent_dim  # logvar rows follow the latent_dim mu rows
    vae.inner.to_latent.weight[first:first + k].zero_()
    vae.inner.to_latent.bias[first:first + k].copy_(logvar)
    vae.pca_initialised.fill_(True)


def fit_linear_code(windows: Dataset, k: int, basis: str = "pca") -> LinearCode:
    """The linear code a linear path starts from, fitted to `windows` (a dataset of (1, n_mels, frames)
    normalised windows, fixed crops).

    Args:
        windows: the training windows the code is fitted on.
        k: components (the linear path's codes).
        basis: "pca" (PCA of the windows), "separable" (mel-covariance eigenvectors x time DCT) or
            "dct" (2-D DCT; only the kept coefficients are chosen from the data); see
            musicvae/models/linear_codes.py: the fewer parameters estimated, the better the start on music
            not trained on.
    """
    stack = stack_segments(windows)  # (N, 1, M, T) -> (N, M*T)
    if basis == "pca":
        return fit_pca(stack, k)
    shape = tuple(windows[0].shape[-2:])
    return fit_separable_code(stack, shape, k, mel_basis="eigen" if basis == "separable" else "dct")
