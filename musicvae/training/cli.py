"""The `scripts/train.py` command line: LightningCLI over MusicVAEModule and MelDataModule.

Resuming (`--ckpt_path`) differs from plain LightningCLI in two ways, both on purpose:
- the run's full config stored in the checkpoint is the base, and explicit `--config` files and
  flags override it (LightningCLI would instead merge the checkpoint's model hyper-parameters
  over the command line, silently ignoring e.g. a new `--model.lr`);
- a new learning rate is put into the restored optimizer (see ApplyResumedLearningRate).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, WeightAveraging
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from musicvae.atomic import remove_abandoned
from musicvae.training.callbacks import ApplyResumedLearningRate, FixedNameCheckpoint, RunMetadata
from musicvae.training.ema import EMA
from musicvae.training.checkpoint_io import AtomicCheckpointIO
from musicvae.training.initialisation import initialise_from
from musicvae.training.checkpoints import (
    DATA_STATE_KEY,
    RAW_WEIGHTS_KEY,
    RUN_ID_KEY,
    foreign_checkpoints,
    config_changes,
    config_from_hyperparameters,
    dump_yaml,
    load_checkpoint,
    run_config,
    unresumable_changes,
)
from musicvae.data.datamodule import MelDataModule
from musicvae.errors import CheckpointError, ConfigError, MusicVAEError, NonFiniteError
from musicvae.storage import STORAGE_EXIT, StorageError, free_bytes, payload_bytes, size_text
from musicvae.training.guards import INTERRUPTED_EXIT, NONFINITE_EXIT, PREEMPTED_EXIT, NonFiniteGuard, Preemption
from musicvae.training.module import MusicVAEModule
from musicvae.training.random_state import ResumableRandomState
from musicvae.training.run_lock import RunLock
from musicvae.training.lightning_private import CLI_CKPT_HOOK, observe_launched_processes, set_process_group_timeout
from musicvae.training.stored_config import NOT_COMPARED, TakenConfig, check_mel_bounds, check_model_shapes, config_as_data, pinned_version
from musicvae.training.peers import (PEER_LOST_EXIT, PeerLostError, PeerWatch, collective_error_cause, peer_lost,
                                     peer_lost_message, report)
from musicvae.training.media import MediaLogger
from musicvae.training.predictions import LatentWriter, check_prediction_outputs
from musicvae.outputs import add_force_flag
from musicvae.training.recipes import recipe_path
from musicvae.safe_load import limit_config_yaml, safe_yaml_load
from musicvae.training.preflight import (check_batch_size, check_creatable_dir, check_linear_path, check_mel_settings,
                                logger_save_dirs)

DEFAULT_CONFIG = recipe_path("quickstart.yaml")
SUBCOMMANDS = ("fit", "validate", "test", "predict")
TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "musicvae"},
    },
}
#: Which loss weights each monitorable metric depends on (for the resume warning).
MONITOR_DEPENDS = {
    "val/loss": ("loss", "beta", "spectral_weight", "output_reg_weight", "freq_bands"),
    "val/recon": ("loss", "freq_bands"),
    "val/kl": (),
    "val/kl_nats": (),
    "val/mse": (),
    "val/spectral": ("loss",),
    "val/output_reg": ("loss",),
    # Diagnostics (musicvae/metrics.py) where lower is better.
    "val/weighted_mse": ("freq_bands",),
    "val/spectral_convergence": (),
    "val/lsd_db": (),
    "val/range_frac_outside": (),
    "val/featureless_frac": (),
    # Realism and detail (Fréchet distances and the worst band ratio's log distance from 1): what the
    # adversarial stage (configs/sharp.yaml) picks best.ckpt by.
    "val/realism_frames": (),
    "val/realism_differences": (),
    "val/band_ratio_error": (),
}


def split_seed(seed_everything: Union[bool, int, None]) -> int:
    """The split seed follows `seed_everything` when that is a number; a random seed would move files."""
    if isinstance(seed_everything, bool) or seed_everything is None:
        return 0
    return int(seed_everything)


def checkpoint_callbacks(checkpoint_dir: Path, monitor: str = "val/loss", every_n_steps: int = 0) -> list[Callback]:
    """`best.ckpt` (lowest `monitor`) and `last.ckpt` (newest state) under an absolute folder.

    Two callbacks, because with a monitor Lightning 2.6 refreshes `last.ckpt` only when a new
    best is saved; a third refreshes `last.ckpt` every `every_n_steps` training steps (mid-epoch,
    resumable exactly), because ModelCheckpoint takes step or epoch triggers, not both. The
    folder is absolute because ModelCheckpoint restores its best score only when the stored
    `dirpath` string is identical (FixedNameCheckpoint also follows a moved folder).
    """
    common = dict(dirpath=str(checkpoint_dir), auto_insert_metric_name=False, enable_version_counter=False)
    best = FixedNameCheckpoint(filename="best", monitor=monitor, mode="min", save_top_k=1, **common)
    last = FixedNameCheckpoint(filename="last", monitor=None, save_top_k=1, **common)
    if every_n_steps <= 0:
        return [best, last]
    steps = FixedNameCheckpoint(filename="last", monitor=None, save_top_k=1, every_n_train_steps=every_n_steps, **common)
    return [best, last, steps]


def with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """The trainer's plugins plus AtomicCheckpointIO, unless a CheckpointIO was configured."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


