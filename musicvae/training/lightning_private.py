"""Every private Lightning API musicvae relies on, in one place.

Lightning offers no public way to do these three things. Each name is checked by
tests/training/test_lightning_private.py, so a Lightning release that renames or removes one
fails that test loudly instead of silently turning the workaround off.
"""

from __future__ import annotations

import lightning as L

#: LightningCLI's hook that merges a checkpoint's hyper-parameters over the command line (2.6):
#: the CLI replaces it, because it would silently ignore a new `--model.lr` on resume.
CLI_CKPT_HOOK = "_parse_ckpt_path"

#: ModelCheckpoint's name-mangled warning about a non-empty folder, which fires on every resume;
#: the CLI refuses a fresh run into a used folder itself, so the warning is only noise here.
CHECKPOINT_DIR_WARNING = "_ModelCheckpoint__warn_if_dir_not_empty"


def request_graceful_stop(trainer: L.Trainer) -> None:
    """Stop every rank after the current step as Lightning stops on SIGTERM, without running
    Lightning's signal handler (whose collective deadlocks DDP ranks; musicvae.training.guards)."""
    trainer._signal_connector.received_sigterm = True
