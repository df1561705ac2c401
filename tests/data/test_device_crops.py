"""--data.device_cache (musicvae/data/device_crops.py): the device path gives the loader path's batches,
bitwise on a CPU, with and without augmentation, and the same weights after training."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import tiny_fit_args, write_mel_folder
from helpers import assert_same_weights, fit_args, signal_probe, step_of, train, train_in_child
from musicvae.data.augment import AugmentSettings
from musicvae.training.cli import cli_main
from musicvae.data.datamodule import MelDataModule
from musicvae.data.device_crops import CropPlan
from musicvae.errors import ConfigError
from musicvae.data.segments import SegmentDataset

ALL_ON = AugmentSettings(gain_db=6.0, freq_shift=2, mix_prob=0.5, mix_gain_db=6.0)
AUGMENT_FLAGS = ["--data.augment.gain_db", "3", "--data.augment.freq_shift", "1", "--data.augment.mix_prob", "0.5"]

#: test_reliability's uninterrupted loader-path run, the reference of the kill-and-resume test below.


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)  # torch.equal calls -0.0 and +0.0 equal; bits do not


def noisy_mel_folder(folder, n_files: int = 8, frames: int = 80) -> None:
    """write_mel_folder's files with noise in every bin: the structured arrays' many equal floor
    values would hide a last-bit difference in the mix's exp/log."""
    for i, path in enumerate(write_mel_folder(folder, n_files=n_files, frames=frames)):
        np.save(path, np.random.default_rng(i).normal(-4.0, 3.0, (16, frames)).astype(np.float32))


def data_module(folder, augment, device_cache: bool, **kw) -> MelDataModule:
    # 13 frames x 16 mels = 208 values per crop: not a multiple of the CPU's vector width, so
    # vectorised and scalar math both occur, at positions that depend on the tensor's length.
    dm = MelDataModule(data_dir=str(folder), cache_dir=str(folder.parent / "cache"), frames=13, batch_size=5,
                       val_split=0.25, augment=augment, device_cache=device_cache, **kw)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("n_files", [8, 2])  # a split by file, and by segment (only the head of each file cached)
@pytest.mark.parametrize("augment", [None, ALL_ON], ids=["plain", "augmented"])
def test_device_batches_are_the_loader_batches_bitwise(tmp_path, n_files, augment):
    noisy_mel_folder(tmp_path / "mels", n_files=n_files)
    loader_dm = data_module(tmp_path / "mels", augment, False)
    device_dm = data_module(tmp_path / "mels", augment, True)
    for dm in (loader_dm, device_dm):  # statistics as a checkpoint would restore them
        dm.normalizer.mean, dm.normalizer.std = -3.1, 2.7
    for epoch in (0, 1):
        expected, plans = loader_dm.train_dataloader(), device_dm.train_dataloader()
        expected.sampler.set_epoch(epoch)
        plans.sampler.set_epoch(epoch)
        count = 0
        for want, plan in zip(expected, plans, strict=True):
            got = device_dm.on_after_batch_transfer(plan, 0)
            assert got.shape == want.shape and torch.equal(bits(got), bits(want))
            count += 1
        assert count == len(expected) > 1
    if augment is not None:  # the augmented path was taken: mixes, shifts and gains happened
        plan = next(iter(device_dm.train_dataloader()))
        assert plan["mix"].any() and (plan["shift"] != 0).any() and (plan["gain_db"] != 0).all()


def test_batched_mix_is_close_to_the_exact_one(tmp_path):
    """The GPU's batched mix (one logaddexp per batch), checked on the CPU against the exact one."""
    noisy_mel_folder(tmp_path / "mels")
    dm = data_module(tmp_path / "mels", AugmentSettings(mix_prob=1.0), True)
    plan = next(iter(dm.train_dataloader()))
    exact, batched = dm.device_crops.batch(plan, exact_mix=True), dm.device_crops.batch(plan, exact_mix=False)
    assert torch.allclose(exact, batched, rtol=0, atol=1e-5)


def test_device_path_resumes_mid_epoch(tmp_path):
    noisy_mel_folder(tmp_path / "mels")
    # No workers: persistent workers left to the garbage collector stall later tests in this
    # process; the script test below trains with workers, in its own process.
    dm = data_module(tmp_path / "mels", ALL_ON, True)
    loader = dm.train_dataloader()
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    rest = [dm.device_crops.batch(plan) for plan in iterator]
    resumed = data_module(tmp_path / "mels", ALL_ON, True).train_dataloader()
    resumed.load_state_dict(state)
    again = [dm.device_crops.batch(plan) for plan in resumed]
    assert len(again) == len(rest) > 0 and all(torch.equal(a, b) for a, b in zip(again, rest))


def test_cache_that_would_not_fit_is_refused_before_reading(tmp_path, monkeypatch):
    noisy_mel_folder(tmp_path / "mels")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 8 * 2**30))
    dm = MelDataModule(data_dir=str(tmp_path / "mels"), cache_dir=str(tmp_path / "cache"), frames=13,
                       batch_size=5, device_cache=True)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    with pytest.raises(ConfigError, match=r"data\.device_cache=true: the training log-mels need 0\.00 GiB on cuda:0, "
                                          r"more than 75% of its 0\.00 GiB free \(of 8\.00 GiB"):
        dm.setup("fit")
    assert dm.device_crops is None


def test_training_with_and_without_device_cache_gives_the_same_weights(tmp_path):
    """Through the real CLI: same seed, augmentation on, 6 steps, one validation: identical weights."""
    runs = {}
    for flag in ("false", "true"):
        root = tmp_path / flag
        args = tiny_fit_args(root, *AUGMENT_FLAGS, "--data.device_cache", flag, "--trainer.max_steps", "6",
                             "--trainer.max_epochs", "1")
        args[args.index(str(root / "cache"))] = str(tmp_path / "cache")  # one synthetic collection for both
        runs[flag] = cli_main(args)
    assert isinstance(runs["true"].trainer.train_dataloader.dataset, CropPlan)  # trained on the device path
    assert isinstance(runs["false"].trainer.train_dataloader.dataset, SegmentDataset)
    assert runs["true"].datamodule.device_crops is None  # the device's copy is freed after fit
    assert runs["true"].trainer.global_step == runs["false"].trainer.global_step == 6
    a, b = runs["false"].model.state_dict(), runs["true"].model.state_dict()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
def test_train_script_with_device_cache_exits_0(tmp_path):
    # Two workers: the crop plans are made in worker processes, as a GPU run would.
    done = train(tiny_fit_args(tmp_path, "--data.device_cache", "true", "--data.num_workers", "2", *AUGMENT_FLAGS,
                               "--trainer.max_epochs", "1"))
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["datamodule_hyper_parameters"]["device_cache"] is True


@pytest.mark.slow
def test_device_path_killed_and_resumed_matches_the_uninterrupted_loader_run(tmp_path, straight):
    """test_reliability's exact-resume run (dropout, 2 workers, step checkpoints), killed mid-epoch
    on the device path and resumed: the weights of the loader path's uninterrupted run."""
    result = train_in_child(fit_args(tmp_path, straight["cache"], "--data.device_cache", "true", *signal_probe(7, "SIGKILL")))
    assert result.returncode == -signal.SIGKILL
    last = tmp_path / "ckpt" / "last.ckpt"
    assert step_of(last) == 4
    resumed = train(["fit", "--ckpt_path", str(last), "--trainer.callbacks", "[]"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert step_of(last) == 16
    assert_same_weights(last, straight["last"])
