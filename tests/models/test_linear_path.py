"""The 1-D temporal VAE and the PCA-initialised linear path: shapes, PCA equivalence at step 0,
whitened codes, initialisation once (not again on resume), free bits and KL warm-up, export."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_fit_args
from musicvae.errors import ConfigError
from musicvae.inference.export import script
from musicvae.models.linear_path import LinearPathVAE, init_from_code
from musicvae.losses import vae_loss
from musicvae.training.module import MusicVAEModule
from musicvae.models.linear_codes import fit_pca
from musicvae.models.conv1d import TemporalConvVAE
from musicvae.models.conv2d import ConvVAE


def test_temporal_vae_shapes_and_checks():
    vae = TemporalConvVAE(n_mels=20, frames=16, latent_dim=5, channels=(8, 12), blocks_per_stage=1).eval()
    x = torch.randn(3, 1, 20, 16)
    x_hat, mu, logvar = vae(x)
    assert x_hat.shape == x.shape and mu.shape == logvar.shape == (3, 5)
    with pytest.raises(ValueError, match="frames=18 is not divisible by 4"):
        TemporalConvVAE(n_mels=20, frames=18, channels=(8, 12))
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 1, 20, 16\)"):
        vae.encode(torch.randn(3, 1, 16, 16))
    with pytest.raises(ValueError, match=r"expected latent of shape \(B, 5\)"):
        vae.decode(torch.randn(3, 4))


def _structured(n: int, m: int = 8, t: int = 8, rank: int = 3, seed: int = 0) -> torch.Tensor:
    """Low-rank data plus a little noise, so PCA has a clear answer."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, m * t, generator=g)
    return (torch.randn(n, rank, generator=g) * torch.tensor([3.0, 2.0, 1.0][:rank]) @ basis
            + 0.05 * torch.randn(n, m * t, generator=g) + 0.5).view(n, 1, m, t)


@pytest.mark.parametrize("inner", ["conv1d", "conv2d"])
def test_linear_path_is_whitened_pca_after_init(inner):
    torch.manual_seed(0)
    make = TemporalConvVAE if inner == "conv1d" else ConvVAE
    vae = LinearPathVAE(make(n_mels=8, frames=8, latent_dim=3, channels=(4, 8))).eval()
    data = _structured(200)
    # Before init the nonlinear half contributes nothing to mu or x_hat.
    with torch.no_grad():
        assert torch.equal(vae.inner.posterior(data)[0], torch.zeros(200, 3))
        assert torch.equal(vae.inner.generate(torch.randn(5, 3)), torch.zeros(5, 1, 8, 8))
    assert not bool(vae.pca_initialised)
    pca = fit_pca(data.flatten(1), 3)
    init_from_code(vae, pca, beta=0.05)
    assert bool(vae.pca_initialised)
    with torch.no_grad():
        x_hat, mu, _ = vae(data)
    torch.testing.assert_close(x_hat, pca.reconstruct(data), atol=1e-4, rtol=1e-4)
    # Whitened: unit variance and no correlation over the data, as the N(0, I) prior expects.
    torch.testing.assert_close(torch.cov(mu.T, correction=0), torch.eye(3), atol=1e-3, rtol=0)


def test_init_from_code_refuses_a_mismatched_pca():
    vae = LinearPathVAE(TemporalConvVAE(n_mels=8, frames=8, latent_dim=3, channels=(4, 8)))
    with pytest.raises(ValueError, match="3 linear codes"):
        init_from_code(vae, fit_pca(_structured(50).flatten(1), 2), beta=0.05)
    with pytest.raises(ValueError, match=r"\(n_linear\)=4 must be in \[1, latent_dim=3\]"):
        LinearPathVAE(TemporalConvVAE(n_mels=8, frames=8, latent_dim=3, channels=(4, 8)), n_linear=4)


def test_a_partial_linear_path_leaves_the_other_codes_to_the_nonlinear_half():
    torch.manual_seed(0)
    vae = LinearPathVAE(TemporalConvVAE(n_mels=8, frames=8, latent_dim=4, channels=(4, 8)), n_linear=2).eval()
    data = _structured(200)
    with torch.no_grad():
        free_before = vae.inner.posterior(data)[0][:, 2:].clone()
    pca = fit_pca(data.flatten(1), 2)
    init_from_code(vae, pca, beta=0.05)
    with torch.no_grad():
        mu, logvar = vae.posterior(data)
        linear = vae.lin_decoder(mu).view_as(data)
    # Codes 0-1: whitened PCA, decoded by the linear path exactly as PCA-2 reconstructs.
    torch.testing.assert_close(torch.cov(mu[:, :2].T, correction=0), torch.eye(2), atol=1e-3, rtol=0)
    torch.testing.assert_close(linear, pca.reconstruct(data), atol=1e-4, rtol=1e-4)
    # Codes 2-3: the nonlinear encoder's at its default start, unseen by the linear path.
    assert float(free_before.abs().max()) > 0
    torch.testing.assert_close(mu[:, 2:], free_before, atol=0, rtol=0)
    assert torch.equal(vae.lin_encoder.weight[2:], torch.zeros(2, 64))
    assert torch.equal(vae.lin_decoder.weight[:, 2:], torch.zeros(64, 2))
    # ... and stay so through training: the free codes' linear weights get no gradient.
    vae.train()
    used = vae.lin_encoder.weight[:2].detach().clone()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        x_hat, mu, logvar = vae(data)
        vae_loss(x_hat, data, mu, logvar, beta=0.05)["loss"].backward()
        optimizer.step()
    assert torch.equal(vae.lin_encoder.weight[2:], torch.zeros(2, 64)) and torch.equal(vae.lin_encoder.bias[2:], torch.zeros(2))
    assert torch.equal(vae.lin_decoder.weight[:, 2:], torch.zeros(64, 2))
    assert not torch.equal(vae.lin_encoder.weight[:2], used)  # the linear codes' weights do train


