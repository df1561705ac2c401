"""SharpenModule, the adversarial stage: sharpen a trained VAE's decoder against a discriminator (configs/sharp.yaml).

An MSE-trained decoder outputs the mean of what a code could have been, so its outputs are
blurred (musicvae/compensation.py measures by how much). RAVE (Caillon & Esling 2021,
arXiv:2111.05011) and the latent-diffusion autoencoders get sharp outputs the same way: train the
VAE, then freeze the encoder (the codes stay what they were) and fine-tune the decoder with a
discriminator, feature matching and the reconstruction loss kept, the adversarial term weighted
adaptively (Esser et al. 2021) and switched on after a start step.

Two optimizers under Lightning's manual optimization, one step each per batch, decoder first:
- decoder: ``mse + w * (hinge_g + feature_matching)`` once ``global_step >= adv_start_step``, plain
  MSE before; ``w = adv_weight * |grad mse| / |grad (hinge_g + fm)|`` at the decoder's last layer.
  Latents are drawn from the frozen posterior, as in VAE training, so the decoder also learns the
  neighbourhood of each code that prior samples land in.
- discriminator: the hinge loss on augmented real and decoded segments, from the first batch, so
  it has learnt the blur by the time the decoder starts to answer it.

Steps: Lightning's ``global_step`` counts optimizer steps, so here it advances by 2 per batch:
``trainer.max_steps``, ``adv_start_step``, ``checkpoint_every_n_steps`` and ``kl.warmup_steps`` are
all in those units (1000 = 500 batches). Lightning refuses ``gradient_clip_val`` under manual
optimization; the stage clips each optimizer's gradients itself (``adv_grad_clip``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from musicvae.errors import ConfigError
from musicvae.losses import (adaptive_weight, feature_matching_loss, hinge_discriminator_loss,
                             hinge_generator_loss)
from musicvae.models.discriminator import PatchDiscriminator, augment_pair
from musicvae.models.linear_path import LinearPathVAE
from musicvae.training.module import MusicVAEModule
from musicvae.training.schedules import LOG_NAME, StepSchedule, rate_groups

#: Optimizer steps per batch in this stage (the decoder's and the discriminator's).
STEPS_PER_BATCH = 2


def decoder_parameters(vae: nn.Module) -> list[nn.Parameter]:
    """The parameters that map a latent to a log-mel: `from_latent` and `decoder` (and a linear path's
    decoder half). Everything else is the encoder, frozen in this stage."""
    inner = vae.inner if isinstance(vae, LinearPathVAE) else vae
    params = [*inner.from_latent.parameters(), *inner.decoder.parameters()]
    if isinstance(vae, LinearPathVAE):
        params += list(vae.lin_decoder.parameters())
    return params


def last_decoder_weight(vae: nn.Module) -> Tensor:
    """The weight of the decoder's output layer, where the adaptive weight compares gradients."""
    inner = vae.inner if isinstance(vae, LinearPathVAE) else vae
    return inner.output_layer.weight


def freeze_encoder(vae: nn.Module) -> int:
    """Stops gradients to every parameter outside :func:`decoder_parameters`; returns how many."""
    decoder = {id(p) for p in decoder_parameters(vae)}
    frozen = [p for p in vae.parameters() if id(p) not in decoder]
    for p in frozen:
        p.requires_grad_(False)
    return len(frozen)


def _clip(module: Any, optimizer: Any) -> None:
    clip = module.hparams.get("adv_grad_clip")
    if clip:
        module.clip_gradients(optimizer, gradient_clip_val=float(clip), gradient_clip_algorithm="norm")


def adversarial_step(module: Any, batch: Tensor) -> dict[str, Tensor]:
    """One batch of the stage on `module` (a SharpenModule).

    Returns the detached parts logged under ``train/``: ``loss`` (the decoder's), ``recon`` (MSE),
    ``adv``, ``feature_matching``, ``adaptive_weight`` and ``adv_grad_norm`` (the weighted adversarial
    gradient's norm at the decoder's output layer; all 0 before the start step), ``adv_active``,
    ``loss_d``, ``d_real`` and ``d_fake`` (mean logits) and ``d_accuracy``.
    """
    hp = module.hparams
    opt_g, opt_d = module.optimizers()
    active = module.global_step >= int(hp.adv_start_step)
    with torch.no_grad():
        mu, logvar = module.vae.encode(batch)  # the frozen encoder's posterior
    x_hat = module.vae.decode(module.vae.reparameterize(mu, logvar))
    zero = x_hat.new_zeros(())

    # The decoder's step.
    module.toggle_optimizer(opt_g)
    recon = F.mse_loss(x_hat, batch)
    parts = {"recon": recon, "adv": zero, "feature_matching": zero, "adaptive_weight": zero, "adv_grad_norm": zero}
    loss_g = recon
    if active:
        real_in, fake_in = augment_pair(batch, x_hat) if hp.disc_augment else (batch, x_hat)
        fake_logits, fake_features = module.discriminator(fake_in)
        with torch.no_grad():
            _, real_features = module.discriminator(real_in)
        adv = hinge_generator_loss(fake_logits)
        matching = feature_matching_loss(real_features, fake_features)
        balance, adv_norm = adaptive_weight(recon, adv + matching, last_decoder_weight(module.vae))
        weight = float(hp.adv_weight) * balance
        loss_g = recon + weight * (adv + matching)
        # adv_grad_norm: how hard the discriminator pushes the decoder's output layer, after weighting.
        parts.update(adv=adv, feature_matching=matching, adaptive_weight=weight, adv_grad_norm=weight * adv_norm)
    opt_g.zero_grad(set_to_none=True)
    module.manual_backward(loss_g)
    _clip(module, opt_g)
    opt_g.step()
    module.untoggle_optimizer(opt_g)

    # The discriminator's step, on fresh augmentations of the same pair.
    module.toggle_optimizer(opt_d)
    fake = x_hat.detach()
    real_in, fake_in = augment_pair(batch, fake) if hp.disc_augment else (batch, fake)
    real_logits, _ = module.discriminator(real_in)
    fake_logits, _ = module.discriminator(fake_in)
    loss_d = hinge_discriminator_loss(real_logits, fake_logits)
    opt_d.zero_grad(set_to_none=True)
    module.manual_backward(loss_d)
    _clip(module, opt_d)
    opt_d.step()
    module.untoggle_optimizer(opt_d)

    with torch.no_grad():
        accuracy = ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()) / 2
    out = {"loss": loss_g, **parts, "adv_active": torch.tensor(float(active)), "loss_d": loss_d,
           "d_real": real_logits.mean(), "d_fake": fake_logits.mean(), "d_accuracy": accuracy}
    return {k: v.detach() if isinstance(v, Tensor) else torch.tensor(float(v)) for k, v in out.items()}


