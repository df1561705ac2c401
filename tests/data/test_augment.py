"""Training-time augmentation: the pure transforms, their determinism, and the data module wiring."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_mel_folder
from musicvae.data.augment import (
    AugmentDraw,
    AugmentSettings,
    apply_gain,
    augment_raw,
    db_to_log,
    draw_augmentation,
    mix_power,
    shift_mel_bins,
)
from musicvae.data.datamodule import MelDataModule
from musicvae.errors import ConfigError
from musicvae.data.sampling import DRAW_RANGE
from musicvae.data.segments import Normalizer, SegmentDataset
from helpers import assert_same_weights, fit_args, signal_probe, step_of, train, train_in_child

ALL_ON = AugmentSettings(gain_db=6.0, freq_shift=2, mix_prob=0.5, mix_gain_db=6.0)
AUGMENT_FLAGS = ["--data.augment.gain_db", "3", "--data.augment.freq_shift", "1", "--data.augment.mix_prob", "0.5"]
FRAMES = 16


def make_set(folder: Path, augment: AugmentSettings | None, normalizer: Normalizer | None = None) -> SegmentDataset:
    """A training set over 8 files of 64 frames, 4 windows each; identity normalisation by default."""
    paths = sorted(str(p) for p in folder.glob("*.npy"))
    items = [(f, start, 0, 64) for f in range(len(paths)) for start in (0, 16, 32, 48)]
    return SegmentDataset(paths, np.array(items), FRAMES, 16, normalizer or Normalizer(), True, augment=augment)


# --- the pure transforms ---------------------------------------------------------------------------


def test_gain_is_one_offset_in_natural_log_power():
    raw = torch.randn(1, 16, 8) * 3 - 4
    # 10 dB is a factor 10 in power: exactly ln(10) on log-power values, half that on log-magnitude.
    assert torch.allclose(apply_gain(raw, 10.0) - raw, torch.full_like(raw, math.log(10.0)), atol=1e-5)
    assert torch.allclose(apply_gain(raw, -6.0, power=1.0) - raw, torch.full_like(raw, -0.3 * math.log(10.0)), atol=1e-5)
    assert db_to_log(3.0) == pytest.approx(0.690776, abs=1e-6)


def test_dataset_gain_moves_every_normalised_value_by_the_same_amount(mel_folder):
    settings = AugmentSettings(gain_db=6.0)
    std = 2.5
    plain = make_set(mel_folder, None, Normalizer(mean=-3.0, std=std))
    augmented = make_set(mel_folder, settings, Normalizer(mean=-3.0, std=std))
    for index, draw in [(0, 11), (5, 123456), (17, DRAW_RANGE - 1)]:
        gain_db = draw_augmentation(settings, draw, index, len(augmented)).gain_db
        assert gain_db != 0.0 and abs(gain_db) <= 6.0
        diff = augmented[(index, draw)] - plain[(index, draw)]
        expected = gain_db * math.log(10.0) / 10.0 / std  # dB -> natural-log power -> z-score units
        assert torch.allclose(diff, torch.full_like(diff, expected), atol=1e-5)


def test_freq_shift_moves_a_peak_and_repeats_the_edge_bin():
    peak = torch.zeros(1, 8, 3)
    peak[:, 3] = 1.0
    for k in (-3, -1, 1, 2, 4):
        moved = shift_mel_bins(peak, k)
        assert moved.shape == peak.shape
        assert torch.equal(moved[0, :, 0].nonzero().flatten(), torch.tensor([3 + k]))
    ramp = torch.arange(8.0).view(1, 8, 1).expand(1, 8, 3)
    assert shift_mel_bins(ramp, 2)[0, :, 0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5]
    assert shift_mel_bins(ramp, -3)[0, :, 1].tolist() == [3, 4, 5, 6, 7, 7, 7, 7]
    assert shift_mel_bins(ramp, 0) is ramp


def test_mix_adds_powers_stably():
    a, b = torch.randn(16, 8) * 4, torch.randn(16, 8) * 4
    assert torch.equal(mix_power(a, b, 0.0), torch.logaddexp(a, b))  # g = 0 dB: exactly log(e^a + e^b)
    assert torch.allclose(mix_power(torch.zeros(2), torch.zeros(2)), torch.full((2,), math.log(2.0)))
    quieter = mix_power(a, b, -6.0)
    assert (quieter >= a).all() and (quieter >= torch.maximum(a, b + db_to_log(-6.0))).all()
    assert (quieter <= mix_power(a, b, 0.0)).all()
    # Log-magnitude mels (power 1) mix as powers too: 0.5 * log(|a|^2 + |b|^2).
    expected = 0.5 * torch.log(torch.exp(2 * a.double()) + torch.exp(2 * b.double()))
    assert torch.allclose(mix_power(a, b, 0.0, power=1.0).double(), expected, atol=1e-5)
    loud = mix_power(torch.full((3,), 500.0), torch.full((3,), 499.0))  # e^500 overflows float32
    assert torch.isfinite(loud).all() and (loud > 500.0).all()


def test_default_settings_change_nothing_bitwise(mel_folder):
    assert not AugmentSettings().active
    aug = draw_augmentation(AugmentSettings(), 987654, 3, 32)
    assert (aug.gain_db, aug.shift, aug.mix_with) == (0.0, 0, None)
    raw = torch.randn(1, 16, 8)
    assert torch.equal(augment_raw(raw, aug), raw) and torch.equal(augment_raw(raw, AugmentDraw()), raw)
    plain, default = make_set(mel_folder, None, Normalizer(1.0, 2.0)), make_set(mel_folder, AugmentSettings(), Normalizer(1.0, 2.0))
    for item in [(0, 5), (9, 77777), (31, 2**30)]:
        assert torch.equal(plain[item], default[item])


def test_each_draw_is_independent_of_the_other_settings():
    for draw in (1, 2, 3, 10**9):
        alone = draw_augmentation(AugmentSettings(gain_db=3.0), draw, 0, 10)
        together = draw_augmentation(AugmentSettings(gain_db=3.0, freq_shift=2, mix_prob=1.0), draw, 0, 10)
        assert alone.gain_db == together.gain_db
        assert together.mix_with is not None and together.mix_with[0] != 0  # another item


# --- determinism and the dataset ---------------------------------------------------------------------


def test_same_index_and_draw_give_the_same_tensor_anywhere(mel_folder):
    first = make_set(mel_folder, ALL_ON)
    second = pickle.loads(pickle.dumps(make_set(mel_folder, ALL_ON)))  # as a DataLoader worker receives it
    before = torch.get_rng_state()
    items = [(i, int(d)) for i, d in zip(range(32), np.random.default_rng(0).integers(0, DRAW_RANGE, 32))]
    results = [first[item] for item in items]
    assert torch.equal(torch.get_rng_state(), before)  # no global generator is drawn from
    for item, result in zip(items, results):
        assert torch.equal(result, second[item])
    assert not torch.equal(first[(4, 1000)], first[(4, 1001)])
    mixed = sum(draw_augmentation(ALL_ON, d, i, 32).mix_with is not None for i, d in items)
    assert 4 <= mixed <= 28  # mix_prob 0.5 of 32 items


def test_without_a_draw_one_value_of_the_global_generator_drives_crop_and_augmentation(mel_folder):
    dataset = make_set(mel_folder, ALL_ON)
    torch.manual_seed(5)
    got = dataset[7]
    next_after = int(torch.randint(0, DRAW_RANGE, (1,)))
    torch.manual_seed(5)
    draw = int(torch.randint(0, DRAW_RANGE, (1,)))
    assert next_after == int(torch.randint(0, DRAW_RANGE, (1,)))  # exactly one value taken, as crop_start takes
    assert torch.equal(got, dataset[(7, draw)])


def test_mixed_in_segment_from_a_broken_file_is_replaced_like_any_other(tmp_path):
    folder = tmp_path / "mels"
    write_mel_folder(folder)
    settings = AugmentSettings(mix_prob=1.0)
    augmented, plain = make_set(folder, settings), make_set(folder, None)
    index = 0  # file 0, window 0; the first draw that mixes in a segment of another file:
    draw = next(d for d in range(100) if draw_augmentation(settings, d, index, 32).mix_with[0] >= 4)
    aug = draw_augmentation(settings, draw, index, len(augmented))
    other_file = int(augmented.items[aug.mix_with[0], 0])
    Path(augmented.paths[other_file]).unlink()
    with pytest.warns(UserWarning, match="became unreadable during training"):
        got = augmented[(index, draw)]
    # The stand-in is what the dataset reads for that item and crop draw now (both share the flags).
    expected = augment_raw(plain[(index, draw)][0], aug, other=plain[aug.mix_with][0])
    assert torch.equal(got[0], expected)
    assert augmented.unreadable_files() == [augmented.paths[other_file]]


def test_validation_and_evaluation_are_never_augmented(mel_folder):
    kwargs = dict(data_dir=str(mel_folder), frames=FRAMES, batch_size=2, val_split=0.3)
    dm, plain = MelDataModule(augment=ALL_ON, **kwargs), MelDataModule(**kwargs)
    for module in (dm, plain):
        module.setup("fit")
    assert dm.train_set.augment == ALL_ON and dm.val_set.augment is None
    assert (dm.normalizer.mean, dm.normalizer.std) == (plain.normalizer.mean, plain.normalizer.std)
    assert torch.equal(next(iter(dm.val_dataloader())), next(iter(plain.val_dataloader())))
    dm.load_state_dict(dm.state_dict())
    everything = dm.evaluation_set("all")
    assert everything.augment is None
    assert torch.equal(dm.evaluation_set("val")[0], plain.val_set[0])
    assert not all(torch.equal(dm.train_set[(i, 3)], plain.train_set[(i, 3)]) for i in range(4))


def test_settings_are_plain_values_in_the_hyperparameters():
    dm = MelDataModule(augment=AugmentSettings(gain_db=3.0, freq_shift=1))
    assert dm.hparams["augment"] == {"gain_db": 3.0, "freq_shift": 1, "mix_prob": 0.0, "mix_gain_db": 6.0}
    assert MelDataModule(augment=dm.hparams["augment"]).augment == dm.augment  # as load_from_checkpoint passes it
    assert MelDataModule().hparams["augment"] == AugmentSettings().to_dict()
    with pytest.raises(ConfigError, match="unknown data.augment setting.*gain_dB"):
        AugmentSettings.from_dict({"gain_dB": 3})


@pytest.mark.parametrize(
    "values, setting",
    [
        ({"gain_db": -1.0}, "data.augment.gain_db=-1.0"),
        ({"mix_gain_db": float("nan")}, "data.augment.mix_gain_db=nan"),
        ({"freq_shift": -2}, "data.augment.freq_shift=-2"),
        ({"freq_shift": 128}, "data.augment.freq_shift=128 must be smaller than the number of mel bins"),
        ({"mix_prob": 1.5}, r"data.augment.mix_prob=1.5 must be in \[0, 1\]"),
        ({"mix_prob": -0.1}, "data.augment.mix_prob=-0.1"),
    ],
)
def test_bad_settings_name_the_setting(values, setting):
    with pytest.raises(ConfigError, match=setting):
        MelDataModule(augment=AugmentSettings(**values))


# --- the command line ----------------------------------------------------------------------------


def test_cli_refuses_a_mistyped_or_out_of_range_augment_option(tmp_path):
    typo = train(["--data.augment.gain_dB", "3", "--checkpoint_dir", str(tmp_path / "ckpt")])
    assert typo.returncode != 0 and "gain_dB" in typo.stderr
    bad = train(["--data.augment.mix_prob", "1.5", "--data.cache_dir", str(tmp_path / "cache"),
                 "--checkpoint_dir", str(tmp_path / "ckpt")])
    assert bad.returncode == 2 and "data.augment.mix_prob=1.5 must be in [0, 1]" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def straight_augmented(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("straight_augmented")
    result = train(fit_args(root, root / "cache", *AUGMENT_FLAGS))
    assert result.returncode == 0, result.stderr[-2000:]
    return {"cache": root / "cache", "last": root / "ckpt" / "last.ckpt"}


@pytest.mark.slow
def test_cli_trains_with_augmentation_and_records_it(straight_augmented):
    ckpt = torch.load(straight_augmented["last"], map_location="cpu", weights_only=True)
    assert ckpt["datamodule_hyper_parameters"]["augment"] == {
        "gain_db": 3.0, "freq_shift": 1, "mix_prob": 0.5, "mix_gain_db": 6.0,
    }


@pytest.mark.slow
def test_augmented_training_resumes_bitwise_after_a_kill(tmp_path, straight_augmented):
    # Two loader workers and a kill mid-epoch (tests/test_reliability.py's setting): augmentation
    # drawn from anything but the sampler's draws would make the resumed weights differ.
    result = train_in_child(fit_args(tmp_path, straight_augmented["cache"], *AUGMENT_FLAGS, *signal_probe(7, "SIGKILL")))
    assert result.returncode == -9
    last = tmp_path / "ckpt" / "last.ckpt"
    assert step_of(last) == 4
    resumed = train(["fit", "--ckpt_path", str(last), "--trainer.callbacks", "[]"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_weights(last, straight_augmented["last"])