class SaveConfigToLogDir(SaveConfigCallback):
    """LightningCLI's config.yaml in the TensorBoard run folder, skipped when there is no logger.

    Without a logger Lightning's log_dir is the working directory, which must not collect files;
    the run's config is beside the checkpoints anyway.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


class MusicVAECLI(LightningCLI):
    """LightningCLI with the project's links, checkpoint folder, resume rules and defaults."""

    def __init__(self, *args: Any, resume: Optional[dict] = None, init: Optional[tuple[str, dict]] = None,
                 taken: Optional[TakenConfig] = None, command: Optional[list[str]] = None,
                 handle_interrupt: bool = False, **kwargs: Any) -> None:
        self.resume = resume  # the checkpoint given with --ckpt_path, already loaded safely
        # What the resumed run's stored config gave: cli_main put it first, as
        # [subcommand, "--config", TAKEN, *user arguments].
        self.taken = taken
        self.command = command or []  # the user's command line (program and arguments), for the resume hint
        self.handle_interrupt = handle_interrupt  # a first Ctrl-C saves and stops (the command line's runs)
        self.preloaded_init = init  # (path, checkpoint) of --model.init_from given on the command line
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if self.taken is not None and isinstance(args, list):
            args = restart_appended_lists(args, self._parser(args[0]))
        super().parse_arguments(parser, args)
        if self.taken is not None and isinstance(args, list) and args[0] == "fit":
            # File loggers continue the resumed run's version folders where the user's (or the default)
            # folder is the stored one; the stored folder itself is never taken.
            repin_loggers(self.config["fit"].trainer.logger, self.taken.loggers)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
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
        # One source of truth for shapes: the model takes them from the data.
        parser.link_arguments("data.frames", "model.frames")
        parser.link_arguments("data.n_mels", "model.n_mels", apply_on="instantiate")
        parser.link_arguments("seed_everything", "data.seed", compute_fn=split_seed)

    def _setting(self, key: str) -> Any:
        return self._get(self.config, key)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self._setting("checkpoint_dir")).expanduser().resolve()

    def _stored_config(self) -> str:
        """This run's config as YAML, with absolute paths so it resumes from any directory."""
        config = (self.config[self.subcommand] if self.subcommand else self.config).clone()
        config.checkpoint_dir = str(self.checkpoint_dir)
        config.overwrite = config.force = False
        if "ckpt_path" in config:  # absent without a subcommand (run=False)
            config.ckpt_path = None
        return self._parser(self.subcommand).dump(config, skip_none=False)

    def instantiate_trainer(self, **kwargs: Any):
        monitor = self._setting("monitor")
        if monitor not in MONITOR_DEPENDS:
            raise ConfigError(f"--monitor {monitor!r} is not a logged validation metric; use one of {list(MONITOR_DEPENDS)}")
        if monitor in ("val/spectral", "val/output_reg") and self.model.hparams.loss != "spectral":
            raise ConfigError(f"--monitor {monitor} is only logged with --model.loss spectral")
        parser = self._parser(self.subcommand)
        extra = [self._get(self.config_init, key) for key in parser.callback_keys]
        every = self._setting("checkpoint_every_n_steps")
        skip = self._setting("skip_nonfinite")
        if every < 0 or skip < 0:
            raise ConfigError(
                f"--checkpoint_every_n_steps ({every}) and --skip_nonfinite ({skip}) must be 0 or more"
            )
        extra += checkpoint_callbacks(self.checkpoint_dir, monitor, every)
        run_id = (self.resume or {}).get(RUN_ID_KEY) or uuid.uuid4().hex
        extra.append(RunMetadata(yaml.safe_load(self._stored_config()), monitor, self.checkpoint_dir, run_id))
        extra.append(ApplyResumedLearningRate((self.resume or {}).get("hyper_parameters") or None))
        configured = self._get(self.config_init, "trainer.callbacks") or []
        if any(isinstance(cb, WeightAveraging) for cb in (configured if isinstance(configured, list) else [configured])):
            raise ConfigError(
                "--trainer.callbacks: a weight-averaging callback (such as Lightning's EMAWeightAveraging) "
                "was given; use --model.ema_decay D instead (e.g. 0.999). musicvae's EMA keeps the "
                "averaged weights in place through the module's validation-end hooks, so the fitted compensation "
                "curve, the figures and best.ckpt all describe the same weights (musicvae/training/ema.py)")
        extra += [ResumableRandomState(), NonFiniteGuard(skip),
                  Preemption(self.checkpoint_dir, interrupt=self.handle_interrupt,
                             resume_command=resume_command(self.command, self.checkpoint_dir / "last.ckpt")),
                  MediaLogger()]
        self.model.lr_monitor = monitor  # what --model.lr_schedule plateau watches
        if self._get(self.config_init, "trainer.logger") not in (None, False, []):
            extra.append(LearningRateMonitor())  # train/lr (musicvae/training/schedules.py names it)
        decay = self.model.hparams.get("ema_decay")
        if decay and self.subcommand in (None, "fit"):
            extra.append(EMA(decay))  # after MediaLogger: the average stays in place until it has drawn
        if self.subcommand == "predict":
            extra.append(LatentWriter(self._setting("predict_dir")))
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if self.model.hparams.get("adversarial"):
            check_manual_optimization(trainer_config)
            if trainer_config.get("strategy") == "ddp":
                # DDP wraps the whole module, and each of the stage's two backward passes leaves the other
                # network's parameters without gradients, which plain DDP takes for a hang and refuses
                # (Lightning-AI/pytorch-lightning#20328, #20866): it must look for unused parameters.
                trainer_config["strategy"] = "ddp_find_unused_parameters_true"
                rank_zero_info("musicvae: the adversarial stage runs DDP as ddp_find_unused_parameters_true")
        trainer_config["plugins"] = with_atomic_checkpoints(trainer_config.get("plugins"))
        trainer = self._instantiate_trainer(trainer_config, extra)
        timeout = self._setting("collective_timeout")
        if timeout is not None:
            if timeout <= 0:
                raise ConfigError(f"--collective_timeout {timeout:g}: give a number of seconds above 0 (e.g. 600)")
            if not set_process_group_timeout(trainer.strategy, timeout) and trainer.world_size > 1:
                rank_zero_warn(f"--collective_timeout is not applied: it sets a DDP process group's timeout, and "
                               f"the strategy is {type(trainer.strategy).__name__}")
        return trainer

    def before_instantiate_classes(self) -> None:
        if self.subcommand and self._setting("ckpt_path") and self.resume is None:
            raise ConfigError(
                "ckpt_path is set in a config file; give it on the command line (--ckpt_path FILE) so the "
                "stored run settings and the checkpoint are checked before anything is built"
            )
        # Folders the run will write into, checked (never created) before anything is built.
        if self.subcommand:
            if self.subcommand == "fit":
                check_creatable_dir(self._setting("checkpoint_dir"), "--checkpoint_dir")
            for setting, folder in logger_save_dirs(self._get(self.config, "trainer.logger")):
                check_creatable_dir(folder, setting)
            if self._get(self.config, "data.cache_dir"):
                check_creatable_dir(self._get(self.config, "data.cache_dir"), "--data.cache_dir")
        check_mel_settings(self._get(self.config, "data.mel"))
        if self.subcommand and self.resume is not None:
            self._check_stored_sizes()
        self.init_ckpt = None
        init_from = self._get(self.config, "model.init_from") if self.subcommand == "fit" else None
        if init_from and self.resume is None:
            # Read (safely) before anything is built or written: a bad file is refused with nothing done.
            preloaded = self.preloaded_init
            self.init_ckpt = preloaded[1] if preloaded and preloaded[0] == init_from else load_checkpoint(init_from)
            self.init_mel = adopt_mel_settings(self.config[self.subcommand], self.init_ckpt)

    def _check_stored_sizes(self) -> None:
        """Before anything is built from a checkpoint's settings: what was taken from it, in words, and the
        model those settings describe, built on the meta device and compared with its weights."""
        path = _ckpt_path_arg(self.command[1:]) or "the checkpoint"
        if self.taken is not None and self.taken.inputs:
            rank_zero_info(f"musicvae: from the checkpoint's stored config: {', '.join(self.taken.inputs)}")
        # Worth a word only where the run does not use the same value anyway (from the user or a default).
        dropped = [f"{key} {value!r}" for key, value in (self.taken.not_taken if self.taken else [])
                   if "[" in key or self._get(self.config, key, default=None) != value]
        if dropped:
            rank_zero_info("musicvae: not taken from the checkpoint (a checkpoint is data; give them on the command line "
                           f"if you want them): {', '.join(dropped)}")
        stored_mel = (self.resume.get(DATA_STATE_KEY) or {}).get("mel")
        if stored_mel is not None:
            check_mel_bounds(stored_mel, path)
        config = self.config[self.subcommand]
        mel = config.data.mel.as_dict() if isinstance(config.data.mel, Namespace) else config.data.mel
        hparams = config.model.as_dict()
        hparams["n_mels"] = int((mel or stored_mel or {}).get("n_mels", 128))
        hparams["compile"] = False
        # Named changes first (the clearest message), then the shapes the settings give, still on no memory.
        problems = unresumable_changes(self.resume, hparams, mel or stored_mel or {})
        if problems:
            raise CheckpointError(
                f"cannot {'resume' if self.subcommand == 'fit' else 'use the checkpoint'}: its weights do not fit the "
                f"new settings: {'; '.join(problems)}. Keep these as they were, or start a fresh run without --ckpt_path.")
        check_model_shapes(MusicVAEModule, hparams, self.resume["state_dict"], path)

    def _run_subcommand(self, subcommand: str) -> None:
        watch = self._peer_watch() if subcommand == "fit" else None
        try:
            if watch is None:
                super()._run_subcommand(subcommand)
            else:
                # The children Lightning launches go to PeerWatch instead of Lightning's observer.
                with observe_launched_processes(watch.adopt):
                    super()._run_subcommand(subcommand)
        except Exception as err:
            if getattr(self, "trainer", None) is None or self.trainer.world_size < 2 or not peer_lost(err):
                raise
            cause = collective_error_cause(err, self._setting("collective_timeout"))
            raise PeerLostError(self._peer_lost_message(cause)) from None
        finally:
            if watch is not None:
                watch.stop()
            self._release_run_lock()

    def _peer_lost_message(self, cause: str) -> str:
        last = self.checkpoint_dir / "last.ckpt"
        return peer_lost_message(self.trainer.global_rank, self.trainer.world_size, cause, last,
                                 resume_command(self.command, last))

    def _release_run_lock(self) -> None:
        if getattr(self, "run_lock", None) is not None:
            self.run_lock.release()
            self.run_lock = None

    def _peer_watch(self) -> Optional[PeerWatch]:
        """On a run of several processes, a watch of the processes this one started and of the one that
        started it (musicvae.training.peers); None on one process."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size < 2:
            return None
        environment = getattr(trainer.strategy, "cluster_environment", None)
        # Started by a launcher (Lightning's, torchrun, SLURM): watch it. The process that launches the
        # others itself (Lightning, one machine) has the user's shell as parent: nothing to watch there.
        launched = environment is not None and environment.creates_processes_externally
        return PeerWatch(self._peer_lost_message, parent=os.getppid() if launched else None,
                         before_exit=self._release_run_lock, first_rank=trainer.global_rank + 1,
                         standing_down=lambda: trainer.interrupted).start()

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
            if self.model.hparams.get("adversarial") and self.init_ckpt is None:
                raise ConfigError(
                    "--model.adversarial true fine-tunes a trained VAE's decoder with its encoder frozen: give "
                    "--model.init_from CHECKPOINT (the VAE's best.ckpt); from random weights it would freeze a random encoder")
            if self.init_ckpt is not None:
                self._initialise()
            check_linear_path(self.model, bound)  # a resumed run's linear path is already set
            self._refuse_to_clobber()
        else:
            self._refuse_another_runs_folder()
            self._check_resume()
            if self.model.hparams.get("ema_decay") and RAW_WEIGHTS_KEY not in self.resume:
                rank_zero_info("musicvae: EMA starts at this resume: the average begins at the checkpoint's weights")
        self._warn_if_little_room()
        if self.trainer.is_global_zero:
            note = lock.acquire()
            self.run_lock = lock
            if note:
                rank_zero_warn(note)
        for path in remove_abandoned(self.checkpoint_dir, recursive=False):
            rank_zero_info(f"musicvae: removed {path.name}, left by a checkpoint write that was killed")

    def _warn_if_little_room(self) -> None:
        """A warning when the checkpoint folder's disk holds fewer than three checkpoints: best and
        last, and the temporary file each is written to before it replaces the old one."""
        weights = payload_bytes(self.model.state_dict())
        params = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        size = weights + 2 * params + (weights if self.model.hparams.get("ema_decay") else 0)  # + Adam's 2 moments, + EMA
        free = free_bytes(self.checkpoint_dir)
        if free is not None and free < 3 * size:
            rank_zero_warn(f"--checkpoint_dir {self.checkpoint_dir}: {size_text(free)} free, room for {free // max(size, 1)} "
                           f"checkpoint(s) of about {size_text(size)}; best.ckpt and last.ckpt need 3 (each is written "
                           "beside the old one first). Free space or choose another folder.")

    def _initialise(self) -> None:
        """--model.init_from: the checkpoint's weights, and its normalisation unless told otherwise."""
        path = self._get(self.config, "model.init_from")
        done = initialise_from(self.model, self.init_ckpt, path)
        state = self.init_ckpt.get(DATA_STATE_KEY) or {}
        if self._setting("init_normalization") == "checkpoint" and "mean" in state and "std" in state:
            self.datamodule.normalizer.mean, self.datamodule.normalizer.std = float(state["mean"]), float(state["std"])
            self.datamodule.stats_restored = True
            norm = f"the checkpoint's (mean {float(state['mean']):.4g}, std {float(state['std']):.4g})"
        else:
            norm = "computed from this run's training data (--init_normalization data)"
        lines = [f"musicvae: starting from the weights of {path} (epoch {self.init_ckpt.get('epoch')}, step "
                 f"{self.init_ckpt.get('global_step')}): {done['loaded']} tensors; a new optimizer, step count 0",
                 f"  mel settings: {self.init_mel}", f"  normalisation: {norm}"]
        if RAW_WEIGHTS_KEY in self.init_ckpt:
            lines.append("  weights: the checkpoint's EMA average (its raw training weights are not used)")
        if done["fresh"]:
            lines.append(f"  new in this model, at their initialisation: {summarise_names(done['fresh'])}")
        if done["ignored"]:
            lines.append(f"  in the checkpoint, not used: {summarise_names(done['ignored'])}")
        rank_zero_info("\n".join(lines))

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

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        lines = [f"  checkpoints: {self.checkpoint_dir}/{{best,last}}.ckpt (and config.yaml)"]
        # logger.log_dir, not trainer.log_dir: the trainer's broadcasts, and other ranks have left.
        log_dir = getattr(trainer.logger, "log_dir", None)
        if log_dir:
            lines.append(f"  TensorBoard logs: {log_dir}  (view: tensorboard --logdir {trainer.logger.save_dir})")
        lines.append(f"  resume: python scripts/train.py --ckpt_path {self.checkpoint_dir / 'last.ckpt'} [--trainer.max_epochs N]")
        rank_zero_info("musicvae: training finished.\n" + "\n".join(lines))

    def _refuse_to_clobber(self) -> None:
        existing = sorted(p.name for p in self.checkpoint_dir.glob("*.ckpt")) if self.checkpoint_dir.is_dir() else []
        if existing and not self._setting("overwrite"):
            raise ConfigError(
                f"{self.checkpoint_dir} already holds {', '.join(existing)} from an earlier run. Resume it with "
                f"--ckpt_path {self.checkpoint_dir / 'last.ckpt'}, choose another --checkpoint_dir, or pass "
                "--overwrite true to start afresh (the old checkpoints are replaced as the new run saves)."
            )
        # Nothing is created here: RunMetadata and the checkpoint callbacks make the folder when they
        # first write into it, and before_instantiate_classes has checked that they can.

    def _refuse_another_runs_folder(self) -> None:
        ckpt_path = _ckpt_path_arg(self.command[1:])
        foreign = foreign_checkpoints(self.checkpoint_dir, self.resume, ckpt_path)
        if foreign and not self._setting("overwrite"):
            raise ConfigError(
                f"{self.checkpoint_dir} holds {', '.join(foreign)} of another run than {ckpt_path}: resuming there "
                "would replace them. Choose another --checkpoint_dir (by default a resume writes beside the checkpoint "
                "it resumes), or pass --overwrite true to replace them.")

    def _check_resume(self) -> None:
        ckpt = self.resume
        problems = unresumable_changes(ckpt, dict(self.model.hparams), self.datamodule.mel.to_dict())
        if problems:
            raise CheckpointError(
                "cannot resume: the checkpoint's weights do not fit the new settings: " + "; ".join(problems)
                + ". Keep these as they were, or start a fresh run without --ckpt_path."
            )
        old = run_config(ckpt)
        if not old:
            return
        defaults = yaml.safe_load(self._parser(self.subcommand).dump(self._parser(self.subcommand).get_defaults(),
                                                                     skip_none=False))
        changes = config_changes(old, yaml.safe_load(self._stored_config()), defaults)
        changes = {key: change for key, change in changes.items() if not key.startswith(NOT_COMPARED)}
        if changes:
            listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
            rank_zero_info(f"musicvae: resuming with changed settings: {listed}")
        monitor = self._setting("monitor")
        touched = [k for k in changes if k.split(".", 1)[-1] in MONITOR_DEPENDS.get(monitor, ()) and k.startswith("model.")]
        if touched or "monitor" in changes:
            rank_zero_warn(
                f"{', '.join(touched) or 'monitor'} changed on resume while best.ckpt is chosen by {monitor}: "
                "best-score comparisons across the change mix two scales (consider --monitor val/mse)."
            )