class SharpenModule(MusicVAEModule):
    """The adversarial stage on a trained VAE (chosen with `--model SharpenModule`, configs/sharp.yaml):
    the encoder frozen, the decoder fine-tuned against a PatchGAN discriminator with manual optimization.
    Start it from the VAE with `--model.init_from`.

    Args:
        adv_weight: scale of the adaptively weighted adversarial and feature-matching terms.
        adv_start_step: global step (optimizer steps: two per batch here) from which the decoder answers
            the discriminator; before it only the discriminator learns.
        disc_lr: the discriminator's Adam learning rate.
        disc_channels: the discriminator's channels per stride-2 stage.
        disc_augment: augment what the discriminator sees (time shift, level, cutout; the same for each
            real/decoded pair): without it a discriminator overfits small data.
        adv_grad_clip: gradient-norm clip of each optimizer (null: none); the stage's stand-in for
            `trainer.gradient_clip_val`, which Lightning refuses under manual optimization.
        **kwargs: MusicVAEModule's settings (the VAE's shape must be the trained one's).
    """

    #: Parameters a plain VAE's checkpoint lacks when it starts this stage (init_from).
    fresh_prefixes = ("discriminator.",)

    def __init__(self, adv_weight: float = 0.1, adv_start_step: int = 0, disc_lr: float = 1e-4,
                 disc_channels: list[int] = [32, 64, 128],  # noqa: B006
                 disc_augment: bool = True, adv_grad_clip: Optional[float] = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if adv_weight < 0 or adv_start_step < 0 or disc_lr <= 0 or (adv_grad_clip is not None and adv_grad_clip <= 0):
            raise ConfigError(f"model.adv_weight={adv_weight} and model.adv_start_step={adv_start_step} must be "
                              f"non-negative, model.disc_lr={disc_lr} and model.adv_grad_clip={adv_grad_clip} positive")
        if self.hparams.lr_schedule != "constant" or self.hparams.warmup_steps > 0:
            raise ConfigError("model.lr_schedule and model.warmup_steps: the adversarial stage steps its optimizers "
                              "itself at constant rates (--model.lr, --model.disc_lr); leave them at constant and 0")
        # After the VAE exists and before any optimizer: the encoder's weights stay those of init_from.
        self.discriminator = PatchDiscriminator(tuple(disc_channels))
        freeze_encoder(self.vae)
        self.automatic_optimization = False

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        parts = adversarial_step(self, batch)
        self.log("train/loss", parts.pop("loss"), prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch))
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, on_step=True, on_epoch=True, batch_size=len(batch))

    def loss_parts(self, batch: Tensor) -> dict[str, Tensor]:
        """The stage's losses of `batch` without their weighting (NonFiniteGuard names a NaN with them):
        the decoder's MSE, adversarial and feature-matching terms and the discriminator's hinge loss."""
        mu, logvar = self.vae.encode(batch)
        x_hat = self.vae.decode(self.vae.reparameterize(mu, logvar))
        fake_logits, fake_features = self.discriminator(x_hat)
        real_logits, real_features = self.discriminator(batch)
        return {"decoder recon": F.mse_loss(x_hat, batch), "decoder adv": hinge_generator_loss(fake_logits),
                "decoder feature_matching": feature_matching_loss(real_features, fake_features),
                "discriminator loss": hinge_discriminator_loss(real_logits, fake_logits)}

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[dict]]:
        optimizers = self.build_optimizers()
        # Constant schedulers, never stepped (manual optimization): they name the logged rates.
        return optimizers, [{"scheduler": LambdaLR(opt, StepSchedule("constant", 0, None, 1.0)), "name": name}
                            for opt, name in zip(optimizers, (LOG_NAME, "train/disc_lr"))]

    def build_optimizers(self) -> list[torch.optim.Optimizer]:
        """The decoder's optimizer (the linear path's half at its lr_scale; left out at 0) and the
        discriminator's; Adam with beta1 0.5 as is usual for GANs, whose targets move with every step."""
        hp = self.hparams
        decoder = decoder_parameters(self.vae)
        linear = {id(p) for p in getattr(self.vae, "lin_decoder", nn.Identity()).parameters()}
        groups = rate_groups(decoder, linear, hp.lr, float(hp.linear_path_lr_scale), keep_frozen=False)
        return [torch.optim.Adam(groups, lr=hp.lr, betas=(0.5, 0.9)),
                torch.optim.Adam([{"params": list(self.discriminator.parameters()), "lr": hp.disc_lr,
                                   "lr_from": "disc_lr"}], lr=hp.disc_lr, betas=(0.5, 0.9))]
