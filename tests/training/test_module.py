"""MusicVAEModule through the Python API, as a notebook user would drive it."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from musicvae import MelDataModule, MusicVAEModule, create_frequency_weights, vae_loss, vae_loss_spectral
from musicvae.errors import ConfigError

TINY = dict(n_mels=16, frames=16, latent_dim=4, channels=[8, 16])


def test_losses_are_chosen_by_name_and_report_every_part():
    x = torch.randn(3, 1, 16, 16)
    for loss, expected in (("standard", vae_loss), ("spectral", vae_loss_spectral)):
        module = MusicVAEModule(**TINY, loss=loss, beta=0.3).eval()
        x_hat, mu, logvar = module(x)
        parts = module.compute_loss(x_hat, x, mu, logvar)
        reference = expected(x_hat, x, mu, logvar, beta=0.3)
        assert parts.keys() == reference.keys()
        assert torch.allclose(parts["loss"], reference["loss"])
    assert {"spectral", "output_reg"} <= set(parts)


def test_frequency_weights_are_a_buffer_from_the_bands():
    module = MusicVAEModule(**TINY, freq_bands=[[0.0, 0.5, 3.0]])
    assert "freq_weight" in module.state_dict()
    assert torch.equal(module.freq_weight, create_frequency_weights(16, [(0.0, 0.5, 3.0)]))


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match="model.loss='spectrl'"):
        MusicVAEModule(**TINY, loss="spectrl")
    with pytest.raises(ConfigError, match="frames=18 is not divisible by 4.*data.frames"):
        MusicVAEModule(**{**TINY, "frames": 18})
    with pytest.raises(ConfigError, match="lr=0"):
        MusicVAEModule(**TINY, lr=0)


def test_python_api_trains_and_reloads(mel_folder, tmp_path):
    dm = MelDataModule(data_dir=str(mel_folder), frames=16, batch_size=4, val_split=0.3)
    model = MusicVAEModule(**TINY, lr=1e-3)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    trainer.save_checkpoint(tmp_path / "api.ckpt")
    assert torch.load(tmp_path / "api.ckpt", weights_only=True)["MelDataModule"]["std"] > 0
    reloaded = MusicVAEModule.load_from_checkpoint(tmp_path / "api.ckpt", weights_only=True)
    x = next(iter(dm.val_dataloader()))
    assert torch.allclose(reloaded.reconstruct(x), model.reconstruct(x))
    assert reloaded.sample(5, generator=torch.Generator().manual_seed(0)).shape == (5, 1, 16, 16)
