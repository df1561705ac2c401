"""Linear codes of log-mel windows: LinearCode, separable (mel basis x time DCT) and 2-D DCT.

A linear code is an orthonormal basis with per-component variances and a mean
(:class:`LinearCode`: PCA, separable or DCT). The linear path of a VAE starts from one
(musicvae.models.linear_path), and the quality benchmark measures the VAE against them.

PCA (:func:`fit_pca`) is the best linear code for the windows it was fitted on.

Separable codes (:func:`fit_separable_code`):

Plain PCA of 128x128 windows estimates a 16384 x 16384 covariance from a few thousand windows
and fits the training music's exact time patterns. Music's statistics hardly depend on where a
window starts, and a stationary process's covariance over time is (nearly) diagonalised by the
DCT. So this basis is the outer products of

- the eigenvectors of the mel-by-mel covariance (pooled over all frames: 128 x 128, estimated
  from every frame of every window), and
- the DCT-II basis over time (fixed, nothing to estimate),

of which the `k` with the largest training variance are kept. With ``mel_basis="dct"`` the mel
side is a DCT too (a 2-D DCT, as in JPEG): nothing is estimated but which coefficients to keep.
On held-out albums both reconstruct better than PCA with as many components, although PCA is the
best linear code for the training windows themselves (docs/experiments.md): fewer parameters to
estimate, so less of the training music's particulars, and the fewer the better.

The result is a :class:`LinearCode` (orthonormal rows, variances, mean), so it plugs
into everything that takes a PCA: the linear path's initialisation and the quality benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

# Exact PCA (eigh of the smaller of the Gram and covariance matrices, float64) up to this size of
# that matrix: 4096^2 doubles are 128 MiB and eigh takes seconds. Beyond it the randomized SVD of
# Halko et al. 2011 (torch.pca_lowrank) with 10 extra columns and 6 power iterations, whose error on
# the top-k subspace is far below the differences this benchmark looks at (tests/test_quality.py
# checks it against a full SVD).
EXACT_PCA_MAX = 4096
PCA_OVERSAMPLE = 10
PCA_NITER = 6


@dataclass
class LinearCode:
    """A linear code of flattened segments: a mean and orthonormal rows with their variances.

    Attributes:
        mean: ``(D,)`` training mean.
        components: ``(k, D)`` orthonormal rows, by decreasing variance.
        variances: ``(k,)`` variance along each component (ddof 0).
        total_variance: the training data's total variance (trace of its covariance, ddof 0).
        method: "exact" or "randomized".
    """

    mean: Tensor
    components: Tensor
    variances: Tensor
    total_variance: float
    method: str

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def explained_variance_ratio(self) -> float:
        """Share of the training variance the k components keep."""
        return float(self.variances.sum()) / self.total_variance if self.total_variance > 0 else math.nan

    def encode(self, x: Tensor) -> Tensor:
        """``(B, ...)`` -> ``(B, k)`` coordinates."""
        flat = x.flatten(1).to(self.mean.dtype)  # (B, ...) -> (B, D)
        return (flat - self.mean) @ self.components.T

    def decode(self, code: Tensor, shape: Sequence[int]) -> Tensor:
        """``(B, k)`` -> ``(B, *shape)``."""
        return (code @ self.components + self.mean).reshape(code.shape[0], *shape)

    def reconstruct(self, x: Tensor) -> Tensor:
        """Projection onto the mean plus the span of the components, in `x`'s shape and dtype."""
        return self.decode(self.encode(x), x.shape[1:]).to(x.dtype)


def fit_pca(data: Tensor, k: int, method: str = "auto", seed: int = 0) -> LinearCode:
    """PCA with exactly `k` components of the rows of `data`.

    Args:
        data: ``(N, D)`` rows (flattened segments); centred here on their mean.
        k: components; at most ``min(N, D)``.
        method: "exact" (eigh of ``X X^T`` when N <= D, else of ``X^T X``, in float64), "randomized"
            (torch.pca_lowrank, q = k + PCA_OVERSAMPLE, niter = PCA_NITER), or "auto" (exact when
            ``min(N, D) <= EXACT_PCA_MAX``).
        seed: for the randomized method's Gaussian test matrix.

    Returns:
        The fitted :class:`PCA` (float32 mean and components).
    """
    if data.dim() != 2:
        raise ValueError(f"fit_pca expects (N, D) rows, got {tuple(data.shape)}")
    n, d = data.shape
    if not 1 <= k <= min(n, d):
        raise ValueError(f"fit_pca: {k} components need 1 <= k <= min(N, D) = {min(n, d)} (N={n}, D={d})")
    if method == "auto":
        method = "exact" if min(n, d) <= EXACT_PCA_MAX else "randomized"
    mean = data.double().mean(dim=0)  # (D,)
    if method == "exact":
        x = data.double() - mean  # (N, D)
        total = float(x.pow(2).sum()) / n
        if n <= d:
            # Gram trick: X X^T = U S^2 U^T, and the components are V = X^T U / S.
            evals, evecs = torch.linalg.eigh(x @ x.T)  # ascending
            evals, evecs = evals.flip(0)[:k].clamp_min(0), evecs.flip(1)[:, :k]  # (k,), (N, k)
            comps = (x.T @ evecs) / evals.sqrt().clamp_min(1e-300)  # (D, k)
            comps = comps.T
        else:
            evals, evecs = torch.linalg.eigh(x.T @ x)
            evals, comps = evals.flip(0)[:k].clamp_min(0), evecs.flip(1)[:, :k].T  # (k,), (k, D)
        variances = evals / n
    elif method == "randomized":
        x = data.float() - mean.float()
        total = float(x.double().pow(2).sum()) / n
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # pca_lowrank draws its test matrix from the global generator
        try:
            _, s, v = torch.pca_lowrank(x, q=min(k + PCA_OVERSAMPLE, n, d), center=False, niter=PCA_NITER)
        finally:
            torch.random.set_rng_state(generator_state)
        comps, variances = v[:, :k].T.double(), s[:k].double().pow(2) / n  # (k, D), (k,)
    else:
        raise ValueError(f"fit_pca: unknown method {method!r} (exact, randomized or auto)")
    return LinearCode(mean.float(), comps.float().contiguous(), variances, total, method)


