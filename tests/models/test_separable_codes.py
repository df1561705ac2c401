"""The separable basis (mel eigenvectors x time DCT): an orthonormal code ordered by training
variance, worse than PCA on the training windows, better on fresh windows when the training
set is small against the window size (the reason it exists, musicvae/models/linear_codes.py)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_fit_args
from musicvae.models.linear_codes import fit_pca
from musicvae.models.linear_codes import dct_basis, fit_separable_code


def stationary_windows(n: int, m: int = 8, t: int = 16, seed: int = 0) -> torch.Tensor:
    """(n, m*t) windows of a process stationary in time (AR(1) frames, rho 0.9) with correlated mels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(m, m, generator=g, dtype=torch.float64) / math.sqrt(m) + torch.eye(m, dtype=torch.float64)
    frames = torch.zeros(n, m, t, dtype=torch.float64)
    frames[:, :, 0] = torch.randn(n, m, generator=g, dtype=torch.float64)
    for i in range(1, t):
        frames[:, :, i] = 0.9 * frames[:, :, i - 1] + math.sqrt(1 - 0.81) * torch.randn(n, m, generator=g, dtype=torch.float64)
    return (torch.einsum("ml,nlt->nmt", mix, frames) + 1.0).reshape(n, m * t).float()


def mse(pca, x: torch.Tensor) -> float:
    return float((pca.reconstruct(x) - x).double().pow(2).mean())


def test_the_dct_basis_is_orthonormal_with_a_constant_first_row():
    basis = dct_basis(16)
    torch.testing.assert_close(basis @ basis.T, torch.eye(16, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(basis[0], torch.full((16,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("mel_basis", ["eigen", "dct"])
def test_components_are_orthonormal_and_ordered_by_their_training_variance(mel_basis):
    data = stationary_windows(50)
    fitted = fit_separable_code(data, (8, 16), 20, mel_basis)
    comps = fitted.components.double()
    torch.testing.assert_close(comps @ comps.T, torch.eye(20, dtype=torch.float64), atol=1e-5, rtol=0)
    projected = (data.double() - fitted.mean.double()) @ comps.T  # (N, k)
    torch.testing.assert_close(projected.pow(2).mean(0), fitted.variances, rtol=1e-4, atol=1e-6)
    assert torch.all(fitted.variances[:-1] >= fitted.variances[1:])
    assert fitted.method == {"eigen": "separable", "dct": "dct"}[mel_basis] and fitted.n_components == 20
    # PCA is the best linear code for the windows it was fitted on; the separable one cannot beat it there.
    assert mse(fitted, data) >= mse(fit_pca(data, 20), data) - 1e-6


@pytest.mark.parametrize("mel_basis", ["eigen", "dct"])
def test_every_component_reconstructs_exactly(mel_basis):
    data = stationary_windows(10, m=4, t=8)
    fitted = fit_separable_code(data, (4, 8), 32, mel_basis)
    torch.testing.assert_close(fitted.reconstruct(data), data, atol=1e-5, rtol=0)


def test_it_generalises_better_than_pca_from_few_windows():
    train, test = stationary_windows(40, seed=1), stationary_windows(2000, seed=2)
    separable, pca = fit_separable_code(train, (8, 16), 16), fit_pca(train, 16)
    assert mse(separable, test) < 0.95 * mse(pca, test)


def test_the_dct_variant_chooses_2d_dct_coefficients():
    data = stationary_windows(30)
    fitted = fit_separable_code(data, (8, 16), 5, mel_basis="dct")
    mel, time = dct_basis(8), dct_basis(16)
    for row in fitted.components.double().view(5, 8, 16):
        coefficients = mel @ row @ time.T  # a 2-D DCT atom has exactly one non-zero coefficient
        assert int((coefficients.abs() > 1e-5).sum()) == 1


@pytest.mark.parametrize("rows, shape, k, needle", [
    ((5, 10), (4, 4), 2, r"expects \(N, 4\*4\) rows"),
    ((5, 16), (4, 4), 17, "17 components need"),
])
def test_bad_arguments_say_what_is_wrong(rows, shape, k, needle):
    with pytest.raises(ValueError, match=needle):
        fit_separable_code(torch.zeros(rows), shape, k)
    with pytest.raises(ValueError, match="mel_basis='wavelet' is not"):
        fit_separable_code(torch.zeros(5, 16), (4, 4), 2, mel_basis="wavelet")


@pytest.mark.slow
@pytest.mark.parametrize("basis", ["separable", "dct"])
def test_the_cli_starts_a_linear_path_from_a_separable_basis(tmp_path, basis):
    from musicvae.training.cli import cli_main

    cli = cli_main(tiny_fit_args(tmp_path, "--model.linear_path", "true", "--model.linear_path_basis", basis,
                                 "--model.linear_path_lr_scale", "0", "--trainer.max_epochs", "1"))
    vae = cli.model.vae
    assert bool(vae.pca_initialised)
    # Frozen (lr scale 0): the decoder's columns are still separable components times their std,
    # so each column is a rank-1 (mel x time) image.
    columns = vae.lin_decoder.weight.detach().T.reshape(-1, cli.datamodule.n_mels, cli.datamodule.frames)
    ranks = torch.linalg.matrix_rank(columns.double(), rtol=1e-4)
    assert torch.all(ranks == 1)
