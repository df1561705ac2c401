"""Switched codes against the frozen 2-D DCT code: train, validation and held-out MSE of each.

A switched code spends one of its `k` numbers on the mode index, so each mode keeps ``k - 1``
coefficients: ``k`` numbers per window in all, the same count as the dct-k and PCA-k codes it is
compared with (musicvae.models.switched_codes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from musicvae.models.switched_codes import fit_clustered_pca, fit_switched_code

#: Windows per encode-decode call (each mode's layouts hold a (B, M*T) float64 copy).
BATCH = 256


def reconstruction_mse(code: Any, x: Tensor, batch_size: int = BATCH) -> float:
    """MSE of ``code.reconstruct`` over every value of `x` ``(N, D)``, summed in float64 in batches."""
    total = 0.0
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        total += float((code.reconstruct(chunk) - chunk).double().pow(2).sum())
    return total / x.numel()




def switched_rows(train_x: Tensor, val_x: Tensor, test_x: Tensor, shape: tuple[int, int], k: int,
                  modes: Sequence[int] = (), layouts: Sequence[Sequence[int]] = ((1,),), pca_modes: Sequence[int] = (),
                  seed: int = 0) -> list[dict[str, Any]]:
    """Fit each switched code on `train_x` and score it on all three sets.

    Args:
        train_x, val_x, test_x: ``(N, M*T)`` flattened windows: fitted on, the training folder's
            validation recordings, the held-out folder.
        shape: ``(M, T)``.
        k: numbers per window, the mode index included (``k - 1`` coefficients).
        modes: K of each classified block-DCT code, for each set of time-block layouts in `layouts`.
        layouts: sets of layouts, e.g. ``[(1,), (1, 2, 4)]``; the K modes are split evenly over a set's.
        pca_modes: K of each clustered PCA (a mean and ``k - 1`` components per mode).
        seed: of the k-means++ starts.

    Returns:
        Rows ``{"name", "family", "modes", "blocks", "coefficients", "train_mse", "val_mse", "mse",
        "fit_seconds"}`` (``"mse"`` on `test_x`; clustered PCA's ``"modes"`` is the count kept).
    """
    rows = []

    def row(name: str, family: str, code: Any, blocks: Sequence[int], started: float) -> dict[str, Any]:
        seconds = time.perf_counter() - started
        return {"name": name, "family": family, "modes": code.n_modes, "blocks": list(blocks), "coefficients": k - 1,
                "train_mse": reconstruction_mse(code, train_x), "val_mse": reconstruction_mse(code, val_x),
                "mse": reconstruction_mse(code, test_x),
                "fit_seconds": round(seconds, 1)}

    for blocks in layouts:
        for n_modes in modes:
            started = time.perf_counter()
            code = fit_switched_code(train_x, shape, k - 1, n_modes, blocks, seed=seed)
            label = "2-D DCT" if tuple(blocks) == (1,) else "time blocks " + "/".join(map(str, blocks))
            rows.append(row(f"switched dct-{k - 1} + index of {n_modes} ({label})", "dct", code, blocks, started))
    for n_modes in pca_modes:
        started = time.perf_counter()
        code = fit_clustered_pca(train_x, shape, k - 1, n_modes, seed=seed)
        rows.append(row(f"clustered PCA-{k - 1} + index of {code.n_modes}", "pca", code, (), started))
    return rows
