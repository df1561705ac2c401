"""MediaLogger: the figures and audio clips of each validation (and test) epoch, for every logger that takes them.

The module computes and logs the numbers (`val/*`, `test/*`); this callback draws what a person
looks at and listens to: the band-ratio and KL-per-dimension figures, inputs above their
reconstructions, and a few clips of both inverted to audio the same way (Griffin-Lim, or a Vocos
download, `--media.vocoder`: musicvae/audio/neural_vocoder.py). It takes what it draws from
Lightning's hooks: the first batch's reconstructions from `validation_step`'s output, the band
ratios from the logged metrics, and the latent statistics from its own metric over the steps'
posteriors. Prior samples show what `generate sample` would draw: decoded N(0, I) codes beside
codes drawn from a full-covariance Gaussian fitted to the epoch's validation posterior means (the
cheapest learned prior, musicvae/models/prior.py: a preview; `musicvae fit-prior` fits the chosen
one on the training windows after training), with the same seed every epoch, so epochs compare. It draws at `on_validation_end`, inside the module's validation scope (with EMA, the
averaged weights: musicvae/training/ema.py), once per epoch, and hands the same figures and clips
to each logger through its kind's adapter (musicvae/training/logger_kinds.py: TensorBoard, a CSV
logger's folder, W&B, MLflow).

Its options are its own command-line group (`--media.audio_every_n_epochs 0` turns audio off).
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from musicvae.audio.mel import MelSettings
from musicvae.audio.neural_vocoder import make_vocoder
from musicvae.errors import ConfigError
from musicvae.metrics import LatentDiagnostics
from musicvae.models.prior import GaussianPrior
from musicvae.plots import band_ratio_figure, kl_per_dim_figure, mel_comparison_figure, mel_grid_figure
from musicvae.training.logger_kinds import Media, kind_of, no_media


#: Most validation codes kept per epoch for the prior preview: a 128-D full covariance is well
#: estimated from a few thousand, and they cost 2 MB.
MAX_PREVIEW_CODES = 4096


class MediaLogger(Callback):
    """Figures every validation/test epoch; audio every `audio_every_n_epochs` validations.

    Args:
        n_figure_examples: validation examples drawn in the reconstructions figure.
        audio_every_n_epochs: every this many validation epochs, a few validation clips go to
            the loggers as audio, input and reconstruction inverted alike (0 turns audio off).
        n_audio_clips: clips per time (taken from the figure's examples).
        griffin_lim_iters: Griffin-Lim iterations for those clips (32: ~0.006 worse spectral
            convergence than 64 at half the cost; they are for listening, not for scoring).
        alpha: variance-compensation strength of the media's second set of reconstructions
            (musicvae/compensation.py); None: the perceptual point fitted on the validation recordings, 0: none.
        vocoder: a Vocos download (folder of config.yaml and pytorch_model.bin) that plays the clips
            instead of Griffin-Lim (docs/vocoder.md); its features must be the run's mel settings
            (configs/vocos.yaml), which is checked before training starts.
        n_samples: prior samples drawn per prior in the `prior_samples` figure (0: none).
    """

    def __init__(self, n_figure_examples: int = 4, audio_every_n_epochs: int = 5, n_audio_clips: int = 2,
                 griffin_lim_iters: int = 32, alpha: Optional[float] = None, vocoder: Optional[str] = None,
                 n_samples: int = 4) -> None:
        if min(n_figure_examples, audio_every_n_epochs, n_audio_clips, n_samples) < 0 or griffin_lim_iters < 1:
            raise ConfigError(f"media.n_figure_examples={n_figure_examples}, media.audio_every_n_epochs="
                              f"{audio_every_n_epochs}, media.n_audio_clips={n_audio_clips} and media.n_samples="
                              f"{n_samples} must be 0 or more, media.griffin_lim_iters={griffin_lim_iters} at least 1")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"media.alpha={alpha} must lie in [0, 1] (or be null: the fitted perceptual point)")
        self.n_figure_examples, self.audio_every_n_epochs = n_figure_examples, audio_every_n_epochs
        self.n_audio_clips, self.griffin_lim_iters = n_audio_clips, griffin_lim_iters
        self.alpha, self.vocoder, self.n_samples = alpha, vocoder, n_samples
        self._codes: list[torch.Tensor] = []  # the epoch's posterior means, for the prior preview
        self._vocoders: dict[MelSettings, torch.nn.Module] = {}
        self._kept: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # the epoch's first (inputs, outputs)
        self._latent: Optional[LatentDiagnostics] = None
        self._told = False  # the loggers that take no media, named once

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict" and not self._told and (others := no_media(trainer.loggers)):
            self._told = True
            rank_zero_info(f"musicvae: no figures or audio for {', '.join(others)}: they go to TensorBoard, CSV, "
                           "W&B and MLflow loggers")
        # A vocoder that cannot play this run's features is refused before the first epoch, not
        # after it, when the first clips are due.
        if self.vocoder and self.audio_every_n_epochs > 0 and stage != "predict" \
                and getattr(trainer, "datamodule", None) is not None:
            self._make_vocoder(trainer.datamodule.mel)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._keep(pl_module, outputs, batch, batch_idx)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._keep(pl_module, outputs, batch, batch_idx)

    def _keep(self, pl_module: L.LightningModule, outputs: Any, batch: torch.Tensor, batch_idx: int) -> None:
        if not isinstance(outputs, dict) or "reconstruction" not in outputs:
            return
        if self._latent is None or self._latent.device != outputs["mu"].device:
            self._latent = LatentDiagnostics(pl_module.hparams.latent_dim).to(outputs["mu"].device)
        self._latent.update(outputs["mu"].detach(), outputs["logvar"].detach())
        if self.n_samples and sum(len(c) for c in self._codes) < MAX_PREVIEW_CODES:
            self._codes.append(outputs["mu"].detach().float().cpu())
        if batch_idx == 0:
            n = self.n_figure_examples
            self._kept = (batch[:n].detach().cpu(), outputs["reconstruction"][:n].detach().float().cpu())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        every = self.audio_every_n_epochs
        audio = every > 0 and pl_module.current_epoch % every == 0
        self._log(trainer, pl_module, "val", audio)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test", audio=self.audio_every_n_epochs > 0)  # 0 turns audio off, as in validation

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, audio: bool) -> None:
        batch, self._kept = self._kept, None
        codes, self._codes = self._codes, []
        latent = None
        if self._latent is not None and self._latent.update_count > 0:
            latent = self._latent.compute()  # on every process: it reduces across them
            self._latent.reset()
        loggers = [(logger, kind) for logger in trainer.loggers if (kind := kind_of(logger)) is not None]
        if trainer.sanity_checking or not trainer.is_global_zero or latent is None or not loggers:
            return
        names = pl_module.scores.band_names
        ratios = [float(trainer.callback_metrics.get(f"{stage}/band_ratio/{name}", float("nan"))) for name in names]
        title = f"epoch {pl_module.current_epoch}, step {pl_module.global_step}"
        figures = media_figures(names, ratios, latent, batch, stage, title)
        alpha = self.strength(pl_module)
        if batch is not None and alpha > 0:
            # The same examples with variance compensation (musicvae/compensation.py) at the media strength.
            inputs, outputs = batch
            batch = (inputs, outputs, pl_module.compensated(outputs, alpha).cpu())
            figures[f"{stage}/reconstructions_compensated"] = mel_comparison_figure(
                inputs, batch[2], f"{title}, variance compensation alpha {alpha:.2f}")
        if self.n_samples and codes:
            figures[f"{stage}/prior_samples"] = self._prior_samples(pl_module, torch.cat(codes)[:MAX_PREVIEW_CODES],
                                                                    title)
        datamodule = getattr(trainer, "datamodule", None)
        clips = ({} if not audio or batch is None or datamodule is None else
                 self._clips(datamodule, batch[0], batch[1], stage, batch[2] if len(batch) > 2 else None))
        media = Media(stage, pl_module.current_epoch, pl_module.global_step, figures, clips)
        for logger, kind in loggers:
            kind.send(logger, media)

    @torch.no_grad()
    def _prior_samples(self, pl_module: L.LightningModule, codes: torch.Tensor, title: str) -> Any:
        """Decoded N(0, I) draws (top row) above draws of a Gaussian fitted to `codes` (bottom row)."""
        n, dim = self.n_samples, codes.shape[1]
        standard = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
        rows = [("N(0, I)", standard)]
        if len(codes) >= 2:  # a covariance needs two codes
            fitted = GaussianPrior(dim).fit(codes).sample(n, generator=torch.Generator().manual_seed(0))
            rows.append(("Gaussian of the codes", fitted))
        decoded = pl_module.vae.decode(torch.cat([z for _, z in rows]).to(pl_module.device)).float().cpu()
        titles = [f"{name} {i}" for name, _ in rows for i in range(n)]
        return mel_grid_figure(decoded.reshape(-1, *decoded.shape[-2:]), titles, columns=n, label="normalised log-mel",
                               title=f"{title}, prior samples (seed 0; Gaussian fitted to {len(codes)} validation codes)")

    def strength(self, pl_module: L.LightningModule) -> float:
        """The compensation strength of the media: `alpha`, or the fitted perceptual point when it is null;
        0 until a curve has been fitted (the first validation epoch's media show the plain output)."""
        if not bool(getattr(pl_module, "gain_fitted", False)):
            return 0.0
        return float(pl_module.output_alpha) if self.alpha is None else float(self.alpha)

    def _clips(self, datamodule: Any, inputs: torch.Tensor, outputs: torch.Tensor, stage: str,
               compensated: Optional[torch.Tensor] = None) -> dict[str, tuple[torch.Tensor, int]]:
        """Input and reconstruction of a few examples, inverted to audio the same way.

        Both go through the same vocoder, so what differs between them is the model.
        """
        mel, norm = datamodule.mel, datamodule.normalizer
        vocoder = self._make_vocoder(mel)
        clips = {}
        # One thread: on a busy machine two OpenMP threads wait on each other over these tiny FFTs,
        # many times slower than one.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i in range(min(self.n_audio_clips, len(inputs))):
                versions = [("input", inputs[i]), ("reconstruction", outputs[i])]
                if compensated is not None:
                    versions.append(("reconstruction_compensated", compensated[i]))
                for name, x in versions:
                    with torch.no_grad():
                        wave = vocoder(norm.inverse(x[0].float()))  # (n_mels, T) -> (samples,)
                    clips[f"{stage}/audio/{i}_{name}"] = (wave / wave.abs().max().clamp_min(1.0), mel.sample_rate)
        finally:
            torch.set_num_threads(threads)
        return clips

    def _make_vocoder(self, mel: MelSettings) -> torch.nn.Module:
        """The clips' vocoder, built once per setting (a Vocos is 13.5M parameters to load); on the CPU,
        like the clips."""
        if mel not in self._vocoders:
            self._vocoders[mel] = make_vocoder(mel, self.griffin_lim_iters, self.vocoder, source="this run")
        return self._vocoders[mel]


def media_figures(band_names: list[str], ratios: list[float], latent: dict[str, Any], batch: Any, stage: str,
                  title: str) -> dict[str, Any]:
    """The figures of one scored epoch, by tag (`{stage}/{name}`)."""
    figures = {
        f"{stage}/band_variance_ratio": band_ratio_figure(band_names, ratios, title),
        f"{stage}/kl_per_dim": kl_per_dim_figure(latent["kl_per_dim"].cpu(), latent["mu_var"].cpu(), title=title),
    }
    if batch is not None:
        figures[f"{stage}/reconstructions"] = mel_comparison_figure(*batch, title)
    return figures
