"""MusicVAEModule: the ConvVAE with the notebook's losses, logging and optimizer."""

from __future__ import annotations

from typing import Literal, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import LambdaLR

from musicvae.data.segments import Normalizer
from musicvae.errors import ConfigError
from musicvae.losses import DEFAULT_BANDS, create_frequency_weights, vae_loss, vae_loss_spectral
from musicvae.models.linear_path import LinearPathVAE, init_from_code
from musicvae.models.conv2d import ConvVAE
from musicvae.models.conv1d import TemporalConvVAE
from musicvae.compensation import PERCEPTUAL_TARGET, CompensationStats, compensate, fit_compensation_curve
from musicvae.metrics import (REALISM_VIEWS, GaussianFit, LatentDiagnostics, ReconstructionDiagnostics, band_edges,
                              gaussian_distance)
from musicvae.models.discriminator import PatchDiscriminator
from musicvae.training.adversarial import adversarial_step, decoder_parameters, freeze_encoder
from musicvae.training.lightning_private import MODULE_TRAINER
from musicvae.training.ema import check_decay
from musicvae.training.schedules import LOG_NAME, SCHEDULES, StepSchedule, build_schedulers, continue_schedules
from musicvae.models.linear_codes import fit_pca, fit_separable_code, stack_segments

LOSSES = ("standard", "spectral")
LINEAR_BASES = ("pca", "separable", "dct")
ARCHITECTURES = {"conv2d": ConvVAE, "conv1d": TemporalConvVAE}


