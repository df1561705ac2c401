"""The loggers a run may have, by kind: the package each needs, where MediaLogger's figures and
audio go, and where its output is and how to view it.

Lightning's loggers share `log_metrics`, not a way to take a figure or a clip: TensorBoard has
`add_figure`/`add_audio`, W&B `log_image`/`log_audio`, MLflow artifacts through its client, and
a CSV logger nothing, so its version folder gets PNG and WAV files. Each kind is one small adapter
below; a logger of a kind not listed gets the metrics only (MediaLogger says so once, at setup).
"""

from __future__ import annotations

import importlib
import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import soundfile as sf
import torch
from lightning.pytorch.loggers import CometLogger, CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from musicvae.errors import ConfigError
from musicvae.io.outputs import write_output_to


@dataclass(frozen=True)
class Media:
    """One scored epoch's figures and clips, drawn once and sent to every logger that takes them.

    Attributes:
        stage: "val" or "test"; every tag starts with it.
        epoch, step: the epoch and global step they were drawn at.
        figures: matplotlib Figures by tag (`val/reconstructions`).
        clips: (samples,) waveforms in [-1, 1] and their sample rate, by tag (`val/audio/0_input`).
    """

    stage: str
    epoch: int
    step: int
    figures: dict[str, Figure]
    clips: dict[str, tuple[torch.Tensor, int]]

    def file_name(self, tag: str, suffix: str) -> str:
        """The relative file of one figure or clip: `media/val/epoch_003/reconstructions.png`.
        A second validation within an epoch (`val_check_interval` < 1) replaces the first's files."""
        return f"media/{self.stage}/epoch_{self.epoch:03d}/{tag.removeprefix(self.stage + '/')}{suffix}"


def _write_wav(path: Path, wave: torch.Tensor, rate: int) -> None:
    sf.write(path, wave.numpy(), rate, subtype="PCM_16", format="WAV")


def _tensorboard(logger: TensorBoardLogger, media: Media) -> None:
    for tag, figure in media.figures.items():
        # close=False: the other loggers draw the same figure, and closing goes through pyplot.
        logger.experiment.add_figure(tag, figure, media.step, close=False)
    for tag, (wave, rate) in media.clips.items():
        logger.experiment.add_audio(tag, wave.unsqueeze(0), media.step, sample_rate=rate)


def _csv(logger: CSVLogger, media: Media) -> None:
    root = Path(logger.log_dir)
    for tag, figure in media.figures.items():
        write_output_to(root / media.file_name(tag, ".png"), lambda tmp: figure.savefig(tmp, format="png"))
    for tag, (wave, rate) in media.clips.items():
        write_output_to(root / media.file_name(tag, ".wav"), lambda tmp: _write_wav(tmp, wave, rate))


