"""`musicvae fit|validate|test|predict`: LightningCLI over MusicVAEModule and MelDataModule.

What this file adds to LightningCLI, each rule living in its own module:
- resuming with `--ckpt_path` (`resume.py`: the checkpoint's stored config, filtered to data by
  `stored_config.py`, is the base under the user's flags; checks before anything is built);
- the callbacks and plugins of every run, built as one list (`run_callbacks.py`), and the
  run-level options (`run_options.py`);
- the run's lifecycle: the run lock, the watch over the other processes of a DDP run, and the
  exit statuses (`subcommand_main`).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from musicvae.io.atomic import remove_abandoned
from musicvae.data.datamodule import MelDataModule
from musicvae.errors import ConfigError, MusicVAEError, NonFiniteError
from musicvae.io.safe_load import limit_config_yaml
from musicvae.io.storage import STORAGE_EXIT, StorageError
from musicvae.training.checkpoints import RAW_WEIGHTS_KEY, RUN_ID_KEY, load_checkpoint
from musicvae.training.guards import INTERRUPTED_EXIT, NONFINITE_EXIT, PREEMPTED_EXIT
from musicvae.training.initialisation import adopt_mel_settings, initialise_run
from musicvae.training.lightning_private import CLI_GET, CLI_INSTANTIATE_TRAINER, CLI_PARSER
from musicvae.training.logger_kinds import check_logger_packages, run_summary
from musicvae.training.module import MusicVAEModule
from musicvae.training.peers import (PEER_LOST_EXIT, PeerLostError, apply_collective_timeout, peer_lost_message,
                                     peers_watched, report)
from musicvae.training.predictions import LatentWriter, check_prediction_outputs
from musicvae.training.preflight import (check_batch_size, check_linear_path, check_mel_settings, check_run_folders,
                                         room_warning)
from musicvae.training.recipes import recipe_path
from musicvae.training.resume import (check_before_build, check_monitor, flag_value, load_resume,
                                      refuse_another_runs_folder, refuse_unresumable, repin_loggers, report_changes,
                                      restart_appended_lists, resume_command)
from musicvae.training.run_callbacks import SaveConfigToLogDir, refuse_weight_averaging, run_callbacks, trainer_settings
from musicvae.training.run_lock import RunLock
from musicvae.training.sharpen import SharpenModule
from musicvae.training.run_options import TRAINER_DEFAULTS, MusicVAEParser, add_run_options
from musicvae.training.stored_config import TakenConfig

DEFAULT_CONFIG = recipe_path("quickstart.yaml")
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class MusicVAECLI(LightningCLI):
    """LightningCLI with the project's links, checkpoint folder, resume rules and defaults.

    Overridden private LightningCLI methods (named in lightning_private.py and pinned by its test):
    `_run_subcommand` (the peer watch and the run lock around a subcommand) and `_parse_ckpt_path`
    (replaced: the stored config is read by resume.py instead).
    """

    def __init__(self, *args: Any, resume: Optional[dict] = None, init: Optional[tuple[str, dict]] = None,
                 taken: Optional[TakenConfig] = None, command: Optional[list[str]] = None,
                 handle_interrupt: bool = False, **kwargs: Any) -> None:
        self.resume = resume  # the checkpoint given with --ckpt_path, already loaded safely
        self.taken = taken  # what its stored config gave: cli_main put it first (resume.load_resume)
        self.command = command or []  # the user's command line (program and arguments), for the resume hint
        self.handle_interrupt = handle_interrupt  # a first Ctrl-C saves and stops (the command line's runs)
        self.preloaded_init = init  # (path, checkpoint) of --model.init_from given on the command line
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if self.taken is not None and isinstance(args, list):
            args = restart_appended_lists(args, getattr(self, CLI_PARSER)(args[0]))
        super().parse_arguments(parser, args)
        if self.taken is not None and isinstance(args, list) and args[0] == "fit":
            repin_loggers(self.config["fit"].trainer.logger, self.taken.loggers)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_run_options(parser)

    def _setting(self, key: str, config: Any = None) -> Any:
        return getattr(self, CLI_GET)(self.config if config is None else config, key)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self._setting("checkpoint_dir")).expanduser().resolve()

    @property
    def ckpt_path(self) -> Optional[str]:
        return flag_value(self.command[1:], "--ckpt_path")

    def _stored_config(self) -> str:
        """This run's config as YAML, with absolute paths so it resumes from any directory."""
        config = (self.config[self.subcommand] if self.subcommand else self.config).clone()
        config.checkpoint_dir = str(self.checkpoint_dir)
        config.overwrite = config.force = False
        if "ckpt_path" in config:  # absent without a subcommand (run=False)
            config.ckpt_path = None
        return getattr(self, CLI_PARSER)(self.subcommand).dump(config, skip_none=False)

    def instantiate_trainer(self, **kwargs: Any):
        monitor = check_monitor(self._setting("monitor"), self.model.hparams.loss)
        refuse_weight_averaging(self._setting("trainer.callbacks", self.config_init) or [])
        parser = getattr(self, CLI_PARSER)(self.subcommand)
        user_callbacks = [self._setting(key, self.config_init) for key in parser.callback_keys]
        callbacks = run_callbacks(
            subcommand=self.subcommand, checkpoint_dir=self.checkpoint_dir, monitor=monitor,
            every_n_steps=self._setting("checkpoint_every_n_steps"), skip_nonfinite=self._setting("skip_nonfinite"),
            run_config=yaml.safe_load(self._stored_config()), run_id=(self.resume or {}).get(RUN_ID_KEY) or uuid.uuid4().hex,
            resumed_hparams=(self.resume or {}).get("hyper_parameters") or None, interrupt=self.handle_interrupt,
            resume_hint=resume_command(self.command, self.checkpoint_dir / "last.ckpt"),
            logging=self._setting("trainer.logger", self.config_init) not in (None, False, []),
            ema_decay=self.model.hparams.get("ema_decay"), predict_dir=self._setting("predict_dir"))
        trainer_config = trainer_settings({**self._setting("trainer", self.config_init), **kwargs},
                                          not self.model.automatic_optimization)
        trainer = getattr(self, CLI_INSTANTIATE_TRAINER)(trainer_config, [*user_callbacks, *callbacks])
        apply_collective_timeout(trainer, self._setting("collective_timeout"))
        return trainer

    def before_instantiate_classes(self) -> None:
        if self.subcommand and self._setting("ckpt_path") and self.resume is None:
            raise ConfigError(
                "ckpt_path is set in a config file; give it on the command line (--ckpt_path FILE) so the "
                "stored run settings and the checkpoint are checked before anything is built"
            )
        check_logger_packages(self._setting("trainer.logger"))
        if self.subcommand:
            check_run_folders(self.subcommand, self.config[self.subcommand])
        check_mel_settings(self._setting("data.mel"))
        if self.subcommand and self.resume is not None:
            check_before_build(self.resume, self.ckpt_path, self.subcommand, self.config[self.subcommand], self.taken,
                               self._setting)
        self.init_ckpt = None
        init_from = self._setting("model.init_args.init_from") if self.subcommand == "fit" else None
        if init_from and self.resume is None:
            # Read (safely) before anything is built or written: a bad file is refused with nothing done.
            pre = self.preloaded_init
            self.init_ckpt = pre[1] if pre and pre[0] == init_from else load_checkpoint(init_from)
            self.init_mel = adopt_mel_settings(self.config[self.subcommand], self.init_ckpt)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            with peers_watched(getattr(self, "trainer", None), self._peer_lost_message, self._release_run_lock,
                               self._setting("collective_timeout"), watch=subcommand == "fit"):
                super()._run_subcommand(subcommand)
        finally:
            self._release_run_lock()

    def _peer_lost_message(self, cause: str) -> str:
        last = self.checkpoint_dir / "last.ckpt"
        return peer_lost_message(self.trainer.global_rank, self.trainer.world_size, cause, last,
                                 resume_command(self.command, last))

    def _release_run_lock(self) -> None:
        if getattr(self, "run_lock", None) is not None:
            self.run_lock.release()
            self.run_lock = None

    def before_fit(self) -> None:
        # First: a folder another live run trains in is refused before anything else is checked (nothing
        # written); the lock itself is taken once every other check has passed (the end of this hook).
        self.run_lock = None
        lock = RunLock(self.checkpoint_dir, " ".join([*self.command[:1], shlex.join(self.command[1:])]))
        if self.trainer.is_global_zero:
            lock.refuse_if_held()
        # Before prepare_data: a batch the training set can never fill fails now, not after the cache is built.
        bound = check_batch_size(self.datamodule)
        if self.resume is None:
            self._start_fresh(bound)
        else:
            refuse_another_runs_folder(self.checkpoint_dir, self.resume, self.ckpt_path, self._setting("overwrite"))
            # Again on the built data module: its mel settings may come from the folder's mel.json.
            refuse_unresumable(self.resume, dict(self.model.hparams), self.datamodule.mel.to_dict(), "fit")
            parser = getattr(self, CLI_PARSER)(self.subcommand)
            report_changes(self.resume, yaml.safe_load(self._stored_config()),
                           yaml.safe_load(parser.dump(parser.get_defaults(), skip_none=False)), self._setting("monitor"))
            if self.model.hparams.get("ema_decay") and RAW_WEIGHTS_KEY not in self.resume:
                rank_zero_info("musicvae: EMA starts at this resume: the average begins at the checkpoint's weights")
        room = room_warning(self.model, self.checkpoint_dir)
        if room:
            rank_zero_warn(room)
        if self.trainer.is_global_zero:
            note = lock.acquire()
            self.run_lock = lock
            if note:
                rank_zero_warn(note)
        for path in remove_abandoned(self.checkpoint_dir, recursive=False):
            rank_zero_info(f"musicvae: removed {path.name}, left by a checkpoint write that was killed")

    def _start_fresh(self, bound: int) -> None:
        """A new run: the adversarial stage's start, `--model.init_from`, and a used folder refused."""
        if isinstance(self.model, SharpenModule) and self.init_ckpt is None:
            raise ConfigError(
                "--model SharpenModule (the adversarial stage) fine-tunes a trained VAE's decoder with its encoder "
                "frozen: give --model.init_from CHECKPOINT (the VAE's best.ckpt); from random weights it would "
                "freeze a random encoder")
        if self.init_ckpt is not None:
            rank_zero_info(initialise_run(self.model, self.datamodule, self.init_ckpt, self._setting(
                "model.init_args.init_from"), self.init_mel, self._setting("init_normalization")))
        check_linear_path(self.model, bound)  # a resumed run's linear path is already set
        existing = sorted(p.name for p in self.checkpoint_dir.glob("*.ckpt")) if self.checkpoint_dir.is_dir() else []
        if existing and not self._setting("overwrite"):
            raise ConfigError(
                f"{self.checkpoint_dir} already holds {', '.join(existing)} from an earlier run. Resume it with "
                f"--ckpt_path {self.checkpoint_dir / 'last.ckpt'}, choose another --checkpoint_dir, or pass "
                "--overwrite true to start afresh (the old checkpoints are replaced as the new run saves).")
        # Nothing is created here: the callbacks make the folder (before_instantiate_classes checked they can).

    def before_test(self) -> None:
        if self.resume is None:
            raise ConfigError("test scores a trained model: give --ckpt_path CHECKPOINT")

    def before_predict(self) -> None:
        if self.resume is None:
            raise ConfigError("predict encodes with a trained model: give --ckpt_path CHECKPOINT")
        check_prediction_outputs(self._setting("predict_dir"), self.datamodule, self._setting("force"))
        self.datamodule.predict_reconstructions = bool(self._setting("predict_reconstructions"))

    def after_predict(self) -> None:
        writer = next(cb for cb in self.trainer.callbacks if isinstance(cb, LatentWriter))
        rank_zero_info(f"musicvae: wrote the latent codes of each recording into {writer.predict_dir}")

    def _parse_ckpt_path(self) -> None:  # lightning_private.CLI_CKPT_HOOK: resume.load_resume does it instead
        return None

    def after_fit(self) -> None:
        # Each logger's own folder, not trainer.log_dir: the trainer's broadcasts, and other ranks have left.
        if self.trainer.is_global_zero:
            rank_zero_info(run_summary(self.checkpoint_dir, self.trainer.loggers, (self.command or ["musicvae"])[0]))