def appended_keys(args: list[str]) -> list[str]:
    """The settings a command appends to with `--KEY+=VALUE` (or `--KEY+ VALUE`), in order of first use."""
    keys: list[str] = []
    for arg in args:
        match = re.match(r"--([\w.]+)\+(=|$)", arg)
        if match and match.group(1) not in keys:
            keys.append(match.group(1))
    return keys


def restart_appended_lists(args: list[str], parser: LightningArgumentParser) -> list[str]:
    """A resumed command's `+=` appends to the list the command itself builds, not to the stored one.

    `args` is `[subcommand, "--config", STORED_RUN_CONFIG, *the user's arguments]` (cli_main).
    Appending to the stored list would make "the same command again, with --ckpt_path" add every
    callback, logger, plugin, band or channel a second time (Lightning then refuses two stateful
    callbacks of one type). So each list a `+=` touches restarts from its default right after
    the stored config: the user's own config files and flags then build it exactly as the first
    run did, and the result replaces the stored list.
    """
    keys = appended_keys(args[3:])
    if not keys:
        return args
    defaults = parser.get_defaults()
    restarts = []
    for key in keys:
        if key not in defaults:
            continue  # not a setting: the parser's own message names it
        value = defaults.get(key)
        plain = value.as_dict() if isinstance(value, Namespace) else value
        if isinstance(plain, list):
            plain = [v.as_dict() if isinstance(v, Namespace) else v for v in plain]
        restarts.append(f"--{key}={json.dumps(plain)}")
    return [*args[:3], *restarts, *args[3:]]