def test_free_bits_floor_each_dimension_and_keep_the_true_kl():
    mu, logvar = torch.zeros(4, 6), torch.zeros(4, 6)  # KL exactly 0 in every dimension
    mu[:, 0] = 2.0  # dimension 0: KL = 2 nats
    x = torch.zeros(4, 1, 2, 5)  # 10 elements per example
    plain = vae_loss(x, x, mu, logvar, beta=1.0)
    floored = vae_loss(x, x, mu, logvar, beta=1.0, free_bits=0.5)
    assert float(plain["kl_nats"]) == pytest.approx(2.0) == float(floored["kl_nats"])
    assert float(plain["kl"]) == pytest.approx(2.0 / 10)
    assert float(floored["kl"]) == pytest.approx((2.0 + 5 * 0.5) / 10)  # 5 dims raised to the floor


def test_kl_warmup_scales_beta_with_the_step():
    module = MusicVAEModule(n_mels=16, frames=16, latent_dim=4, channels=[4, 8], beta=0.2, kl={"warmup_steps": 100})
    assert module.current_beta() == 0.2  # outside a trainer: the configured value
    module._trainer = type("T", (), {"global_step": 25})()
    assert module.current_beta() == pytest.approx(0.05)
    module._trainer.global_step = 400
    assert module.current_beta() == pytest.approx(0.2)


@pytest.mark.parametrize("kwargs, needle", [
    ({"architecture": "conv3d"}, "model.architecture='conv3d'"),
    ({"kl": {"free_bits": -1.0}}, "model.kl.free_bits=-1.0"),
    ({"kl": {"warmup_steps": -5}}, "model.kl.warmup_steps=-5"),
])
def test_bad_settings_name_themselves(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        MusicVAEModule(n_mels=16, frames=16, latent_dim=4, channels=[4, 8], **kwargs)


LINEAR_FLAGS = ("--model.architecture", "conv1d", "--model.linear_path", "true", "--model.channels", "[16, 16]",
                "--model.kl.free_bits", "0.1", "--model.kl.warmup_steps", "5")


@pytest.mark.slow
def test_cli_fit_initialises_once_and_exports(tmp_path):
    from musicvae.training.cli import cli_main
    from musicvae.training.checkpoints import load_checkpoint
    from musicvae.inference.generation import load_generation_model
    from musicvae.inference.export import max_difference

    cli = cli_main(tiny_fit_args(tmp_path, *LINEAR_FLAGS, "--trainer.max_epochs", "1"))
    module = cli.model
    assert bool(module.vae.pca_initialised)
    ckpt = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert bool(ckpt["state_dict"]["vae.pca_initialised"])
    weight = ckpt["state_dict"]["vae.lin_encoder.weight"]
    # Resume: the restored (trained) linear path is kept, not re-fitted from PCA.
    resumed = cli_main(tiny_fit_args(tmp_path, *LINEAR_FLAGS, "--trainer.max_epochs", "1",
                                     "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")))
    assert resumed.trainer.global_step == cli.trainer.global_step  # nothing left to train: weights as loaded
    torch.testing.assert_close(resumed.model.vae.lin_encoder.weight, weight, atol=0, rtol=0)
    # A learning rate changed on resume reaches both groups, the linear path's at its fixed scale.
    probe = tmp_path / "probe.json"
    spec = [{"class_path": "probes.FirstStepProbe", "init_args": {"out": str(probe)}}]
    cli_main(tiny_fit_args(tmp_path, *LINEAR_FLAGS, "--trainer.max_epochs", "2", "--model.lr", "2e-4",
                           "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--trainer.callbacks", json.dumps(spec)))
    assert json.loads(probe.read_text())["lr"] == pytest.approx([2e-4, 2e-5])
    # The architecture exports like the default one.
    model = load_generation_model(tmp_path / "ckpt" / "last.ckpt", "cpu")
    assert max_difference(script(model), model) < 1e-4


def test_init_scale_keeps_a_small_nonlinear_start():
    torch.manual_seed(0)
    vae = LinearPathVAE(TemporalConvVAE(n_mels=8, frames=8, latent_dim=3, channels=(4, 8)), init_scale=0.1).eval()
    with torch.no_grad():
        out = vae.inner.generate(torch.randn(5, 3))
    assert 0 < float(out.abs().max()) < 1.0  # present, and small
