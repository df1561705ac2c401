"""The run-level options of `musicvae fit|validate|test|predict`, beside LightningCLI's trainer/model/data groups."""

from __future__ import annotations

import re
from typing import Any, Literal, NoReturn, Optional, Union

from lightning.pytorch.cli import LightningArgumentParser

from musicvae.io.outputs import add_force_flag
from musicvae.training.hparams import MOVED, VAE_CLASS
from musicvae.training.media import MediaLogger
from musicvae.training.resume import MONITOR_DEPENDS

#: The logger a run gets unless the command names another (`--trainer.logger`).
TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "musicvae"},
    },
}


#: jsonargparse's report of a bad model setting in subclass mode: the model class, then the setting.
_MODEL_SETTING_ERROR = re.compile(r'Parser key "model":.*?Problem with given class_path \'([^\']+)\':\s*'
                                  r'(?:Parser key "([^"]+)":\s*(.+?)|Option \'([^\']+)\' is not accepted)'
                                  r'(?=\n\s*- |\Z)', re.S)


class MusicVAEParser(LightningArgumentParser):
    """LightningCLI's parser, with a bad model setting reported as `--model.NAME` and the reason, not as
    jsonargparse's account of every class the model group could have been."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        found = _MODEL_SETTING_ERROR.search(message)
        if found:
            cls, key, reason, unknown = found.groups()
            cls = cls.rsplit(".", 1)[-1]
            message = (f'Parser key "model.{key}" ({cls}): {" ".join(reason.split())}' if key else
                       f'--model.{unknown}: {cls} has no such setting{renamed(unknown)} (musicvae fit --model.help '
                       f'{cls} lists them)')
        super().error(message, ex)


def renamed(setting: str) -> str:
    """Where an earlier version's model setting lives now, as a clause of the error ('' for other names)."""
    if setting in MOVED:
        group, key = MOVED[setting]
        return f"; it is now --{'model.kl' if group == 'kl' else group}.{key}"
    if setting == "adversarial":
        return "; the adversarial stage is now --model SharpenModule (configs/sharp.yaml)"
    return ""


def split_seed(seed_everything: Union[bool, int, None]) -> int:
    """The split seed follows `seed_everything` when that is a number; a random seed would move files."""
    if isinstance(seed_everything, bool) or seed_everything is None:
        return 0
    return int(seed_everything)


def add_run_options(parser: Any) -> None:
    """The options outside the trainer, model and data groups, and the links between the groups."""
    parser.add_argument(
        "--checkpoint_dir", type=str, default="checkpoints/musicvae",
        help="Folder for best.ckpt, last.ckpt and config.yaml (made absolute).",
    )
    parser.add_argument(
        "--monitor", type=str, default="val/loss",
        help=f"Validation metric that picks best.ckpt (lower is better): one of {', '.join(MONITOR_DEPENDS)}.",
    )
    parser.add_argument(
        "--overwrite", type=bool, default=False,
        help="Start a fresh run in a checkpoint_dir that already holds checkpoints (they get replaced).",
    )
    parser.add_argument(
        "--checkpoint_every_n_steps", type=int, default=0,
        help="Also refresh last.ckpt every N training steps, mid-epoch (0: only after each validation). "
        "A resume from such a checkpoint continues with the same batches and random draws.",
    )
    parser.add_argument(
        "--predict_dir", type=str, default="predictions",
        help="predict: folder for one latent-code file per recording (<recording>.pt; made absolute).",
    )
    parser.add_argument(
        "--predict_reconstructions", type=bool, default=False,
        help="predict: also write each window's reconstruction (log-mel) into the recording's file.",
    )
    add_force_flag(parser, "predict: replace latent-code files --predict_dir already holds (never an input; "
                           "fit replaces checkpoints with --overwrite true).")
    parser.add_argument(
        "--init_normalization", type=Literal["checkpoint", "data"], default="checkpoint",
        help="With --model.init_from: normalise with the checkpoint's statistics (the scale its weights "
        "expect) or compute them afresh from this run's training data.",
    )
    parser.add_argument(
        "--collective_timeout", type=Optional[float], default=None,
        help="Several processes (DDP): seconds a process waits in a collective (all-reduce, broadcast) for "
        "the others before it stops with exit status 5 (default: PyTorch's 30 minutes). Under NCCL, the "
        "processes left when one dies on another machine wait this long; configs/gpu.yaml sets 600. It must "
        "exceed the longest time one process works alone between collectives (rank 0's checkpoint writes "
        "and validation media); the data preparation's wait is not bounded by it.",
    )
    parser.add_argument(
        "--skip_nonfinite", type=int, default=0,
        help="Batches with a NaN/Inf loss or gradient to skip (update dropped, warning logged) before "
        "training stops; 0 stops at the first.",
    )
    # The model is chosen by class path (subclass mode): the VAE unless a recipe names the adversarial
    # stage (configs/sharp.yaml); `--model.lr` and a config's `model: {lr: ...}` still reach its arguments.
    parser.set_defaults({"model": {"class_path": VAE_CLASS}})
    # The media callback's options are its own group (`--media.audio_every_n_epochs 0`).
    parser.add_lightning_class_args(MediaLogger, "media")
    # One source of truth for shapes: the model takes them from the data.
    parser.link_arguments("data.frames", "model.init_args.frames")
    parser.link_arguments("data.n_mels", "model.init_args.n_mels", apply_on="instantiate")
    parser.link_arguments("seed_everything", "data.seed", compute_fn=split_seed)
