"""How much of a frozen linear code's residual the code itself predicts: a k-nearest-neighbour probe.

A linear code keeps the projection of a window onto its span and drops the rest, the residual
``x - decode(encode(x))``. A nonlinear decoder from the same code can only beat it by predicting
part of that residual from the code. k-nearest-neighbour regression (each held-out window's
residual predicted as the mean residual of the K training windows whose codes are nearest) is a
nonparametric estimate of that predictable part: a probe of the headroom, not a decoder (it keeps
the training residuals, and with few windows in a high-dimensional code it underestimates what a
smooth regression could find).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from musicvae.models.linear_codes import LinearCode


def evenly_spaced(n: int, cap: int) -> Tensor:
    """Indices of at most `cap` of `n` rows, evenly spaced (all of them when ``n <= cap``)."""
    if n <= cap:
        return torch.arange(n)
    return torch.linspace(0, n - 1, cap).round().long()


def knn_residual_mse(code: LinearCode, train_x: Tensor, test_x: Tensor, ks: Sequence[int], max_train: int = 8192,
                     chunk: int = 128) -> dict[str, Any]:
    """Held-out MSE of `code` alone and of `code` plus the kNN-predicted residual, for each K.

    Args:
        code: the frozen linear code (fitted beforehand, e.g. on all of `train_x`).
        train_x: ``(N, D)`` flattened training windows: the neighbours and their residuals.
        test_x: ``(M, D)`` flattened held-out windows.
        ks: neighbour counts, each in ``1..min(N, max_train)``.
        max_train: at most this many training windows (evenly spaced) are kept as neighbours, since
            their residuals are held in memory (8192 windows of 128x128 in float32: 512 MiB).
        chunk: held-out windows per exact distance computation (torch.cdist on the codes).

    Returns:
        ``{"n_train": used training windows, "n_test", "code_mse", "knn": [{"k", "mse", "ratio"}]}``;
        MSE over every held-out value, ratio = kNN MSE / code-only MSE (below 1: the code predicts
        part of its own residual).
    """
    keep = evenly_spaced(len(train_x), max_train)
    bank = train_x[keep].float()
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1 or ks[-1] > len(bank):
        raise ValueError(f"knn_residual_mse: each K must be in 1..{len(bank)} (the training windows kept), got {ks}")
    bank_codes = code.encode(bank)  # (N, k)
    bank_residuals = bank - code.reconstruct(bank)  # (N, D)
    code_sum, knn_sums = 0.0, torch.zeros(len(ks), dtype=torch.float64)
    for start in range(0, len(test_x), chunk):
        x = test_x[start:start + chunk].float()
        residual = x - code.reconstruct(x)  # (B, D)
        code_sum += float(residual.double().pow(2).sum())
        nearest = torch.cdist(code.encode(x), bank_codes).topk(ks[-1], dim=1, largest=False).indices  # (B, K_max), nearest first
        # Neighbours' residuals summed one rank at a time: (B, D) in memory, not (B, K, D) (8 GB at K = 1000).
        summed, i = torch.zeros_like(residual), 0
        for rank in range(ks[-1]):
            summed += bank_residuals[nearest[:, rank]]
            if rank + 1 == ks[i]:
                knn_sums[i] += float((residual - summed / ks[i]).double().pow(2).sum())
                i += 1
    code_mse = code_sum / test_x.numel()
    rows = [{"k": k, "mse": float(s) / test_x.numel(), "ratio": float(s) / code_sum if code_sum > 0 else float("nan")}
            for k, s in zip(ks, knn_sums)]
    return {"n_train": len(bank), "n_test": len(test_x), "code_mse": code_mse, "knn": rows}
