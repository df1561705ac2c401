"""The `scripts/train.py` command line: LightningCLI over MusicVAEModule and MelDataModule."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Union

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from musicvae.data import MelDataModule
from musicvae.errors import MusicVAEError
from musicvae.module import MusicVAEModule

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "quickstart.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "musicvae"},
    },
}


def split_seed(seed_everything: Union[bool, int, None]) -> int:
    """The split seed follows `seed_everything` when that is a number; a random seed would move files."""
    if isinstance(seed_everything, bool) or seed_everything is None:
        return 0
    return int(seed_everything)


def checkpoint_callbacks(checkpoint_dir: Path, monitor: str = "val/loss") -> list[Callback]:
    """`best.ckpt` (lowest `monitor`) and `last.ckpt` (newest state) under an absolute folder.

    Two callbacks, because with a monitor Lightning 2.6 refreshes `last.ckpt` only when a new
    best is saved.
    """
    common = dict(dirpath=str(checkpoint_dir), auto_insert_metric_name=False, enable_version_counter=False)
    best = ModelCheckpoint(filename="best", monitor=monitor, mode="min", save_top_k=1, **common)
    last = ModelCheckpoint(filename="last", monitor=None, save_top_k=1, **common)
    return [best, last]


class MusicVAECLI(LightningCLI):
    """LightningCLI with the project's links, checkpoint folder and defaults."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--checkpoint_dir",
            type=str,
            default="checkpoints/musicvae",
            help="Folder for best.ckpt and last.ckpt (made absolute).",
        )
        # One source of truth for shapes: the model takes them from the data.
        parser.link_arguments("data.frames", "model.frames")
        parser.link_arguments("data.n_mels", "model.n_mels", apply_on="instantiate")
        parser.link_arguments("seed_everything", "data.seed", compute_fn=split_seed)

    def instantiate_trainer(self, **kwargs: Any):
        parser = self._parser(self.subcommand)
        extra = [self._get(self.config_init, key) for key in parser.callback_keys]
        checkpoint_dir = Path(self._get(self.config_init, "checkpoint_dir")).expanduser().resolve()
        extra += checkpoint_callbacks(checkpoint_dir)
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        return self._instantiate_trainer(trainer_config, extra)

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        lines = []
        for callback in trainer.checkpoint_callbacks:
            if callback.best_model_path or callback.last_model_path:
                lines.append(f"  {callback.filename}.ckpt: {Path(callback.dirpath) / (callback.filename + '.ckpt')}")
        if trainer.logger is not None and trainer.log_dir:
            lines.append(f"  TensorBoard logs: {trainer.log_dir}  (view with: tensorboard --logdir {trainer.logger.save_dir})")
        rank_zero_info("musicvae: training finished.\n" + "\n".join(lines))


def with_default_subcommand(args: list[str]) -> list[str]:
    """No arguments means `fit --config configs/quickstart.yaml`; no subcommand means `fit`."""
    if not args:
        return ["fit", "--config", str(DEFAULT_CONFIG)]
    if args[0] in SUBCOMMANDS:
        return args
    return ["fit", *args]


def cli_main(args: Optional[list[str]] = None, run: bool = True) -> MusicVAECLI:
    """Run the training command line with `args` (default: `sys.argv[1:]`); tests call this.

    With `run=False` no subcommand is taken: the config is parsed and the model, data module and
    trainer are built but nothing runs (for inspecting a configuration).
    """
    args = list(sys.argv[1:] if args is None else args)
    if run:
        args = with_default_subcommand(args)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return MusicVAECLI(
        MusicVAEModule,
        MelDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        # No prefix matching: a mistyped `--trainer.max_epoch` must fail, not silently mean max_epochs.
        parser_kwargs={"allow_abbrev": False, **{name: {"allow_abbrev": False} for name in SUBCOMMANDS}},
        auto_configure_optimizers=False,  # the module owns its optimizer (lr is a model hyper-parameter)
    )


def main() -> None:
    """Console entry point: user errors become one clear line and exit status 2."""
    try:
        cli_main()
    except MusicVAEError as err:
        sys.stderr.write(f"musicvae: error: {err}\n")
        raise SystemExit(2) from None
