"""The private Lightning APIs musicvae relies on (musicvae/training/lightning_private.py) still exist.

If one of these fails after a Lightning upgrade, the workaround that uses it has silently
stopped working: find the new name (or a public API) before releasing.
"""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.cli import LightningCLI

from musicvae.training import lightning_private as private
from musicvae.training.callbacks import FixedNameCheckpoint
from musicvae.training.cli import MusicVAECLI


def test_lightning_cli_still_has_the_checkpoint_hparams_hook_we_replace():
    assert callable(getattr(LightningCLI, private.CLI_CKPT_HOOK, None))
    assert getattr(MusicVAECLI, private.CLI_CKPT_HOOK) is not getattr(LightningCLI, private.CLI_CKPT_HOOK)


def test_model_checkpoint_still_has_the_dir_warning_we_silence():
    assert callable(getattr(ModelCheckpoint, private.CHECKPOINT_DIR_WARNING, None))
    assert getattr(FixedNameCheckpoint, private.CHECKPOINT_DIR_WARNING) is not getattr(
        ModelCheckpoint, private.CHECKPOINT_DIR_WARNING)


def test_weight_averaging_still_keeps_its_average_where_our_ema_swaps_it():
    from torch.optim.swa_utils import AveragedModel

    from musicvae.training.ema import EMA

    ema = EMA(0.9)
    assert hasattr(ema, private.EMA_AVERAGE) and ema.average is None
    ema.setup(L.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False), BoringModel(), "fit")
    assert isinstance(ema.average, AveragedModel)


class _StopAtStep(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            private.request_graceful_stop(trainer)


def test_trainer_still_stops_after_the_step_when_asked():
    trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[_StopAtStep()], accelerator="cpu")
    with pytest.raises(SIGTERMException):
        trainer.fit(BoringModel())
    assert trainer.global_step == 2


def test_lightnings_launcher_still_starts_its_observer_through_the_name_we_replace():
    import inspect

    from lightning.pytorch.strategies.launchers import subprocess_script

    original = getattr(subprocess_script, private.LAUNCH_OBSERVER)
    assert f"{private.LAUNCH_OBSERVER}(self.procs)" in inspect.getsource(subprocess_script._SubprocessScriptLauncher.launch)
    seen = []
    with private.observe_launched_processes(seen.append):
        getattr(subprocess_script, private.LAUNCH_OBSERVER)(["child"])
    assert seen == [["child"]] and getattr(subprocess_script, private.LAUNCH_OBSERVER) is original


def test_ddp_still_opens_its_process_group_with_the_timeout_we_set():
    import inspect
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = DDPStrategy()
    assert private.set_process_group_timeout(strategy, 42)
    assert strategy._timeout == timedelta(seconds=42)
    assert '{"timeout": self._timeout}' in inspect.getsource(DDPStrategy.setup_distributed)
    assert not private.set_process_group_timeout(SingleDeviceStrategy("cpu"), 42)


def test_lightning_cli_still_has_the_helpers_the_cli_calls_and_the_method_it_overrides():
    for name in (private.CLI_GET, private.CLI_PARSER, private.CLI_INSTANTIATE_TRAINER, private.CLI_RUN_SUBCOMMAND):
        assert callable(getattr(LightningCLI, name, None)), name
    assert MusicVAECLI._run_subcommand is not LightningCLI._run_subcommand
    assert private.CLI_RUN_SUBCOMMAND == "_run_subcommand"  # the override's own name


def test_a_lightning_module_still_keeps_its_trainer_or_none_under_the_private_name():
    module = BoringModel()
    assert getattr(module, private.MODULE_TRAINER) is None
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)
    assert getattr(module, private.MODULE_TRAINER) is trainer
