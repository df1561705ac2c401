"""Every private Lightning API musicvae relies on, in one place.

Lightning offers no public way to do these things. Each name is checked by
tests/training/test_lightning_private.py, so a Lightning release that renames or removes one
fails that test loudly instead of silently turning the workaround off.
"""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator

import lightning as L
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import subprocess_script

#: The function Lightning's one-machine launcher calls with the processes it started (ranks 1 to
#: N-1); it starts an observer that SIGKILLs the launching process when any of them exits non-zero.
LAUNCH_OBSERVER = "_launch_process_observer"

#: LightningCLI's hook that merges a checkpoint's hyper-parameters over the command line (2.6):
#: the CLI replaces it, because it would silently ignore a new `--model.lr` on resume.
CLI_CKPT_HOOK = "_parse_ckpt_path"

#: LightningCLI's helpers the CLI calls: a setting inside the subcommand's config, the subcommand's
#: parser, and the Trainer built from a config plus extra callbacks.
CLI_GET = "_get"
CLI_PARSER = "_parser"
CLI_INSTANTIATE_TRAINER = "_instantiate_trainer"
#: LightningCLI's method that runs a subcommand with its before_/after_ hooks; MusicVAECLI overrides it
#: to hold the run lock and the peer watch around the whole subcommand.
CLI_RUN_SUBCOMMAND = "_run_subcommand"
#: A LightningModule's trainer or None; its public `trainer` property raises when none is attached.
MODULE_TRAINER = "_trainer"

#: WeightAveraging's averaged copy of the module (a torch AveragedModel, None outside fit): musicvae's EMA
#: swaps its parameters in and out of the module itself, around the module's whole validation.
EMA_AVERAGE = "_average_model"

#: ModelCheckpoint's name-mangled warning about a non-empty folder, which fires on every resume;
#: the CLI refuses a fresh run into a used folder itself, so the warning is only noise here.
CHECKPOINT_DIR_WARNING = "_ModelCheckpoint__warn_if_dir_not_empty"


def request_graceful_stop(trainer: L.Trainer) -> None:
    """Stop every rank after the current step as Lightning stops on SIGTERM, without running
    Lightning's signal handler (whose collective deadlocks DDP ranks; musicvae.training.guards)."""
    trainer._signal_connector.received_sigterm = True


@contextmanager
def observe_launched_processes(observe: Callable[[list[subprocess.Popen]], None]) -> Iterator[None]:
    """While inside, Lightning's launcher hands the processes it starts to `observe` instead of starting
    its own observer (musicvae.training.peers.PeerWatch, which reports before it stops anything)."""
    original = getattr(subprocess_script, LAUNCH_OBSERVER)
    setattr(subprocess_script, LAUNCH_OBSERVER, observe)
    try:
        yield
    finally:
        setattr(subprocess_script, LAUNCH_OBSERVER, original)


def set_process_group_timeout(strategy: object, seconds: float) -> bool:
    """Give a DDP strategy's process group this timeout (every collective, NCCL's included), whichever
    way the strategy was named (`ddp`, `auto` on several devices, a class path); False if it is not
    DDP. Public only as DDPStrategy's constructor argument, which the `ddp` strategy names never reach."""
    if not isinstance(strategy, DDPStrategy):
        return False
    strategy._timeout = timedelta(seconds=seconds)
    return True
