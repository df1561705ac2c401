"""Switched codes: on windows of two kinds, one code per kind must beat any single code of the same size."""

from __future__ import annotations

import pytest
import torch

from musicvae.models.linear_codes import dct_basis, fit_pca, fit_separable_code
from musicvae.models.switched_codes import block_dct_basis, fit_clustered_pca, fit_switched_code

M, T, K = 8, 16, 6  # 8x16 windows, 6 coefficients per mode


def windows(n: int, rows: torch.Tensor, seed: int, noise: float = 0.01) -> torch.Tensor:
    """`n` flattened windows, each a random mix of `rows` ``(K, M*T)`` plus a little noise, around 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(rows), generator=g, dtype=torch.float64) @ rows.double()
    return (x + noise * torch.randn(n, M * T, generator=g, dtype=torch.float64) + 1.0).float()


def dct_rows(mel: list[int], time: list[int], time_basis: torch.Tensor) -> torch.Tensor:
    """``(len, M*T)``: outer products of the mel DCT's rows `mel` and `time_basis`'s rows `time`."""
    return torch.stack([torch.outer(dct_basis(M)[j], time_basis[t]).flatten() for j, t in zip(mel, time)])


def two_kinds(n: int, seed: int, second_time_basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the windows in K low-mel 2-D DCT coefficients, half in K high-mel ones of `second_time_basis`
    (disjoint energy patterns); returns the windows and each one's kind."""
    low = dct_rows([0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1], dct_basis(T))
    high = dct_rows([5, 5, 6, 6, 7, 7], [0, 1, 0, 1, 0, 1], second_time_basis)
    x = torch.cat([windows(n // 2, low, seed), windows(n // 2, high, seed + 1)])
    return x, torch.arange(n) >= n // 2


def mse(code, x: torch.Tensor) -> float:
    return float((code.reconstruct(x) - x).double().pow(2).mean())


def test_one_mode_of_the_whole_window_is_the_frozen_2d_dct_code():
    x, _ = two_kinds(60, 0, dct_basis(T))
    switched, frozen = fit_switched_code(x, (M, T), K, 1), fit_separable_code(x, (M, T), K, "dct")
    torch.testing.assert_close(switched.reconstruct(x), frozen.reconstruct(x), atol=1e-5, rtol=0)


def test_two_modes_keep_both_kinds_where_one_code_of_the_same_size_keeps_half():
    train, _ = two_kinds(200, 0, dct_basis(T))
    test, kind = two_kinds(100, 10, dct_basis(T))
    switched = fit_switched_code(train, (M, T), K, 2)
    index, code = switched.encode(test)
    assert index.shape == (100,) and code.shape == (100, K) and switched.n_modes == 2 and switched.n_components == K
    # The index separates the kinds exactly: one mode per kind.
    assert len(set(index[kind].tolist())) == 1 and len(set(index[~kind].tolist())) == 1 and index[0] != index[-1]
    torch.testing.assert_close(switched.decode(index, code).float().flatten(1), switched.reconstruct(test))
    single = mse(fit_separable_code(train, (M, T), K, "dct"), test)
    assert mse(switched, test) < 0.01 * single  # only the noise is left
    assert mse(switched, test) < 0.01 * mse(fit_pca(train, K), test)  # no single linear code of K can do it


def test_block_switching_codes_onsets_that_the_whole_window_dct_smears():
    # The second kind lives in the DCTs of two 8-frame halves: each of its rows is half a window long
    # (an onset at frame 8), which the whole-window DCT spreads over many coefficients.
    halves = block_dct_basis(T, 2)
    train, _ = two_kinds(200, 0, halves)
    test, kind = two_kinds(100, 10, halves)
    long_only = fit_switched_code(train, (M, T), K, 2, blocks=(1,))
    switching = fit_switched_code(train, (M, T), K, 2, blocks=(1, 2))
    assert switching.layout.tolist() == [0, 1] and switching.blocks == (1, 2)
    index, _ = switching.encode(test)
    assert (switching.layout[index] == kind.long()).all()  # the onsets pick the short blocks
    assert mse(switching, test) < 0.05 * mse(long_only, test)


def test_block_dct_basis_is_orthonormal_and_refuses_uneven_blocks():
    basis = block_dct_basis(16, 4)
    torch.testing.assert_close(basis @ basis.T, torch.eye(16, dtype=torch.float64), atol=1e-12, rtol=0)
    assert basis[0, 4:].abs().max() == 0  # block 1's rows stay in frames 0-3
    with pytest.raises(ValueError, match="3 time blocks do not split 16 frames"):
        block_dct_basis(16, 3)
    with pytest.raises(ValueError, match="must be a multiple of the 2 layouts"):
        fit_switched_code(torch.zeros(10, M * T), (M, T), K, 3, blocks=(1, 2))


def test_clustered_pca_finds_two_subspaces_that_one_pca_of_the_same_size_cannot():
    g = torch.Generator().manual_seed(3)
    a, b = (torch.linalg.qr(torch.randn(M * T, K, generator=g, dtype=torch.float64))[0].T for _ in range(2))
    train = torch.cat([windows(60, a, 0), windows(60, b, 1)])
    test = torch.cat([windows(30, a, 2), windows(30, b, 3)])
    clustered = fit_clustered_pca(train, (M, T), K, 2)
    index, code = clustered.encode(test)
    assert clustered.n_modes == 2 and code.shape == (60, K) and index[:30].unique().numel() == 1
    assert index[30:].unique().numel() == 1 and index[0] != index[-1]
    assert mse(clustered, test) < 0.01 * mse(fit_pca(train, K), test)


def test_a_mode_left_without_windows_is_the_frozen_code_not_an_empty_one():
    x, _ = two_kinds(4, 0, dct_basis(T))  # 4 distinct windows for 8 modes: some modes get no window
    windows_ = x.repeat(5, 1)
    switched = fit_switched_code(windows_, (M, T), K, 8)
    used = set(switched.encode(windows_)[0].tolist())
    frozen = set(fit_switched_code(windows_, (M, T), K, 1).support[0].tolist())
    assert 2 <= len(used) <= 4 and all(row.unique().numel() == K for row in switched.support)
    assert all(set(switched.support[i].tolist()) == frozen for i in range(8) if i not in used)