def with_default_subcommand(args: list[str]) -> list[str]:
    """No arguments means `fit --config configs/quickstart.yaml`; no subcommand means `fit`."""
    if not args or args == ["fit"]:  # bare `musicvae fit` / `python scripts/train.py`: the quickstart
        return ["fit", "--config", str(DEFAULT_CONFIG)]
    if args[0] in SUBCOMMANDS:
        return args
    return ["fit", *args]


def cli_main(args: Optional[list[str]] = None, run: bool = True, program: str = "musicvae",
             handle_interrupt: bool = False) -> MusicVAECLI:
    """Run the training command line with `args` (default: `sys.argv[1:]`); tests call this.

    With `run=False` no subcommand is taken: the config is parsed and the model, data module and
    trainer are built but nothing runs (for inspecting a configuration). `program` is how the
    user started it, for the resume command printed on the way out; `handle_interrupt` makes a
    first Ctrl-C save and stop like SIGTERM (the command does; a Python caller keeps its own).
    """
    args = list(sys.argv[1:] if args is None else args)
    command = [program, *args]
    limit_config_yaml()  # before any config file, the checkpoint's included, is read
    if run:
        args = with_default_subcommand(args)
    resume = taken = None
    if run and args[0] in SUBCOMMANDS and flag_value(args, "--ckpt_path"):
        resume, taken, args = load_resume(args)
    init = None
    init_path = flag_value(args, "--model.init_from")
    if init_path and run and args[0] == "fit" and resume is None:
        # Read before the CLI prints or builds anything: a bad file is refused in one line, nothing done.
        init = (init_path, load_checkpoint(init_path))
    if run and args[0] == "predict" and not any(a.startswith("--return_predictions") for a in args):
        # LatentWriter writes each recording as soon as it is encoded; returning the predictions
        # as well would keep a whole collection's codes in memory until the end.
        args = [*args, "--return_predictions", "false"]
    # Lightning 2.6 offers to checkpoint a manually optimized model as it was before the batch's
    # optimizer steps; the adversarial stage's checkpoints hold the state after them, the one that
    # matches global_step and resumes exactly (tests/training/test_adversarial.py).
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")
    # The prediction writer's batch indices: not used (each batch names its recording).
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # Deprecations inside Lightning's own use of its dependencies: nothing a user can act on.
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    return MusicVAECLI(
        MusicVAEModule, MelDataModule, subclass_mode_model=True, parser_class=MusicVAEParser, args=args, run=run, resume=resume, init=init, taken=taken, command=command,
        handle_interrupt=handle_interrupt, seed_everything_default=0, trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=SaveConfigToLogDir, save_config_kwargs={"overwrite": True},
        # No prefix matching: a mistyped `--trainer.max_epoch` must fail, not silently mean max_epochs.
        parser_kwargs={"allow_abbrev": False, **{name: {"allow_abbrev": False} for name in SUBCOMMANDS}},
        auto_configure_optimizers=False,  # the module owns its optimizer (lr is a model hyper-parameter)
    )