def repin_loggers(loggers: Any, stored: Any) -> None:
    """Continue the stored run's pinned logger versions on the same loggers of this run, in place.

    Loggers pair up by class, in order; a pair is the same logger when this run's folder (the user's,
    or the default) and name resolve to the stored ones. Only then is the stored version taken, and
    only a plain one (a number or one folder name): the stored folder itself never chooses a place.
    """
    new = loggers if isinstance(loggers, list) else [loggers]
    old = [e for e in (stored if isinstance(stored, list) else [stored]) if isinstance(e, dict)]
    for entry in new:
        if not isinstance(entry, Namespace) or not isinstance(entry.get("init_args"), Namespace):
            continue
        match = next((o for o in old if o.get("class_path") == entry.class_path), None)
        if match is None:
            continue
        old.remove(match)
        pinned, args = match.get("init_args") or {}, entry.init_args
        version = pinned_version(match)
        if version is None or args.get("version") is not None or not args.get("save_dir"):
            continue
        if str(Path(args.save_dir).expanduser().resolve()) == pinned.get("save_dir") and args.get("name") == pinned.get("name"):
            args.save_dir, args.version = pinned["save_dir"], version


def resume_command(command: list[str], last: Path) -> str:
    """The user's own command line with `--ckpt_path LAST` in place of any it had: the same command
    resumes the run (a `+=` in it appends to the command's own list: restart_appended_lists)."""
    args, skip = [], False
    for arg in command[1:]:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            args.append(arg)
    program = command[0] if command else "python scripts/train.py"
    return f"{program} {shlex.join([*args, '--ckpt_path', str(last)])}"