class MusicVAEModule(L.LightningModule):
    """A VAE on normalised log-mel segments, trained with `vae_loss` or `vae_loss_spectral`.

    Only plain values are taken (numbers, strings, lists), so checkpoints load with
    `torch.load(weights_only=True)` and every argument is a command-line flag.

    Args:
        n_mels: mel bins of the input (linked to the data's mel settings by the CLI).
        frames: frames per segment (linked to `data.frames` by the CLI).
        latent_dim: size of the latent vector.
        channels: feature channels per encoder stage; each stage halves both axes.
        blocks_per_stage: residual blocks per stage.
        dropout: dropout inside residual blocks.
        loss: "standard" (the notebook's `vae_loss`) or "spectral" (`vae_loss_spectral`).
        beta: weight of the KL term, on the per-element scale of the reconstruction.
        spectral_weight: weight of the FFT-magnitude loss (spectral loss only).
        output_reg_weight: weight of the output-range penalty (spectral loss only).
        freq_bands: (start_frac, end_frac, weight) bands of the frequency weights.
        lr: Adam learning rate.
        weight_decay: AdamW-style decoupled weight decay (0 = plain Adam, as in the notebook).
        n_figure_examples: validation examples drawn in the TensorBoard figure each epoch.
        audio_every_n_epochs: every this many validation epochs, a few validation clips go to
            TensorBoard as audio, input and reconstruction inverted alike (0 turns it off).
        n_audio_clips: clips per time (taken from the figure's examples).
        griffin_lim_iters: Griffin-Lim iterations for those clips (32: ~0.006 worse spectral
            convergence than 64 at half the cost; they are for listening, not for scoring).
        compile: compile the VAE with `torch.compile` (in place: checkpoints keep their keys and
            load with or without it). Pays on GPUs; slow to start, and seldom faster, on CPUs.
        channels_last: keep convolution weights and activations in channels-last memory format
            (NHWC), which tensor-core GPUs and oneDNN CPUs run faster for many conv shapes.
        architecture: "conv2d" (ConvVAE: 2-D convs over the mel image, the notebook's) or "conv1d"
            (TemporalConvVAE: 1-D convs over time with mel bins as channels, several times the
            steps per second on a CPU; docs/speed.md).
        linear_path: add a linear path initialised from PCA of the training segments when training
            starts (musicvae/models/linear_path.py): training begins at PCA's reconstructions.
        linear_path_examples: at most this many training segments (evenly spaced) for that PCA; its
            stack takes 4 bytes per value (16384 segments of 128x128: 1 GiB), exact PCA up to 4096
            and the randomized one beyond (musicvae.models.linear_codes.fit_pca).
        linear_path_lr_scale: the linear path's learning rate as a multiple of `lr` (0 freezes it).
        nonlinear_init_scale: with a linear path, the nonlinear path's mean head and output layer start
            at this multiple of their default initialisation (0: training starts exactly at PCA).
        linear_path_components: LinearCode components in the linear path (default: all `latent_dim` codes);
            the remaining codes belong to the nonlinear half alone, started at its default initialisation.
        linear_path_basis: the linear path's starting basis: "pca" (PCA of the training windows),
            "separable" (mel-covariance eigenvectors x time DCT) or "dct" (2-D DCT; only the kept
            coefficients are chosen from the data). See musicvae/models/linear_codes.py: the fewer
            parameters estimated, the better the start on music not trained on.
        kl_warmup_steps: beta rises linearly from 0 to `beta` over this many steps (0: no warm-up).
        free_bits: nats per latent dimension whose KL is not penalised (0: plain KL).
        init_from: a checkpoint whose weights start this run (musicvae/training/initialisation.py): a new
            run, with a fresh optimizer and step count, not a resume (that is `--ckpt_path`). Read by the
            command line before training; loading a trained module never reads it again.
        adversarial: the adversarial stage (musicvae/training/adversarial.py, configs/sharp.yaml): the
            encoder frozen, the decoder fine-tuned against a PatchGAN discriminator with manual
            optimization. Start it from a trained VAE with `init_from`.
        adv_weight: scale of the adaptively weighted adversarial and feature-matching terms.
        adv_start_step: global step (optimizer steps: two per batch in this stage) from which the
            decoder answers the discriminator; before it only the discriminator learns.
        disc_lr: the discriminator's Adam learning rate.
        disc_channels: the discriminator's channels per stride-2 stage.
        disc_augment: augment what the discriminator sees (time shift, level, cutout; the same for
            each real/decoded pair): without it a discriminator overfits small data.
        adv_grad_clip: gradient-norm clip of each optimizer in the stage (null: none); the stage's
            stand-in for `trainer.gradient_clip_val`, which Lightning refuses under manual optimization.
        lr_schedule: "constant", "cosine" (down to `lr_min_ratio` x lr at the run's last step) or
            "plateau" (x `plateau_factor` when the monitored metric has not improved for
            `plateau_patience` validations); musicvae/training/schedules.py, docs/model_options.md.
        warmup_steps: the rate rises linearly from lr/warmup_steps to lr over this many optimizer steps.
        lr_min_ratio: the floor of "cosine" and "plateau", as a multiple of lr.
        plateau_factor: "plateau"'s multiplier at each reduction.
        plateau_patience: validations without improvement before "plateau" reduces the rate.
        ema_decay: keep an exponential moving average of the weights with this decay per optimizer
            step (musicvae/training/ema.py; null: none). Validation, best.ckpt and everything that
            loads a checkpoint use the average; training continues from the raw weights.
        media_vocoder: a Vocos download (folder of config.yaml and pytorch_model.bin) that plays the
            TensorBoard clips instead of Griffin-Lim (docs/vocoder.md); its features must be the
            run's mel settings (configs/vocos.yaml), which is checked before training starts.
        media_alpha: variance-compensation strength of the TensorBoard media's second set of
            reconstructions (musicvae/compensation.py); None: the perceptual point fitted on the
            validation recordings, 0: none.
    """

    def __init__(
        self,
        n_mels: int = 128,
        frames: int = 128,
        latent_dim: int = 64,
        channels: list[int] = [32, 64, 128, 256],  # noqa: B006 - a plain list keeps the CLI/hparams simple
        blocks_per_stage: int = 1,
        dropout: float = 0.0,
        loss: Literal["standard", "spectral"] = "spectral",
        beta: float = 0.05,
        spectral_weight: float = 0.1,
        output_reg_weight: float = 0.01,
        # Typed as triples, not list[list[float]]: jsonargparse 4.53 turns `--model.freq_bands+=[[a,b,w]]`
        # on a list of lists into every existing band repeated twice (measured); with tuples it appends.
        freq_bands: list[tuple[float, float, float]] = [list(b) for b in DEFAULT_BANDS],  # noqa: B006
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        n_figure_examples: int = 4,
        audio_every_n_epochs: int = 5,
        n_audio_clips: int = 2,
        griffin_lim_iters: int = 32,
        compile: bool = False,
        channels_last: bool = False,
        architecture: Literal["conv2d", "conv1d"] = "conv2d",
        linear_path: bool = False,
        linear_path_examples: int = 16384,
        linear_path_lr_scale: float = 0.1,
        nonlinear_init_scale: float = 0.0,
        linear_path_components: Optional[int] = None,
        linear_path_basis: Literal["pca", "separable", "dct"] = "pca",
        kl_warmup_steps: int = 0,
        free_bits: float = 0.0,
        media_alpha: Optional[float] = None,
        init_from: Optional[str] = None,
        adversarial: bool = False,
        adv_weight: float = 0.1,
        adv_start_step: int = 0,
        disc_lr: float = 1e-4,
        disc_channels: list[int] = [32, 64, 128],  # noqa: B006
        disc_augment: bool = True,
        adv_grad_clip: Optional[float] = 1.0,
        lr_schedule: Literal["constant", "cosine", "plateau"] = "constant",
        warmup_steps: int = 0,
        lr_min_ratio: float = 0.01,
        plateau_factor: float = 0.5,
        plateau_patience: int = 3,
        ema_decay: Optional[float] = None,
        media_vocoder: Optional[str] = None,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"model.loss={loss!r} is not one of {LOSSES}")
        if linear_path_basis not in LINEAR_BASES:
            raise ConfigError(f"model.linear_path_basis={linear_path_basis!r} is not one of {LINEAR_BASES}")
        if lr <= 0 or beta < 0 or spectral_weight < 0 or output_reg_weight < 0:
            raise ConfigError(
                "model.lr must be positive and model.beta, model.spectral_weight, model.output_reg_weight "
                f"non-negative; got lr={lr}, beta={beta}, spectral_weight={spectral_weight}, "
                f"output_reg_weight={output_reg_weight}"
            )
        if adversarial and (adv_weight < 0 or adv_start_step < 0 or disc_lr <= 0
                            or (adv_grad_clip is not None and adv_grad_clip <= 0)):
            raise ConfigError(f"model.adv_weight={adv_weight} and model.adv_start_step={adv_start_step} must be "
                              f"non-negative, model.disc_lr={disc_lr} and model.adv_grad_clip={adv_grad_clip} positive")
        if lr_schedule not in SCHEDULES or warmup_steps < 0 or not 0.0 <= lr_min_ratio <= 1.0 \
                or not 0.0 < plateau_factor < 1.0 or plateau_patience < 0:
            raise ConfigError(f"model.lr_schedule={lr_schedule!r} must be one of {SCHEDULES}, model.warmup_steps="
                              f"{warmup_steps} and model.plateau_patience={plateau_patience} non-negative, "
                              f"model.lr_min_ratio={lr_min_ratio} in [0, 1] and model.plateau_factor={plateau_factor} "
                              "in (0, 1)")
        if ema_decay is not None:
            check_decay(ema_decay)
        if adversarial and (lr_schedule != "constant" or warmup_steps > 0):
            raise ConfigError("model.lr_schedule and model.warmup_steps: the adversarial stage steps its optimizers "
                              "itself at constant rates (--model.lr, --model.disc_lr); leave them at constant and 0")
        if media_alpha is not None and not 0.0 <= media_alpha <= 1.0:
            raise ConfigError(f"model.media_alpha={media_alpha} must lie in [0, 1] (or be null: the fitted perceptual point)")
        if architecture not in ARCHITECTURES:
            raise ConfigError(f"model.architecture={architecture!r} is not one of {tuple(ARCHITECTURES)}")
        if kl_warmup_steps < 0 or free_bits < 0 or linear_path_lr_scale < 0 or linear_path_examples < latent_dim:
            raise ConfigError(
                f"model.kl_warmup_steps={kl_warmup_steps}, model.free_bits={free_bits} and "
                f"model.linear_path_lr_scale={linear_path_lr_scale} must be non-negative and "
                f"model.linear_path_examples={linear_path_examples} at least model.latent_dim={latent_dim}"
            )
        freq_bands = [[float(v) for v in band] for band in freq_bands]  # stored as plain lists, as before
        self.save_hyperparameters()
        try:
            self.vae = ARCHITECTURES[architecture](
                n_mels=n_mels,
                frames=frames,
                latent_dim=latent_dim,
                channels=tuple(channels),
                blocks_per_stage=blocks_per_stage,
                dropout=dropout,
            )
            if linear_path:
                self.vae = LinearPathVAE(self.vae, nonlinear_init_scale, linear_path_components)
            if channels_last:
                self.vae.to(memory_format=torch.channels_last)
            if compile:
                self.vae.compile()
            bands = [tuple(float(v) for v in band) for band in freq_bands]
            # A buffer, so the weights travel in checkpoints and follow the module to the GPU.
            self.register_buffer("freq_weight", create_frequency_weights(n_mels, bands))
            self.band_edges = band_edges(n_mels, bands)
        except ValueError as err:
            raise ConfigError(
                f"model: {err} (the CLI takes n_mels from data.mel.n_mels and frames from data.frames)"
            ) from None
        if adversarial:
            # After the VAE exists and before any optimizer: the encoder's weights stay those of init_from.
            self.discriminator = PatchDiscriminator(tuple(disc_channels))
            freeze_encoder(self.vae)
            self.automatic_optimization = False
        # The first validation/test batch (inputs, reconstructions) and the last epoch's diagnostics,
        # read by MediaLogger (musicvae/training/media.py), which draws and logs them.
        self.figure_batch: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        # The metric lr_schedule "plateau" watches; the command line sets its --monitor here.
        self.lr_monitor = "val/loss"
        self.epoch_diagnostics: Optional[tuple[dict, dict]] = None
        self.last_loss_parts: dict[str, torch.Tensor] = {}
        # Epoch diagnostics of the notebook's three problems (exact under DDP; see metrics.py).
        # std is the data's z-score scale, set from the data module before each validation.
        self.val_diagnostics = ReconstructionDiagnostics(std=1.0, n_mels=n_mels, bands=bands)
        self.val_latent = LatentDiagnostics(latent_dim)
        # Variance compensation (musicvae/compensation.py): the gain curve and the perceptual
        # strength, refitted on the validation recordings after every validation epoch and kept
        # in the checkpoint (buffers), so every checkpoint decodes sharp with the curve of its own
        # weights. Test and prediction never refit: the curve never sees music being scored.
        self.val_compensation = CompensationStats(n_mels, self.band_edges)
        # Realism on the validation set: Fréchet distances between Gaussian fits of the inputs' and the
        # reconstructions' mel frames and frame differences (musicvae/metrics.py). Paired sets, so 0 is
        # reachable; the adversarial stage picks best.ckpt by it (val/loss would pick the least sharp state).
        self.val_realism = torch.nn.ModuleDict({f"{view}_{side}": GaussianFit(n_mels)
                                                for view in REALISM_VIEWS for side in ("input", "output")})
        for name, value in compensation_defaults(n_mels).items():
            self.register_buffer(name, value)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.hparams.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        return self.vae(x)

    def compute_loss(
        self, x_hat: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The configured loss and all its parts, by name.

        Weights are read from `self.hparams` at every step, so a value changed on resume
        applies from the first resumed step.
        """
        hp = self.hparams
        beta, free_bits = self.current_beta(), hp.get("free_bits", 0.0)
        if hp.loss == "standard":
            return vae_loss(x_hat, x, mu, logvar, beta=beta, free_bits=free_bits)
        return vae_loss_spectral(
            x_hat,
            x,
            mu,
            logvar,
            beta=beta,
            free_bits=free_bits,
            freq_weight=self.freq_weight,
            spectral_weight=hp.spectral_weight,
            output_reg_weight=hp.output_reg_weight,
        )

    def current_beta(self) -> float:
        """`beta`, scaled by the KL warm-up (Bowman et al. 2016, arXiv:1511.06349) while it lasts.

        Validation uses the same value as the step it follows, so val/loss tracks what is optimised.
        """
        warmup = self.hparams.get("kl_warmup_steps", 0)
        if warmup <= 0 or getattr(self, MODULE_TRAINER) is None:
            return self.hparams.beta
        return self.hparams.beta * min(1.0, self.global_step / warmup)

    def on_train_start(self) -> None:
        # After a resume the restored weights already hold the (trained) linear path: the buffer
        # `pca_initialised` came back with them. Here rather than in setup(): the trainer's
        # max_time clock runs from train start, so the PCA counts against the training budget.
        if isinstance(self.vae, LinearPathVAE) and not bool(self.vae.pca_initialised):
            self._init_linear_path()
        for note in continue_schedules(self.trainer, self.hparams):
            rank_zero_info(f"musicvae: {note}")

    def _init_linear_path(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        train_set = getattr(datamodule, "train_set", None)
        if train_set is None:
            raise ConfigError("model.linear_path needs the training data module (MelDataModule) to fit its PCA")
        k = self.vae.n_linear
        if self.trainer.is_global_zero:
            # Evenly spaced windows without random crops: deterministic, and the same on every run.
            count = min(len(train_set), self.hparams.get("linear_path_examples", 16384))
            rows = np.unique(np.linspace(0, len(train_set) - 1, count).round().astype(np.int64))
            windows = train_set.fixed_windows(rows)
            if len(windows) < k:
                raise ConfigError(f"model.linear_path: {len(windows)} training segments cannot give {k} PCA "
                                  f"components (model.latent_dim); use more data or a smaller latent_dim")
            stack = stack_segments(windows)  # (N, M*T)
            basis = self.hparams.get("linear_path_basis", "pca")
            if basis == "pca":
                pca = fit_pca(stack, k)
            else:
                pca = fit_separable_code(stack, (train_set.n_mels, train_set.frames), k,
                                        mel_basis="eigen" if basis == "separable" else "dct")
            del stack
            init_from_code(self.vae, pca, self.hparams.beta)
        # Every rank starts from rank 0's PCA (DDP has already synchronised the other weights).
        for param in (*self.vae.lin_encoder.parameters(), *self.vae.lin_decoder.parameters(),
                      *self.vae.inner.to_latent.parameters(), self.vae.pca_initialised):
            param.data.copy_(self.trainer.strategy.broadcast(param.data.clone(), src=0))

    #: Parameters a checkpoint without them (a plain VAE) may lack when it starts this model (init_from).
    fresh_prefixes = ("discriminator.",)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> Optional[torch.Tensor]:
        if self.hparams.get("adversarial"):
            parts = adversarial_step(self, batch)
            self.log("train/loss", parts.pop("loss"), prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch))
            self.log_dict({f"train/{k}": v for k, v in parts.items()}, on_step=True, on_epoch=True,
                          batch_size=len(batch))
            return None
        x_hat, mu, logvar = self(batch)
        parts = self.compute_loss(x_hat, batch, mu, logvar)
        # Read by NonFiniteGuard after backward, to name the part that went NaN/Inf.
        self.last_loss_parts = {k: v.detach() for k, v in parts.items()}
        self.log("train/loss", parts["loss"], prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch))
        others = {f"train/{k}": v for k, v in parts.items() if k != "loss"}
        self.log_dict(others, on_step=True, on_epoch=True, batch_size=len(batch))
        return parts["loss"]

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        x_hat = self._score_batch("val", batch, batch_idx)
        self.val_compensation.update(x_hat, batch)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._score_batch("test", batch, batch_idx)

    def _score_batch(self, stage: str, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # In eval mode the VAE decodes the posterior mean: the score has no sampling noise.
        x_hat, mu, logvar = self(batch)
        parts = self.compute_loss(x_hat, batch, mu, logvar)
        self.log(f"{stage}/loss", parts["loss"], prog_bar=True, sync_dist=True, batch_size=len(batch))
        others = {f"{stage}/{k}": v for k, v in parts.items() if k != "loss"}
        self.log_dict(others, sync_dist=True, batch_size=len(batch))
        self.val_diagnostics.update(x_hat, batch)
        self.val_latent.update(mu, logvar)
        for view, rows in REALISM_VIEWS.items():
            self.val_realism[f"{view}_input"].update(rows(batch))
            self.val_realism[f"{view}_output"].update(rows(x_hat))
        if batch_idx == 0:  # for the figures of MediaLogger (musicvae/training/media.py)
            n = self.hparams.n_figure_examples
            self.figure_batch = (batch[:n].detach().cpu(), x_hat[:n].detach().float().cpu())
        return x_hat

    def on_validation_epoch_start(self) -> None:
        self._start_scoring()

    def on_test_epoch_start(self) -> None:
        self._start_scoring()

    def _start_scoring(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        normalizer = getattr(datamodule, "normalizer", None)
        if normalizer is not None:
            self.val_diagnostics.std = normalizer.std

    def on_validation_epoch_end(self) -> None:
        self._finish_scoring("val")
        self._fit_compensation()

    def _fit_compensation(self) -> None:
        """Refit the gain curve and the perceptual strength on this epoch's validation outputs.

        Skipped in the sanity check (two batches are not the validation set) and when no batch
        was seen; the strength is the smallest putting every validation band at PERCEPTUAL_TARGET.
        """
        if self.val_compensation.update_count == 0 or (getattr(self, MODULE_TRAINER) is not None and self.trainer.sanity_checking):
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

    def on_test_epoch_end(self) -> None:
        self._finish_scoring("test")

    def _finish_scoring(self, stage: str) -> None:
        """Logs the epoch's diagnostics under `stage/`; keeps them in `epoch_diagnostics` for MediaLogger."""
        diagnostics = self.val_diagnostics.compute()  # already reduced across processes
        latent = self.val_latent.compute()
        self.val_diagnostics.reset()
        self.val_latent.reset()
        scalars = {f"{stage}/{k}": v.float() for k, v in diagnostics.items()}
        scalars.update({f"{stage}/active_units": latent["active_units"].float(),
                        f"{stage}/active_frac": latent["active_frac"].float()})
        for view in REALISM_VIEWS:
            fits = (self.val_realism[f"{view}_input"], self.val_realism[f"{view}_output"])
            scalars[f"{stage}/realism_{view}"] = torch.tensor(gaussian_distance(*fits), dtype=torch.float32)
            for fit in fits:
                fit.reset()
        ratios = torch.stack([v for k, v in diagnostics.items() if k.startswith("band_ratio/")])
        # The worst band's distance from 1 on a log scale: a ratio of 0.5 and of 2 are equally wrong.
        scalars[f"{stage}/band_ratio_error"] = ratios.nan_to_num(nan=1.0).clamp_min(1e-12).log().abs().max().float()
        self.log_dict(scalars)
        self.epoch_diagnostics = (diagnostics, latent)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """One recording's latent codes: `batch` holds all its windows (see MelDataModule.predict_dataloader).

        Returns the batch's metadata with `mu` and `logvar` (W, latent_dim) and, when the data
        module asks for them, the reconstructed log-mels (W, n_mels, frames) in log units.
        """
        windows = batch["windows"]  # (W, 1, n_mels, frames), normalised
        mus, logvars, recons = [], [], []
        for chunk in windows.split(batch["chunk"]):
            mu, logvar = self.vae.encode(chunk.to(self.device))
            mus.append(mu.float().cpu())
            logvars.append(logvar.float().cpu())
            if batch["reconstructions"]:
                recons.append(self.vae.decode(mu).float().cpu()[:, 0])
        out = {k: v for k, v in batch.items() if k not in ("windows", "chunk", "reconstructions")}
        out["mu"], out["logvar"] = torch.cat(mus), torch.cat(logvars)
        if recons:
            out["reconstruction"] = Normalizer(batch["mean"], batch["std"]).inverse(torch.cat(recons))
        return out

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The bands are a hyper-parameter: on resume the configured ones win over the stored buffer.
        checkpoint["state_dict"]["freq_weight"] = self.freq_weight.detach().clone()
        with_compensation_defaults(checkpoint["state_dict"], self.hparams.n_mels)

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[dict]]:
        optimizers = self.build_optimizers()
        if self.hparams.get("adversarial"):
            # Constant schedulers, never stepped (manual optimization): they name the logged rates.
            return optimizers, [{"scheduler": LambdaLR(opt, StepSchedule("constant", 0, None, 1.0)), "name": name}
                                for opt, name in zip(optimizers, (LOG_NAME, "train/disc_lr"))]
        endless = self.trainer.max_epochs == -1 and self.trainer.max_steps == -1
        return optimizers, build_schedulers(optimizers[0], self.hparams, endless, self.lr_monitor)

    def build_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers over this module's parameter groups, at their base rates (no schedule):
        one, or the adversarial stage's two (decoder, discriminator)."""
        hp = self.hparams
        if hp.get("adversarial"):
            # The decoder (the linear path's half at its lr_scale) and the discriminator; Adam with
            # beta1 0.5 as is usual for GANs, whose targets move with every step.
            decoder = decoder_parameters(self.vae)
            linear = {id(p) for p in getattr(self.vae, "lin_decoder", torch.nn.Identity()).parameters()}
            scale = float(hp.get("linear_path_lr_scale", 1.0))
            groups = [{"params": [p for p in decoder if id(p) not in linear], "lr": hp.lr, "lr_scale": 1.0}]
            if linear and scale > 0:
                groups.append({"params": [p for p in decoder if id(p) in linear], "lr": hp.lr * scale, "lr_scale": scale})
            return [torch.optim.Adam(groups, lr=hp.lr, betas=(0.5, 0.9)),
                    torch.optim.Adam([{"params": list(self.discriminator.parameters()), "lr": hp.disc_lr,
                                       "lr_from": "disc_lr"}], lr=hp.disc_lr, betas=(0.5, 0.9))]
        groups = [{"params": list(self.parameters()), "lr": hp.lr, "lr_scale": 1.0}]
        if isinstance(self.vae, LinearPathVAE):
            # Adam moves every weight by ~lr per step whatever its scale, and PCA's encoder weights
            # are ~1e-4 to 1e-2: at the nonlinear path's lr they would leave PCA within a few
            # steps. "lr_scale" stays in the group, so a learning rate changed on resume keeps it.
            linear = {id(p) for m in (self.vae.lin_encoder, self.vae.lin_decoder) for p in m.parameters()}
            scale = float(hp.get("linear_path_lr_scale", 1.0))
            groups = [{"params": [p for p in self.parameters() if id(p) not in linear], "lr": hp.lr, "lr_scale": 1.0},
                      {"params": [p for p in self.parameters() if id(p) in linear], "lr": hp.lr * scale,
                       "lr_scale": scale}]
        if hp.weight_decay > 0:
            return [torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)]
        return [torch.optim.Adam(groups, lr=hp.lr)]

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


def compensation_defaults(n_mels: int) -> dict[str, torch.Tensor]:
    """The compensation buffers of a model that has not been validated yet: no gain, strength 0."""
    return {"output_gain": torch.ones(n_mels), "output_alpha": torch.tensor(0.0),
            "gain_fitted": torch.tensor(False)}


def with_compensation_defaults(state_dict: dict, n_mels: int) -> dict:
    """`state_dict` with the compensation buffers added where a checkpoint predates them (in place)."""
    for name, value in compensation_defaults(n_mels).items():
        state_dict.setdefault(name, value)
    return state_dict
