"""EMA of the weights (--model.ema_decay, musicvae/training/ema.py): what validation, the media,
the checkpoints and the loaders see; refusals; and an exact resume with EMA and a schedule on."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from conftest import tiny_fit_args
from helpers import EXACT_FLAGS, signal_probe, step_of, train, train_in_child
from musicvae.errors import CheckpointError, ConfigError
from musicvae.training.cli import cli_main

pytestmark = pytest.mark.slow

EMA_FLAGS = ["--model.ema_decay", "0.8", "--model.lr", "3e-3"]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ema")
    probe = root / "media.pt"
    cli_main(tiny_fit_args(root, *EMA_FLAGS, "--trainer.max_epochs", "3",
                           "--trainer.callbacks+=probes.MediaWeights", "--trainer.callbacks.out", str(probe)))
    return {"root": root, "media": torch.load(probe, weights_only=True),
            "best": torch.load(root / "ckpt" / "best.ckpt", weights_only=True)}


def test_media_and_best_ckpt_describe_the_same_averaged_weights(ema_run):
    best, media = ema_run["best"], ema_run["media"]
    seen = media[best["global_step"]]["state"]  # what MediaLogger drew at best.ckpt's validation
    assert seen.keys() == best["state_dict"].keys()
    different = [k for k in seen if not torch.equal(seen[k], best["state_dict"][k])]
    assert not different, different[:5]
    # ... the average, not the raw training weights (both are in the checkpoint), and the curve fitted on it.
    raw = best["current_model_state"]
    assert any(not torch.equal(raw[k], best["state_dict"][k]) for k in raw if k.startswith("vae."))
    assert bool(best["state_dict"]["gain_fitted"]) and torch.equal(raw["output_gain"], best["state_dict"]["output_gain"])
    assert int(best["averaging_state"]["n_averaged"]) == best["global_step"]  # one update per optimizer step


def test_loaders_use_the_average(ema_run):
    from musicvae.inference.generation import load_generation_model

    model = load_generation_model(ema_run["root"] / "ckpt" / "best.ckpt")
    state = model.module.state_dict()
    assert all(torch.equal(state[k], ema_run["best"]["state_dict"][k]) for k in state)
    inputs = ema_run["media"][ema_run["best"]["global_step"]]["inputs"]
    outputs = ema_run["media"][ema_run["best"]["global_step"]]["outputs"]
    torch.testing.assert_close(model.module.reconstruct(inputs), outputs)


def test_removing_ema_on_resume_is_refused_and_adding_it_is_named(ema_run, tmp_path, caplog):
    with pytest.raises(CheckpointError, match="model.ema_decay: checkpoint 0.8, now None .*--model.init_from"):
        cli_main(["fit", "--ckpt_path", str(ema_run["root"] / "ckpt" / "last.ckpt"), "--model.ema_decay", "null",
                  "--trainer.callbacks", "[]"])
    plain = tmp_path / "plain"
    cli_main(tiny_fit_args(plain, "--trainer.max_epochs", "1"))
    with caplog.at_level("INFO"):
        cli = cli_main(["fit", "--ckpt_path", str(plain / "ckpt" / "last.ckpt"), "--model.ema_decay", "0.9",
                        "--trainer.max_epochs", "2"])
    assert "EMA starts at this resume" in caplog.text
    assert "current_model_state" in torch.load(plain / "ckpt" / "last.ckpt", weights_only=True)
    assert cli.trainer.current_epoch == 2


def test_lightnings_own_weight_averaging_callback_is_refused_with_the_flag_to_use(tmp_path):
    with pytest.raises(ConfigError, match="use --model.ema_decay"):
        cli_main(tiny_fit_args(tmp_path, "--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging"))
    assert not (tmp_path / "ckpt").exists()


def test_resume_with_ema_and_a_cosine_schedule_is_bitwise_exact(tmp_path):
    extra = [*EMA_FLAGS, "--model.lr_schedule", "cosine", "--model.warmup_steps", "3"]
    straight = tmp_path / "straight"
    assert train(tiny_fit_args(straight, *EXACT_FLAGS, *extra)).returncode == 0
    killed = tmp_path / "killed"
    args = [a if a != str(killed / "cache") else str(straight / "cache") for a in tiny_fit_args(killed, *EXACT_FLAGS, *extra)]
    result = train_in_child([*args, *signal_probe(14, "SIGKILL")])  # mid-epoch 1, after a validation with the swap
    assert result.returncode == -signal.SIGKILL
    last = killed / "ckpt" / "last.ckpt"
    assert step_of(last) == 12
    resumed = train(["fit", "--ckpt_path", str(last), "--trainer.callbacks", "[]"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(last, weights_only=True)
    b = torch.load(straight / "ckpt" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 16
    for key in ("state_dict", "current_model_state", "averaging_state"):
        different = [k for k in b[key] if not torch.equal(a[key][k], b[key][k])]
        assert not different, (key, different[:3])
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_evaluate_scores_either_weight_set_and_names_it(ema_run, tmp_path, capsys):
    from conftest import load_script

    evaluate = load_script("evaluate")
    ckpt = str(ema_run["root"] / "ckpt" / "best.ckpt")
    mse = {}
    for weights in ("average", "raw"):
        assert evaluate.main(["--ckpt_path", ckpt, "--out", str(tmp_path / weights), "--weights", weights,
                              "--alpha", "0"]) == 0
        report = (tmp_path / weights / "report.md").read_text()
        assert ("weights: the raw training weights" in report) == (weights == "raw")
        mse[weights] = json.loads((tmp_path / weights / "metrics.json").read_text())["metrics"]["mse"]
    assert mse["average"] != mse["raw"]
    assert evaluate.main(["--ckpt_path", ckpt, "--out", str(tmp_path / "x"), "--weights", "mean"]) == 2
    assert "--weights 'mean'" in capsys.readouterr().err


def test_raw_weights_of_a_checkpoint_without_ema_are_refused(tiny_run, tmp_path):
    from musicvae.inference.loading import load_module

    with pytest.raises(CheckpointError, match="trained without --model.ema_decay"):
        load_module(tiny_run["ckpt_dir"] / "best.ckpt", weights="raw")



@pytest.mark.parametrize("ema_first", [True, False], ids=["ema-before-the-callback", "ema-after-the-callback"])
def test_every_validation_hook_sees_the_average_whatever_the_callback_order(ema_first):
    """The average is entered at the module's on_validation_model_eval and left at on_validation_model_train,
    so a callback sees it at every validation hook (and a checkpoint written there holds it), placed before or
    after the EMA callback; a submodule in eval mode stays in eval after validation."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    from musicvae.training.ema import EMA
    from musicvae.training.module import MusicVAEModule

    class Seen(Callback):
        def __init__(self):
            self.validation, self.training = [], []

        def _record(self, trainer, where):
            self.validation.append((where, ema.entered))

        def on_validation_epoch_start(self, trainer, pl_module):
            self._record(trainer, "epoch_start")

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self._record(trainer, "batch_end")

        def on_validation_epoch_end(self, trainer, pl_module):
            self._record(trainer, "epoch_end")

        def on_validation_end(self, trainer, pl_module):
            self._record(trainer, "end")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.training.append(ema.entered)

    torch.manual_seed(0)
    module = MusicVAEModule(n_mels=16, frames=16, latent_dim=4, channels=[4, 8], lr=1e-2, ema_decay=0.5)
    frozen = module.vae.to_latent.eval()
    ema, seen = EMA(0.5), Seen()
    data = DataLoader(torch.randn(16, 1, 16, 16), batch_size=8)
    trainer = L.Trainer(max_epochs=2, callbacks=[ema, seen] if ema_first else [seen, ema], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(module, data, data)
    assert seen.validation and all(entered for _, entered in seen.validation), seen.validation
    assert {where for where, _ in seen.validation} == {"epoch_start", "batch_end", "epoch_end", "end"}
    assert seen.training and not any(seen.training)  # training continues from the raw weights
    assert not frozen.training and module.vae.training