def check_manual_optimization(trainer_config: dict) -> None:
    """Trainer settings Lightning refuses (or ignores) under manual optimization, as one clear line."""
    if trainer_config.get("gradient_clip_val"):
        raise ConfigError(
            f"--trainer.gradient_clip_val {trainer_config['gradient_clip_val']}: the adversarial stage steps two "
            "optimizers itself (manual optimization), where Lightning cannot clip; set --trainer.gradient_clip_val "
            "null and use --model.adv_grad_clip (configs/sharp.yaml does both)")
    if (trainer_config.get("accumulate_grad_batches") or 1) > 1:
        raise ConfigError(
            "--trainer.accumulate_grad_batches: not available in the adversarial stage (manual optimization); "
            "use a larger --data.batch_size")


def adopt_mel_settings(config: Any, ckpt: dict) -> str:
    """With --model.init_from and no --data.mel given, the checkpoint's mel settings (its weights were
    trained on them); returns which settings the run uses, in words."""
    stored = (ckpt.get(DATA_STATE_KEY) or {}).get("mel")
    if stored is None:
        return "this run's (the checkpoint stores none)"
    check_mel_bounds(stored, config.model.init_from)
    if config.data.mel is None:
        config.data.mel = Namespace(**stored)
        return "the checkpoint's (" + ", ".join(f"{k} {v}" for k, v in stored.items()) + ")"
    given = config.data.mel.as_dict() if hasattr(config.data.mel, "as_dict") else dict(config.data.mel)
    differ = {k: (stored.get(k), v) for k, v in given.items() if stored.get(k) != v}
    if not differ:
        return "as configured, the same as the checkpoint's"
    return "as configured (--data.mel), which differ from the checkpoint's: " + ", ".join(
        f"{k} {a!r} -> {b!r}" for k, (a, b) in differ.items())


