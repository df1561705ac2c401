"""musicvae.benchmarks.knn_residual: kNN regression of a linear code's residual on the code."""

from __future__ import annotations

import math

import pytest
import torch

from musicvae.benchmarks.knn_residual import evenly_spaced, knn_residual_mse
from musicvae.models.linear_codes import LinearCode

D = 12  # 2 code coordinates + 10 residual values


def first_two_coordinates() -> LinearCode:
    """A code that keeps coordinates 0 and 1 of a 12-vector and drops the rest."""
    return LinearCode(torch.zeros(D), torch.eye(D)[:2].contiguous(), torch.ones(2), float(D), "test")


def windows(n: int, seed: int, residual_of_code: bool) -> torch.Tensor:
    """`n` rows: code coordinates uniform on [-1, 1]^2, the rest a smooth function of them or independent noise."""
    g = torch.Generator().manual_seed(seed)
    code = torch.rand(n, 2, generator=g) * 2 - 1
    if residual_of_code:
        freq = torch.arange(1, D - 1, dtype=torch.float32)
        rest = torch.sin(freq * code[:, :1] + math.pi * code[:, 1:] ** 2)  # (n, 10), known from the code
    else:
        rest = torch.randn(n, D - 2, generator=g)  # independent of the code
    return torch.cat([code, rest], dim=1)


def test_a_residual_that_is_a_function_of_the_code_is_mostly_recovered():
    out = knn_residual_mse(first_two_coordinates(), windows(3000, 0, True), windows(400, 1, True), [1, 5, 20])
    assert out["n_train"] == 3000 and out["n_test"] == 400
    assert out["code_mse"] == pytest.approx(float(windows(400, 1, True)[:, 2:].pow(2).sum()) / (400 * D), rel=1e-5)
    ratios = {row["k"]: row["ratio"] for row in out["knn"]}
    assert ratios[1] < 0.1 and ratios[5] < 0.1  # most of the residual: 3000 points densely cover the 2-D code
    assert ratios[20] < 0.2


def test_a_residual_independent_of_the_code_gains_nothing():
    out = knn_residual_mse(first_two_coordinates(), windows(3000, 0, False), windows(400, 1, False), [1, 5, 20])
    ratios = {row["k"]: row["ratio"] for row in out["knn"]}
    # The mean of K independent residuals adds about 1/K of their variance: no gain, whatever K.
    assert ratios[1] > 1.7 and ratios[5] > 1.1 and ratios[20] > 0.98


def test_the_neighbour_bank_is_capped_evenly():
    assert evenly_spaced(5, 8).tolist() == [0, 1, 2, 3, 4]
    assert evenly_spaced(9, 3).tolist() == [0, 4, 8]
    out = knn_residual_mse(first_two_coordinates(), windows(300, 0, True), windows(10, 1, True), [1], max_train=50)
    assert out["n_train"] == 50
    with pytest.raises(ValueError, match="each K must be in 1..50"):
        knn_residual_mse(first_two_coordinates(), windows(300, 0, True), windows(10, 1, True), [51], max_train=50)