def subcommand_main(argv: Optional[list[str]] = None, program: Optional[str] = None) -> int:
    """`musicvae fit|validate|test|predict ...`. Exit status: 0 done; 2 a user error (one clear
    line, no traceback); 3 stopped by a NaN/Inf; 130 stopped by Ctrl-C and 143 by SIGTERM (each
    after saving last.ckpt when finite); 4 a write the machine refused (disk full, read-only or
    deleted folder); 5 another process of a multi-process run died; 1 a second Ctrl-C, which stops
    at once."""
    if program is None:
        program = "musicvae" if Path(sys.argv[0]).name == "musicvae" else f"python {sys.argv[0]}"
    try:
        cli_main(argv, program=program, handle_interrupt=True)
    except SIGTERMException as stop:
        return INTERRUPTED_EXIT if getattr(stop, "signal", None) == signal.SIGINT else PREEMPTED_EXIT
    except PeerLostError as err:
        report(str(err))  # once: PeerWatch may have seen the same death
        return PEER_LOST_EXIT
    except (NonFiniteError, StorageError, MusicVAEError) as err:
        sys.stderr.write(f"musicvae: error: {err}\n")
        return NONFINITE_EXIT if isinstance(err, NonFiniteError) else STORAGE_EXIT if isinstance(err, StorageError) else 2
    return 0


def main() -> None:
    """`python scripts/train.py ...`: without a subcommand it is `fit`."""
    raise SystemExit(subcommand_main())
