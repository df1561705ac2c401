"""Separable PCA: a linear code for log-mel windows built as (mel basis) x (time DCT).

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

The result is a :class:`musicvae.quality.PCA` (orthonormal rows, variances, mean), so it plugs
into everything that takes a PCA: the linear path's initialisation and the quality benchmark.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from musicvae.quality import PCA

#: Windows per chunk while accumulating statistics (a chunk of 128x128 windows in float64: 64 MiB).
CHUNK = 512


def dct_basis(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The orthonormal DCT-II basis: ``(n, n)``, row ``k`` the ``k``-th cosine over ``n`` samples."""
    t = torch.arange(n, dtype=dtype)
    basis = torch.cos(math.pi / n * (t[None, :] + 0.5) * t[:, None]) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis


def fit_separable_pca(data: Tensor, shape: tuple[int, int], k: int, mel_basis: str = "eigen") -> PCA:
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
        raise ValueError(f"fit_separable_pca expects (N, {m}*{t}) rows, got {tuple(data.shape)}")
    n = data.shape[0]
    if not 1 <= k <= m * t or n < 1:
        raise ValueError(f"fit_separable_pca: {k} components need 1 <= k <= {m * t} and at least one window")
    if mel_basis not in ("eigen", "dct"):
        raise ValueError(f"fit_separable_pca: mel_basis={mel_basis!r} is not 'eigen' or 'dct'")
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
    return PCA(mean.flatten().float(), components.float().contiguous(), variance.flatten()[order], total / n,
               "separable" if mel_basis == "eigen" else "dct")
