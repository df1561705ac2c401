"""MediaLogger: the figures and audio clips of each validation (and test) epoch, in TensorBoard.

The module computes and logs the numbers (`val/*`, `test/*`); this callback draws what a person
looks at and listens to: the band-ratio and KL-per-dimension figures, inputs above their
reconstructions, and a few clips of both inverted to audio the same way (Griffin-Lim, or the
Vocos download a run names in `model.media_vocoder`: musicvae/audio/neural_vocoder.py). It runs at
`on_validation_end`, after the module's `on_validation_epoch_end` has computed the epoch's
diagnostics (Lightning calls callbacks' epoch-end hooks before the module's).
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from musicvae.audio.mel import MelSettings
from musicvae.audio.neural_vocoder import make_vocoder
from musicvae.plots import band_ratio_figure, kl_per_dim_figure, mel_comparison_figure


class MediaLogger(Callback):
    """Figures every validation/test epoch; audio every `model.audio_every_n_epochs` validations.

    What is drawn is set by the module's hyper-parameters (`n_figure_examples`,
    `audio_every_n_epochs`, `n_audio_clips`, `griffin_lim_iters`, and `media_vocoder`: a Vocos
    download that plays the clips instead of Griffin-Lim), so a run's config keeps them. A
    module without `media_vocoder` (a run from before it existed) uses Griffin-Lim.
    """

    def __init__(self) -> None:
        self._vocoders: dict[tuple[MelSettings, int, Optional[str]], torch.nn.Module] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # A vocoder that cannot play this run's features is refused before the first epoch, not
        # after it, when the first clips are due.
        hp = pl_module.hparams
        if (hp.get("media_vocoder") and hp.get("audio_every_n_epochs", 0) > 0 and stage != "predict"
                and getattr(trainer, "datamodule", None) is not None):
            self._vocoder(pl_module, trainer.datamodule.mel)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        audio = self._audio_due(trainer, pl_module)
        self._log(trainer, pl_module, "val", audio)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        audio = pl_module.hparams.get("audio_every_n_epochs", 0) > 0  # 0 turns audio off, as in validation
        self._log(trainer, pl_module, "test", audio=audio and getattr(trainer, "datamodule", None) is not None)

    @staticmethod
    def _audio_due(trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        every = pl_module.hparams.get("audio_every_n_epochs", 0)
        return (every > 0 and pl_module.current_epoch % every == 0
                and getattr(trainer, "datamodule", None) is not None)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, audio: bool) -> None:
        batch, pl_module.figure_batch = pl_module.figure_batch, None
        found, pl_module.epoch_diagnostics = pl_module.epoch_diagnostics, None
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if trainer.sanity_checking or not trainer.is_global_zero or found is None or not loggers:
            return
        diagnostics, latent = found
        figures = media_figures(pl_module.val_diagnostics.band_names, diagnostics, latent, batch, stage,
                                f"epoch {pl_module.current_epoch}, step {pl_module.global_step}")
        alpha = media_alpha(pl_module)
        if batch is not None and alpha > 0:
            # The same examples with variance compensation (musicvae/compensation.py) at the media strength.
            inputs, outputs = batch
            batch = (inputs, outputs, pl_module.compensated(outputs, alpha).cpu())
            figures[f"{stage}/reconstructions_compensated"] = mel_comparison_figure(
                inputs, batch[2], f"epoch {pl_module.current_epoch}, step {pl_module.global_step}, "
                f"variance compensation alpha {alpha:.2f}")
        clips = ({} if not audio or batch is None else
                 self._clips(trainer, pl_module, batch[0], batch[1], stage, batch[2] if len(batch) > 2 else None))
        for logger in loggers:
            for tag, figure in figures.items():
                logger.experiment.add_figure(tag, figure, pl_module.global_step)
            for tag, (wave, rate) in clips.items():
                logger.experiment.add_audio(tag, wave.unsqueeze(0), pl_module.global_step, sample_rate=rate)

    def _clips(self, trainer: L.Trainer, pl_module: L.LightningModule, inputs: torch.Tensor,
               outputs: torch.Tensor, stage: str, compensated: Optional[torch.Tensor] = None,
               ) -> dict[str, tuple[torch.Tensor, int]]:
        """Input and reconstruction of a few examples, inverted to audio the same way.

        Both go through the same vocoder, so what differs between them is the model.
        """
        hp = pl_module.hparams
        mel, norm = trainer.datamodule.mel, trainer.datamodule.normalizer
        vocoder = self._vocoder(pl_module, mel)
        clips = {}
        # One thread: on a busy machine two OpenMP threads wait on each other over these tiny FFTs,
        # many times slower than one.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i in range(min(hp.n_audio_clips, len(inputs))):
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

    def _vocoder(self, pl_module: L.LightningModule, mel: MelSettings) -> torch.nn.Module:
        """The clips' vocoder, built once per setting (a Vocos is 13.5M parameters to load); on the CPU,
        like the clips."""
        hp = pl_module.hparams
        key = (mel, hp.griffin_lim_iters, hp.get("media_vocoder"))
        if key not in self._vocoders:
            self._vocoders[key] = make_vocoder(mel, hp.griffin_lim_iters, key[2], source="this run")
        return self._vocoders[key]


def media_alpha(pl_module: L.LightningModule) -> float:
    """The compensation strength of the media: `model.media_alpha`, or the fitted perceptual point when it
    is null; 0 until a curve has been fitted (the first validation epoch's media show the plain output)."""
    if not bool(getattr(pl_module, "gain_fitted", False)):
        return 0.0
    alpha = pl_module.hparams.get("media_alpha")
    return float(pl_module.output_alpha) if alpha is None else float(alpha)


def media_figures(band_names: list[str], diagnostics: dict[str, Any], latent: dict[str, Any],
                  batch: Any, stage: str, title: str) -> dict[str, Any]:
    """The figures of one scored epoch, by TensorBoard tag."""
    figures = {
        f"{stage}/band_variance_ratio": band_ratio_figure(
            band_names, [float(diagnostics[f"band_ratio/{name}"]) for name in band_names], title),
        f"{stage}/kl_per_dim": kl_per_dim_figure(latent["kl_per_dim"].cpu(), latent["mu_var"].cpu(), title=title),
    }
    if batch is not None:
        figures[f"{stage}/reconstructions"] = mel_comparison_figure(*batch, title)
    return figures