def stack_segments(dataset: Dataset, batch_size: int = 64) -> Tensor:
    """Every segment of `dataset` flattened: ``(N, 1, n_mels, T)`` -> ``(N, n_mels * T)`` float32."""
    batches = [x.flatten(1).float() for x in DataLoader(dataset, batch_size=batch_size, shuffle=False)]
    if not batches:
        raise ValueError("stack_segments: the dataset is empty")
    return torch.cat(batches)



#: Windows per chunk while accumulating statistics (a chunk of 128x128 windows in float64: 64 MiB).
CHUNK = 512


def dct_basis(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The orthonormal DCT-II basis: ``(n, n)``, row ``k`` the ``k``-th cosine over ``n`` samples."""
    t = torch.arange(n, dtype=dtype)
    basis = torch.cos(math.pi / n * (t[None, :] + 0.5) * t[:, None]) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis


def fit_separable_code(data: Tensor, shape: tuple[int, int], k: int, mel_basis: str = "eigen") -> LinearCode:
    """The `k` (mel basis x time DCT) components of largest training variance.

    Args:
        data: ``(N, M*T)`` flattened windows (row-major ``(M, T)``: mel bins, then frames).
        shape: ``(M, T)``.
        k: components; at most ``M * T``.
        mel_basis: "eigen" (eigenvectors of the training mel covariance) or "dct" (the DCT over
            mel bins too: a 2-D DCT, as JPEG's, with only the choice of coefficients learned).

    Returns:
        A :class:`PCA` with ``method`` "separable" (eigen) or "dct": float32 mean ``(D,)`` (the full per-element mean,
        as PCA's), orthonormal components ``(k, D)`` by decreasing training variance, their
        variances (ddof 0) and the total training variance.
    """
    m, t = shape
    if data.dim() != 2 or data.shape[1] != m * t:
        raise ValueError(f"fit_separable_code expects (N, {m}*{t}) rows, got {tuple(data.shape)}")
    n = data.shape[0]
    if not 1 <= k <= m * t or n < 1:
        raise ValueError(f"fit_separable_code: {k} components need 1 <= k <= {m * t} and at least one window")
    if mel_basis not in ("eigen", "dct"):
        raise ValueError(f"fit_separable_code: mel_basis={mel_basis!r} is not 'eigen' or 'dct'")
    mean = data.double().mean(dim=0).view(m, t)  # (M, T)

    def chunks():
        for start in range(0, n, CHUNK):
            yield data[start:start + CHUNK].double().view(-1, m, t) - mean  # (B, M, T)

    if mel_basis == "dct":
        mel_vectors = dct_basis(m).T  # (M, M), columns
    else:
        mel_cov = torch.zeros(m, m, dtype=torch.float64)
        for x in chunks():
            mel_cov += torch.einsum("bmt,blt->ml", x, x)  # every frame of every window
        mel_vectors = torch.linalg.eigh(mel_cov)[1]  # (M, M), columns
    time_basis = dct_basis(t)  # (T, T), rows
    variance = torch.zeros(m, t, dtype=torch.float64)
    total = 0.0
    for x in chunks():
        variance += torch.einsum("bmt,mj,kt->bjk", x, mel_vectors, time_basis).pow(2).sum(0)  # (M, T) coefficients
        total += float(x.pow(2).sum())
    variance /= n
    order = torch.argsort(variance.flatten(), descending=True)[:k]
    j, c = order // t, order % t  # mel eigenvector, DCT frequency
    components = (mel_vectors[:, j].T[:, :, None] * time_basis[c][:, None, :]).reshape(k, m * t)  # (k, M*T)
    return LinearCode(mean.flatten().float(), components.float().contiguous(), variance.flatten()[order], total / n,
               "separable" if mel_basis == "eigen" else "dct")