def _pixels(figure: Figure) -> np.ndarray:
    """The figure drawn as (height, width, 3) uint8 RGB, what every image logger takes."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _wandb(logger: WandbLogger, media: Media) -> None:
    for tag, figure in media.figures.items():
        logger.log_image(tag, [_pixels(figure)], step=media.step)
    for tag, (wave, rate) in media.clips.items():
        logger.log_audio(tag, [wave.numpy()], step=media.step, sample_rate=[rate])


def _mlflow(logger: MLFlowLogger, media: Media) -> None:
    client, run_id = logger.experiment, logger.run_id
    for tag, figure in media.figures.items():
        client.log_figure(run_id, figure, media.file_name(tag, ".png"))
    if media.clips:
        with tempfile.TemporaryDirectory() as folder:  # MLflow copies an artifact from a local file
            for tag, (wave, rate) in media.clips.items():
                name = media.file_name(tag, ".wav")
                path = Path(folder, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_wav(path, wave, rate)
                client.log_artifact(run_id, str(path), name.rsplit("/", 1)[0])


def _tensorboard_where(logger: TensorBoardLogger) -> str:
    return f"{logger.log_dir}  (view: tensorboard --logdir {logger.save_dir})"


def _csv_where(logger: CSVLogger) -> str:
    return (f"{logger.log_dir}/metrics.csv, figures and audio in {logger.log_dir}/media  (view: the CSV in a "
            "spreadsheet or pandas, the PNG and WAV files as they are)")


def _wandb_where(logger: WandbLogger) -> str:
    url = getattr(logger.experiment, "url", None)
    return (f"project {logger.name}, run {logger.version}{f' at {url}' if url else ''}  (view: the run's page on "
            f"wandb.ai; an offline run: wandb sync {Path(logger.save_dir or '.') / 'wandb'}/offline-run-*)")


def _mlflow_where(logger: MLFlowLogger) -> str:
    run = f"run {logger.run_id} of experiment {logger.experiment_id}, figures and audio as its artifacts under media/"
    if logger.save_dir is None:  # a tracking server
        return f"{run}  (view: the tracking server's web page)"
    return f"{run}, in {logger.save_dir}  (view: mlflow ui --backend-store-uri {logger.save_dir})"


class Kind(NamedTuple):
    label: str  # how the end-of-run summary names it
    send: Callable[[Any, Media], None]  # the media to one logger of this kind
    where: Callable[[Any], str]  # where its output is, and how to view it


#: The kinds that take media, matched with isinstance (a subclass is its parent's kind).
KINDS: dict[type, Kind] = {
    TensorBoardLogger: Kind("TensorBoard logs", _tensorboard, _tensorboard_where),
    CSVLogger: Kind("CSV logs", _csv, _csv_where),
    WandbLogger: Kind("W&B", _wandb, _wandb_where),
    MLFlowLogger: Kind("MLflow", _mlflow, _mlflow_where),
}

#: Lightning's loggers whose package musicvae does not install: (module to find, package to install).
PACKAGES: dict[type, tuple[str, str]] = {
    WandbLogger: ("wandb", "wandb"),
    MLFlowLogger: ("mlflow", "mlflow"),
    CometLogger: ("comet_ml", "comet-ml"),
}


def kind_of(logger: Any) -> Optional[Kind]:
    """The kind of a built logger, or None for a kind that takes no media."""
    return next((kind for cls, kind in KINDS.items() if isinstance(logger, cls)), None)


def no_media(loggers: list[Any]) -> list[str]:
    """The class names of the loggers that get no figures or audio."""
    return [type(logger).__name__ for logger in loggers if kind_of(logger) is None]


def _class(class_path: str) -> Optional[type]:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None  # Lightning's instantiation reports it


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules without a spec: loaded
        return True


def check_logger_packages(logger: Any) -> None:
    """Refuse, before anything is built, a logger whose package is not installed.

    Lightning raises ModuleNotFoundError only when it builds the logger, after the model and the
    data module, as a long traceback.

    Args:
        logger: the parsed `trainer.logger`: None/bool, one `{class_path, init_args}` namespace or
            dict, or a list of them.

    Raises:
        ConfigError: naming the logger, the missing package and the command that installs it.
    """
    for spec in logger if isinstance(logger, (list, tuple)) else [logger]:
        spec = spec.as_dict() if hasattr(spec, "as_dict") else spec
        if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
            continue  # none, or an already built logger
        cls = _class(spec["class_path"])
        for base, (module, package) in PACKAGES.items():
            if cls is not None and issubclass(cls, base) and not _installed(module):
                raise ConfigError(
                    f"--trainer.logger {cls.__name__} needs the {module} package, which is not installed: "
                    f"pip install {package} (uv pip install {package} in a uv environment), or choose "
                    "TensorBoardLogger or CSVLogger")


def run_summary(checkpoint_dir: Path, loggers: list[Any], program: str) -> str:
    """The end of a fit: the checkpoints, each logger's output and how to view it, and the resume command.

    Args:
        checkpoint_dir: the run's checkpoint folder.
        loggers: the trainer's loggers (`trainer.loggers`).
        program: how the user started the run (`musicvae`, `python scripts/train.py`).
    """
    lines = [f"  checkpoints: {checkpoint_dir}/{{best,last}}.ckpt (and config.yaml)"]
    for logger in loggers:
        kind = kind_of(logger)
        if kind is not None:
            lines.append(f"  {kind.label}: {kind.where(logger)}")
        else:
            folder = getattr(logger, "log_dir", None) or logger.save_dir
            lines.append(f"  {type(logger).__name__}: metrics only{f', in {folder}' if folder else ''} "
                         f"(figures and audio go to TensorBoard, CSV, W&B and MLflow loggers)")
    lines.append(f"  resume: {program} fit --ckpt_path {checkpoint_dir / 'last.ckpt'} [--trainer.max_epochs N]")
    return "musicvae: training finished.\n" + "\n".join(lines)
