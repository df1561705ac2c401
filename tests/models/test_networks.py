"""Tests for musicvae.models.conv2d: shapes, sampling, learning, validation, precision and layout."""

import pytest
import torch

from musicvae.models.conv2d import ConvVAE, ResidualBlock, num_groups

# Small widths keep every test well under a second on a 2-core CPU.
TINY = dict(n_mels=32, frames=16, latent_dim=8, channels=(4, 8))


def _loss(x: torch.Tensor, x_hat: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    # Inline MSE + small KL; musicvae.losses is tested on its own.
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1).mean()
    return (x_hat - x).pow(2).mean() + 1e-3 * kl


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_mels=128, frames=128, latent_dim=16, channels=(4, 8, 8, 16)),  # 4 stages, square
        dict(n_mels=64, frames=32, latent_dim=5, channels=(8, 16)),  # 2 stages, non-square
        dict(n_mels=16, frames=48, latent_dim=3, channels=(6,), blocks_per_stage=2),  # odd widths
        dict(n_mels=32, frames=32, latent_dim=4, channels=(4, 8), blocks_per_stage=0),
    ],
)
def test_output_and_latent_shapes(kwargs):
    model = ConvVAE(**kwargs)
    x = torch.randn(3, 1, kwargs["n_mels"], kwargs["frames"])
    x_hat, mu, logvar = model(x)
    assert x_hat.shape == x.shape
    assert mu.shape == logvar.shape == (3, kwargs["latent_dim"])
    assert model.decode(torch.randn(2, kwargs["latent_dim"])).shape == (2, *x.shape[1:])


def test_default_config_shapes():
    model = ConvVAE()
    x_hat, mu, _ = model(torch.randn(1, 1, 128, 128))
    assert x_hat.shape == (1, 1, 128, 128) and mu.shape == (1, 64)


def test_eval_is_deterministic_and_decodes_mu():
    torch.manual_seed(0)
    model = ConvVAE(**TINY).eval()
    x = torch.randn(4, 1, 32, 16)
    with torch.no_grad():
        a, mu, _ = model(x)
        b, _, _ = model(x)
        from_mu = model.decode(mu)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, from_mu)


def test_train_mode_samples_z():
    torch.manual_seed(0)
    model = ConvVAE(**TINY).train()
    x = torch.randn(4, 1, 32, 16)
    with torch.no_grad():
        a, mu_a, _ = model(x)
        b, mu_b, _ = model(x)
        from_mu = model.decode(mu_a)
    torch.testing.assert_close(mu_a, mu_b)  # the encoder itself is deterministic
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, from_mu)


def test_reparameterize_uses_std_not_var():
    torch.manual_seed(0)
    model = ConvVAE(**TINY)
    mu = torch.full((20000, 8), 2.0)
    z = model.reparameterize(mu, torch.full_like(mu, 2 * torch.log(torch.tensor(3.0)).item()))
    assert z.mean().item() == pytest.approx(2.0, abs=0.1)
    assert z.std().item() == pytest.approx(3.0, rel=0.05)


def test_gradient_steps_reduce_loss_on_batch():
    torch.manual_seed(0)
    model = ConvVAE(**TINY)
    x = torch.randn(4, 1, 32, 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return _loss(x, *model(x)).item()

    before = eval_loss()
    model.train()
    for _ in range(5):
        opt.zero_grad()
        _loss(x, *model(x)).backward()
        opt.step()
    assert eval_loss() < before


def test_residual_blocks_start_as_identity():
    block = ResidualBlock(8)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(block(x), x)


def test_logvar_is_clamped():
    model = ConvVAE(**TINY)
    with torch.no_grad():
        model.to_latent.bias.fill_(1e4)
    _, logvar = model.encode(torch.randn(2, 1, 32, 16))
    assert logvar.max().item() <= 20.0
    # Without the clamp exp(0.5 * 1e4) is inf and the sampled reconstruction NaN.
    x_hat, _, _ = model.train()(torch.randn(2, 1, 32, 16))
    assert torch.isfinite(x_hat).all()


@pytest.mark.parametrize("channels", [4, 6, 16, 48, 256, 7])
def test_num_groups_divides_channels(channels):
    assert channels % num_groups(channels) == 0
    assert 1 <= num_groups(channels) <= 32


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        (dict(n_mels=100), ["n_mels=100", "not divisible by 16", "4 stages", "96 or 112", "fewer stages"]),
        (dict(frames=70, channels=(8, 16)), ["frames=70", "by 4", "2 stages", "68 or 72"]),
        (dict(n_mels=8, frames=64), ["n_mels=8", "by 16", "such as 16"]),
        (dict(latent_dim=0), ["latent_dim", ">= 1"]),
        (dict(channels=()), ["channels", "non-empty"]),
        (dict(channels=(8, 0)), ["channels", "positive"]),
        (dict(dropout=1.0), ["dropout", "[0, 1)"]),
        (dict(dropout=-0.1), ["dropout"]),
        (dict(blocks_per_stage=-1), ["blocks_per_stage"]),
        (dict(n_mels=0), ["n_mels", "positive"]),
    ],
)
def test_bad_config_raises_with_useful_message(kwargs, needles):
    with pytest.raises(ValueError) as info:
        ConvVAE(**kwargs)
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 2, 32, 16), (1, 32, 16), (32, 16)])
def test_forward_rejects_wrong_input_shape(shape):
    model = ConvVAE(**TINY)
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 16\)"):
        model(torch.randn(*shape))


def test_decode_rejects_wrong_latent_shape():
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        ConvVAE(**TINY).decode(torch.randn(2, 9))


def test_bf16_autocast_forward_and_backward_are_finite():
    torch.manual_seed(0)
    model = ConvVAE(**TINY)
    x = torch.randn(4, 1, 32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat, mu, logvar = model(x)
        loss = _loss(x, x_hat.float(), mu.float(), logvar.float())
    assert x_hat.shape == x.shape
    assert torch.isfinite(x_hat.float()).all() and torch.isfinite(mu.float()).all()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = ConvVAE(**TINY).eval()
    x = torch.randn(4, 1, 32, 16)
    with torch.no_grad():
        expected, _, _ = model(x)
        model = model.to(memory_format=torch.channels_last)
        got, _, _ = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