def summarise_names(names: list[str], shown: int = 4) -> str:
    """Tensor names, grouped by their first two components: ``discriminator.blocks (12 tensors)``."""
    groups: dict[str, int] = {}
    for name in names:
        key = ".".join(name.split(".")[:2])
        groups[key] = groups.get(key, 0) + 1
    parts = [f"{key} ({n} tensor{'s' if n > 1 else ''})" for key, n in list(groups.items())[:shown]]
    return ", ".join(parts) + (f", ... {len(groups) - shown} more" if len(groups) > shown else "")


def _stored_run_config_instead(self: LightningCLI) -> None:
    # Replaced by the stored run config injected under the command line (see cli_main).
    return None


setattr(MusicVAECLI, CLI_CKPT_HOOK, _stored_run_config_instead)


def _flag_value(args: list[str], flag: str = "--ckpt_path") -> Optional[str]:
    """The last value of `flag` on the command line (`--flag VALUE` or `--flag=VALUE`), or None."""
    found = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(flag + "="):
            found = arg.split("=", 1)[1]
    return found


def user_set_keys(args: list[str]) -> set[str]:
    """The dotted settings the user's own flags and `--config` files set (`trainer.callbacks`, ...).

    A file that cannot be read is skipped here: the parser reads it next and names the problem.
    """
    keys: set[str] = set()
    for i, arg in enumerate(args):
        match = re.match(r"--([\w.]+?)\+?(=|$)", arg) or re.match(r"-(c)(=|$)", arg)
        if not match:
            continue
        if match.group(1) not in ("config", "c"):
            keys.add(match.group(1))
            continue
        value = arg.split("=", 1)[1] if "=" in arg else args[i + 1] if i + 1 < len(args) else None
        try:
            text = Path(value).read_text() if value and Path(value).is_file() else value
            keys.update(flatten_keys(safe_yaml_load(text or "", str(value))))
        except (OSError, MusicVAEError, yaml.YAMLError):
            continue
    return keys


