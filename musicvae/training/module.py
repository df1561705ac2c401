"""MusicVAEModule: the VAE on log-mel windows, its loss, its validation scores and its optimizer.

Read top to bottom: the network is built from plain settings; `loss_parts` is the notebook's loss
(`vae_loss` or `vae_loss_spectral`, musicvae/losses.py); validation scores every window with
`ReconstructionScores` and refits the variance-compensation curve; prediction encodes whole
recordings. The adversarial stage is a subclass (musicvae/training/sharpen.py); what the media and
the guards need they take from hooks' outputs and public methods, never from attributes left here.

Validation with EMA: everything validation does (the scores, the compensation fit, the media and
the checkpoints written at validation end) runs between `on_validation_model_eval` and
`on_validation_model_train`, and those two hooks enter and leave the averaged weights
(musicvae/training/ema.py), whatever the order of the callbacks.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from musicvae.compensation import (PERCEPTUAL_TARGET, CompensationStats, compensate, compensation_defaults,
                                   fit_compensation_curve, with_compensation_defaults)
from musicvae.errors import ConfigError
from musicvae.losses import DEFAULT_BANDS, create_frequency_weights, vae_loss, vae_loss_spectral
from musicvae.metrics import band_edges
from musicvae.models.conv1d import TemporalConvVAE
from musicvae.models.conv2d import ConvVAE
from musicvae.models.linear_path import LinearPathVAE, fit_linear_code, init_from_code
from musicvae.training.ema import averaged_weights, modes_kept
from musicvae.training.hparams import ARCHITECTURES, KL_DEFAULTS, KLSchedule, check_model_settings, kl_schedule
from musicvae.training.lightning_private import MODULE_TRAINER
from musicvae.training.predictions import encode_recording
from musicvae.training.schedules import build_schedulers, continue_schedules, rate_groups
from musicvae.training.scoring import ReconstructionScores, scalars

NETWORKS = dict(zip(ARCHITECTURES, (ConvVAE, TemporalConvVAE)))


class MusicVAEModule(L.LightningModule):
    """A VAE on normalised log-mel windows (B, 1, n_mels, frames). Plain settings only, so checkpoints
    load with `torch.load(weights_only=True)` and every argument is a flag (`--model.NAME`);
    docs/model_options.md says what each buys.

    Args:
        n_mels, frames: the window's shape (linked to the data's settings by the command line).
        latent_dim: size of the code.
        channels: feature channels per encoder stage; each stage halves both axes.
        blocks_per_stage, dropout: residual blocks per stage, and dropout inside them.
        architecture: "conv2d" (2-D convs over the mel image, the notebook's) or "conv1d" (1-D convs over
            time with mel bins as channels; several times faster on a CPU, docs/speed.md).
        compile, channels_last: `torch.compile` the network in place; channels-last memory format.
        loss: "standard" (the notebook's `vae_loss`) or "spectral" (`vae_loss_spectral`).
        beta: weight of the KL term, on the per-element scale of the reconstruction.
        kl: the KL schedule, `{warmup_steps, free_bits}` (musicvae.training.hparams.KLSchedule).
        spectral_weight, output_reg_weight: weights of the FFT-magnitude loss and the output-range
            penalty (spectral loss only).
        freq_bands: (start_frac, end_frac, weight) bands of the frequency weights.
        lr, weight_decay: Adam's rate; decoupled weight decay (0: plain Adam, as in the notebook).
        lr_schedule, warmup_steps, lr_min_ratio, plateau_factor, plateau_patience: the rate's schedule
            (musicvae/training/schedules.py).
        ema_decay: keep an EMA of the weights (musicvae/training/ema.py; null: none).
        init_from: a checkpoint whose weights start this new run (read by the command line only).
        linear_path: a linear path started from a linear code of the training windows
            (musicvae/models/linear_path.py); `linear_path_examples` windows at most, its own rate at
            `linear_path_lr_scale` x lr, the nonlinear path's heads at `nonlinear_init_scale`,
            `linear_path_components` codes (default all), basis "pca", "separable" or "dct".
    """

    def __init__(
        self,
        n_mels: int = 128,
        frames: int = 128,
        latent_dim: int = 64,
        channels: list[int] = [32, 64, 128, 256],  # noqa: B006 - a plain list keeps the CLI/hparams simple
        blocks_per_stage: int = 1,
        dropout: float = 0.0,
        architecture: Literal["conv2d", "conv1d"] = "conv2d",
        compile: bool = False,
        channels_last: bool = False,
        loss: Literal["standard", "spectral"] = "spectral",
        beta: float = 0.05,
        kl: KLSchedule = KL_DEFAULTS,  # noqa: B006 - never mutated
        spectral_weight: float = 0.1,
        output_reg_weight: float = 0.01,
        # Typed as triples, not list[list[float]]: jsonargparse 4.53 turns `--model.freq_bands+=[[a,b,w]]`
        # on a list of lists into every existing band repeated twice (measured); with tuples it appends.
        freq_bands: list[tuple[float, float, float]] = [list(b) for b in DEFAULT_BANDS],  # noqa: B006
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        lr_schedule: Literal["constant", "cosine", "plateau"] = "constant",
        warmup_steps: int = 0,
        lr_min_ratio: float = 0.01,
        plateau_factor: float = 0.5,
        plateau_patience: int = 3,
        ema_decay: Optional[float] = None,
        init_from: Optional[str] = None,
        linear_path: bool = False,
        linear_path_examples: int = 16384,
        linear_path_lr_scale: float = 0.1,
        nonlinear_init_scale: float = 0.0,
        linear_path_components: Optional[int] = None,
        linear_path_basis: Literal["pca", "separable", "dct"] = "pca",
    ) -> None:
        super().__init__()
        kl = kl_schedule(kl)
        freq_bands = [[float(v) for v in band] for band in freq_bands]  # stored as plain lists, as before
        self.save_hyperparameters()
        check_model_settings(self.hparams)
        bands = [tuple(band) for band in freq_bands]
        try:
            self.vae = NETWORKS[architecture](n_mels=n_mels, frames=frames, latent_dim=latent_dim,
                                              channels=tuple(channels), blocks_per_stage=blocks_per_stage,
                                              dropout=dropout)
            if linear_path:
                self.vae = LinearPathVAE(self.vae, nonlinear_init_scale, linear_path_components)
            # A buffer, so the weights travel in checkpoints and follow the module to the GPU.
            self.register_buffer("freq_weight", create_frequency_weights(n_mels, bands))
            self.band_edges = band_edges(n_mels, bands)
        except ValueError as err:  # n_mels and frames come from --data.mel.n_mels and --data.frames
            raise ConfigError(f"model: {err} (n_mels is data.mel.n_mels, frames data.frames)") from None
        if channels_last:
            self.vae.to(memory_format=torch.channels_last)
        if compile:
            self.vae.compile()
        # The scores of each validation/test epoch (musicvae/training/scoring.py; exact under DDP). Their
        # `std`, the data's z-score scale, is handed over by the DataHandOver callback before each epoch.
        self.scores = ReconstructionScores(n_mels, bands, latent_dim)
        # Variance compensation (musicvae/compensation.py): gain curve and perceptual strength, refitted at each
        # validation and kept as buffers, so each checkpoint has its own weights' curve; test never refits.
        self.val_compensation = CompensationStats(n_mels, self.band_edges)
        for name, value in compensation_defaults(n_mels).items():
            self.register_buffer(name, value)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.vae(x)

    def compute_loss(self, x_hat: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
        """The configured loss and all its parts, by name. Weights are read from `self.hparams` at every
        step, so a value changed on resume applies from the first resumed step."""
        hp = self.hparams
        beta, free_bits = self.current_beta(), hp.kl["free_bits"]  # kl was completed in __init__
        if hp.loss == "standard":
            return vae_loss(x_hat, x, mu, logvar, beta=beta, free_bits=free_bits)
        return vae_loss_spectral(x_hat, x, mu, logvar, beta=beta, free_bits=free_bits, freq_weight=self.freq_weight,
                                 spectral_weight=hp.spectral_weight, output_reg_weight=hp.output_reg_weight)

    def loss_parts(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training loss of `batch` and its parts (NonFiniteGuard recomputes them to name a NaN)."""
        x_hat, mu, logvar = self(batch)
        return self.compute_loss(x_hat, batch, mu, logvar)

    def current_beta(self) -> float:
        """`beta`, scaled by the KL warm-up while it lasts; validation uses the value of the step it follows,
        so val/loss tracks what is optimised."""
        warmup = self.hparams.kl["warmup_steps"]
        if warmup <= 0 or getattr(self, MODULE_TRAINER) is None:
            return self.hparams.beta
        return self.hparams.beta * min(1.0, self.global_step / warmup)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> Optional[torch.Tensor]:
        parts = self.loss_parts(batch)
        self.log("train/loss", parts["loss"], prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch))
        self.log_dict({f"train/{k}": v for k, v in parts.items() if k != "loss"}, on_step=True, on_epoch=True,
                      batch_size=len(batch))
        return parts["loss"]

    def on_train_start(self) -> None:
        for note in continue_schedules(self.trainer, self.hparams):
            rank_zero_info(f"musicvae: {note}")

    @property
    def needs_linear_start(self) -> bool:
        """A linear path whose code has not been fitted yet (a resume restores a fitted one)."""
        return isinstance(self.vae, LinearPathVAE) and not bool(self.vae.pca_initialised)

    def start_linear_path(self, windows: Optional[torch.Tensor]) -> None:
        """Fit the linear path's code to `windows` (N, 1, n_mels, frames), given on the first process only,
        and start every process from it. Called when training starts, so it counts against max_time."""
        k = self.vae.n_linear
        if windows is not None:
            if len(windows) < k:
                raise ConfigError(f"model.linear_path: {len(windows)} training segments cannot give {k} PCA "
                                  f"components (model.latent_dim); use more data or a smaller latent_dim")
            code = fit_linear_code(windows, k, self.hparams.linear_path_basis)
            init_from_code(self.vae, code, self.hparams.beta)
        # Every process starts from the first one's code (DDP has already synchronised the other weights).
        for param in (*self.vae.lin_encoder.parameters(), *self.vae.lin_decoder.parameters(),
                      *self.vae.inner.to_latent.parameters(), self.vae.pca_initialised):
            param.data.copy_(self.trainer.strategy.broadcast(param.data.clone(), src=0))

    def on_validation_model_eval(self) -> None:
        self._validation_scope = ExitStack()
        # Overriding on_validation_model_train turns off Lightning's restoring of each submodule's
        # mode, so the modes are kept here (a frozen encoder stays in eval).
        self._validation_scope.enter_context(modes_kept(self))
        self._validation_scope.enter_context(averaged_weights(self.trainer, self))
        super().on_validation_model_eval()

    def on_validation_model_train(self) -> None:
        self._validation_scope.close()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        out = self._score_batch("val", batch)
        self.val_compensation.update(out["reconstruction"], batch)
        return out

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._score_batch("test", batch)

    def _score_batch(self, stage: str, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logs the loss parts and updates the scores; returns what the media callback draws from
        (`reconstruction`, `mu`, `logvar`), through Lightning's batch-end hooks."""
        # In eval mode the VAE decodes the posterior mean: the score has no sampling noise.
        x_hat, mu, logvar = self(batch)
        parts = self.compute_loss(x_hat, batch, mu, logvar)
        self.log(f"{stage}/loss", parts["loss"], prog_bar=True, sync_dist=True, batch_size=len(batch))
        self.log_dict({f"{stage}/{k}": v for k, v in parts.items() if k != "loss"}, sync_dist=True,
                      batch_size=len(batch))
        self.scores.update(x_hat, batch, mu, logvar)
        return {"reconstruction": x_hat, "mu": mu, "logvar": logvar}

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")
        self._fit_compensation()

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    def _log_scores(self, stage: str) -> None:
        values = self.scores.compute()  # reduced across processes
        self.scores.reset()
        self.log_dict({f"{stage}/{k}": v for k, v in scalars(values).items()})

    def _fit_compensation(self) -> None:
        """Refit the gain curve and the perceptual strength on this epoch's validation outputs; skipped in
        the sanity check (two batches are not the validation set) and when no batch was seen."""
        if self.val_compensation.update_count == 0 or self.trainer.sanity_checking:
            self.val_compensation.reset()
            return
        sums = {k: v.cpu() for k, v in self.val_compensation.compute().items()}  # reduced across processes
        self.val_compensation.reset()
        fit = fit_compensation_curve(sums, self.band_edges, PERCEPTUAL_TARGET)
        self.output_gain.copy_(fit["gain"])
        self.output_alpha.fill_(fit["alpha"])
        self.gain_fitted.fill_(True)
        index = int(round(fit["alpha"] * (len(fit["curve"]["alpha"]) - 1)))
        self.log_dict({"val/alpha_perceptual": float(fit["alpha"]), "val/mse_perceptual": float(fit["curve"]["mse"][index]),
                       "val/perceptual_reached": float(fit["reached"])})

    def compensated(self, x_hat: torch.Tensor, alpha: Optional[float] = None) -> torch.Tensor:
        """`x_hat` with variance compensation at `alpha` (None: the fitted perceptual point).

        Raises:
            ConfigError: a positive strength asked of a module whose curve was never fitted.
        """
        alpha = float(self.output_alpha) if alpha is None else float(alpha)
        if alpha > 0:
            self.require_curve()
        return compensate(x_hat, self.output_gain, alpha, self.band_edges)

    def require_curve(self) -> None:
        """Raises ConfigError, with the remedy, when no compensation curve has been fitted."""
        if not bool(self.gain_fitted):
            raise ConfigError(
                "this model has no variance-compensation curve (it is fitted on the validation recordings at each "
                "validation of training; checkpoints written before musicvae had it lack one): use alpha 0, or "
                "resume the run for one more epoch to fit it")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """One recording's latent codes: `batch` holds all its windows (MelDataModule.predict_dataloader);
        see `predictions.encode_recording` for what comes back."""
        return encode_recording(self.vae, batch, self.device)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of normalised mels `x` (B, 1, n_mels, frames) from the posterior mean."""
        mu, _ = self.vae.encode(x.to(self.device))
        return self.vae.decode(mu)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Decode `n` draws from the prior N(0, temperature^2 I) -> (n, 1, n_mels, frames)."""
        z = torch.randn(n, self.hparams.latent_dim, generator=generator) * temperature
        return self.vae.decode(z.to(self.device))

    #: Parameters a checkpoint without them (a plain VAE) may lack when it starts this model (init_from).
    fresh_prefixes: tuple[str, ...] = ()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The bands are a hyper-parameter: on resume the configured ones win over the stored buffer.
        checkpoint["state_dict"]["freq_weight"] = self.freq_weight.detach().clone()
        with_compensation_defaults(checkpoint["state_dict"], self.hparams.n_mels)

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[dict]]:
        optimizers = self.build_optimizers()
        endless = self.trainer.max_epochs == -1 and self.trainer.max_steps == -1
        # "plateau" watches what picks best.ckpt (--monitor): the first checkpoint callback's.
        monitor = getattr(self.trainer.checkpoint_callback, "monitor", None) or "val/loss"
        return optimizers, build_schedulers(optimizers[0], self.hparams, endless, monitor)

    def build_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers over this module's parameter groups at their base rates (no schedule)."""
        hp = self.hparams
        groups = rate_groups(list(self.parameters()), self.linear_parameters(), hp.lr, hp.linear_path_lr_scale)
        if hp.weight_decay > 0:
            return [torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)]
        return [torch.optim.Adam(groups, lr=hp.lr)]

    def linear_parameters(self) -> set[int]:
        """Ids of the linear path's parameters (none without one)."""
        if not isinstance(self.vae, LinearPathVAE):
            return set()
        return {id(p) for m in (self.vae.lin_encoder, self.vae.lin_decoder) for p in m.parameters()}