def flatten_keys(config: Any, prefix: str = "") -> list[str]:
    """{"trainer": {"logger": {...}}} -> ["trainer", "trainer.logger", "trainer.logger.class_path", ...]."""
    if not isinstance(config, dict):
        return []
    keys = []
    for key, value in config.items():
        keys += [f"{prefix}{key}", *flatten_keys(value, f"{prefix}{key}.")]
    return keys


def _ckpt_path_arg(args: list[str]) -> Optional[str]:
    return _flag_value(args, "--ckpt_path")


def with_default_subcommand(args: list[str]) -> list[str]:
    """No arguments means `fit --config configs/quickstart.yaml`; no subcommand means `fit`."""
    if not args or args == ["fit"]:  # bare `musicvae fit` / `python scripts/train.py`: the quickstart
        return ["fit", "--config", str(DEFAULT_CONFIG)]
    if args[0] in SUBCOMMANDS:
        return args
    return ["fit", *args]


def cli_main(args: Optional[list[str]] = None, run: bool = True, program: str = "python scripts/train.py",
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
    resume = None
    taken = None
    ckpt_path = _ckpt_path_arg(args)
    if ckpt_path and run and args[0] in SUBCOMMANDS:
        resume = load_checkpoint(ckpt_path)
        stored = run_config(resume) or config_from_hyperparameters(resume)
        # The stored run is the base and everything on the command line overrides it, but it is data:
        # only plain settings and allowlisted classes are taken, never a place to write (stored_config.py).
        taken = config_as_data(stored, ckpt_path, args[0], user_set_keys(args[1:]))
        args = [args[0], "--config", dump_yaml(taken.config), *args[1:]]
    init = None
    init_path = _flag_value(args, "--model.init_from")
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
        MusicVAEModule,
        MelDataModule,
        args=args,
        run=run,
        resume=resume,
        init=init,
        taken=taken,
        command=command,
        handle_interrupt=handle_interrupt,
        seed_everything_default=0,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=SaveConfigToLogDir,
        save_config_kwargs={"overwrite": True},
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
    except NonFiniteError as err:
        sys.stderr.write(f"musicvae: error: {err}\n")
        return NONFINITE_EXIT
    except StorageError as err:
        sys.stderr.write(f"musicvae: error: {err}\n")
        return STORAGE_EXIT
    except PeerLostError as err:
        report(str(err))  # once: PeerWatch may have seen the same death
        return PEER_LOST_EXIT
    except MusicVAEError as err:
        sys.stderr.write(f"musicvae: error: {err}\n")
        return 2
    return 0


def main() -> None:
    """`python scripts/train.py ...`: without a subcommand it is `fit`."""
    raise SystemExit(subcommand_main())
