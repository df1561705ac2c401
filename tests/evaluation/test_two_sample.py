"""The classifier two-sample test: it tells different window distributions apart and not identical ones,
its noise control, the split by recording, determinism, and the report over a dataset of recordings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import load_script, write_mel_folder

from musicvae.evaluation.two_sample import (held_out, moment_matched_noise, noise_control, residual_covariance,
                                            two_sample_test)
from musicvae.evaluation.two_sample_report import interleaved_windows, two_sample_lines, two_sample_scores

SEEDS = (0, 1)
# Fewer steps than the reports' TRAIN_STEPS keep these tests to seconds; the separations tested here are
# plain enough for them.
STEPS = 40


def music(n: int, seed: int, n_mels: int = 16, frames: int = 32) -> torch.Tensor:
    """``(n, 1, n_mels, frames)`` windows like log-mels of notes: a few horizontal lines (held partials)
    that start and stop, over a quiet floor that changes slowly in time, as a room's noise does."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.nn.functional.avg_pool2d(torch.randn(n, 1, n_mels, frames, generator=g), (1, 5), stride=1,
                                             padding=(0, 2), count_include_pad=False)
    for i in range(n):
        for _ in range(3):
            b, start = int(torch.randint(n_mels, (1,), generator=g)), int(torch.randint(frames - 8, (1,), generator=g))
            x[i, 0, b, start:start + int(torch.randint(6, frames, (1,), generator=g))] += 2.0
    return x


def blur(x: torch.Tensor, width: int = 9) -> torch.Tensor:
    """A decoder that keeps the coarse shape and loses the detail: a moving average over time and bins."""
    return torch.nn.functional.avg_pool2d(x, (3, width), stride=1, padding=(1, width // 2), count_include_pad=False)


def groups_of(n: int, recordings: int = 8) -> torch.Tensor:
    return torch.arange(n) * recordings // n


def test_identical_distributions_score_near_chance_and_different_ones_near_one():
    real, other = music(128, seed=1), music(128, seed=2)
    same = two_sample_test(real, other, groups_of(128), groups_of(128), SEEDS, STEPS)
    assert abs(same["accuracy"] - 0.5) < 0.12 and len(same["accuracies"]) == 2 and same["spread"] >= 0
    blurred = two_sample_test(real, blur(other), groups_of(128), groups_of(128), SEEDS, STEPS)
    assert blurred["accuracy"] > 0.9 and blurred["windows"] == [128, 128]


def test_the_noise_control_matches_second_moments_and_is_still_told_from_music():
    x = music(192, seed=3)
    x_hat = blur(x)
    mean, cov = residual_covariance(x, x_hat)
    noisy = moment_matched_noise(x_hat, mean, cov, torch.Generator().manual_seed(0))
    got_mean, got_cov = residual_covariance(noisy, x_hat)  # the noise alone, per frame over mel bins
    assert torch.allclose(got_mean, mean, atol=0.03) and torch.allclose(got_cov, cov, atol=0.06)
    # The control at the reports' own budget (TRAIN_STEPS): what the claim "strong enough" is about.
    found = noise_control(music(128, seed=4), x[:128], x_hat[:128], groups_of(128), groups_of(128), SEEDS)
    assert found["passed"] and found["accuracy"] >= found["goal"] == 0.9 and found["covariance"] == "full"


def test_split_keeps_each_recording_on_one_side_for_both_classes():
    real_ids, fake_ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.tensor([1, 0, 3, 2, 2, 3, 0, 1])
    for seed in range(5):
        real, fake = held_out(8, 8, real_ids, fake_ids, 0.5, torch.Generator().manual_seed(seed))
        held = set(real_ids[real].tolist()) | set(fake_ids[fake].tolist())
        trained = set(real_ids[~real].tolist()) | set(fake_ids[~fake].tolist())
        assert held and trained and not held & trained
    # Prior samples have no recordings: held out at random, in the same share.
    real, fake = held_out(8, 100, real_ids, None, 0.5, torch.Generator().manual_seed(0))
    assert 0 < int(real.sum()) < 8 and int(fake.sum()) == 50
    with pytest.raises(ValueError, match="at least two recordings"):
        held_out(4, 4, torch.zeros(4), torch.zeros(4), 0.5, torch.Generator())


def test_same_seed_same_accuracy_and_the_global_generator_is_left_alone():
    real, fake = music(64, seed=6), blur(music(64, seed=7))
    torch.manual_seed(99)
    before = torch.random.get_rng_state()
    first = two_sample_test(real, fake, seeds=(5,), steps=20)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert two_sample_test(real, fake, seeds=(5,), steps=20)["accuracies"] == first["accuracies"]
    with pytest.raises(ValueError, match="one shape"):
        two_sample_test(real, fake[:, :, :8])


class Recordings(torch.utils.data.Dataset):
    """A SegmentDataset's face: windows plus ``items`` rows (recording, start frame)."""

    def __init__(self, x: torch.Tensor, recordings: int) -> None:
        self.x = x
        self.items = np.stack([np.arange(len(x)) % recordings, np.arange(len(x)) // recordings * 32], axis=1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def test_scores_over_a_dataset_compare_windows_of_the_same_recordings():
    data = Recordings(music(256, seed=8), recordings=8)
    real, source = interleaved_windows(data, max_windows=100)
    assert len(real) == len(source) == 100 and not set(real) & set(source)
    rows = data.items
    assert sorted(np.unique(rows[real, 0])) == sorted(np.unique(rows[source, 0])) == list(range(8))
    found = two_sample_scores(data, blur, points={"identity": lambda y: y}, samples={"noise": torch.randn(200, 1, 16, 32)},
                              seeds=SEEDS, max_windows=100, steps=2 * STEPS)  # the control needs more than STEPS
    assert found["windows"] == 100 and found["control"]["passed"] and not found["too_weak"]
    assert found["floor"]["accuracy"] < 0.65 < found["reconstructions"]["alpha_0"]["accuracy"]
    assert found["reconstructions"]["identity"] == found["reconstructions"]["alpha_0"]
    assert found["samples"]["noise"]["accuracy"] > 0.9 and found["samples"]["noise"]["windows"] == [100, 100]
    text = "\n".join(two_sample_lines(found))
    assert "The control passed" in text and "reconstructions, alpha_0" in text and "prior samples, noise" in text


@pytest.mark.slow
def test_evaluate_writes_the_two_sample_test_when_asked(tiny_run, tmp_path, capsys):
    main = load_script("evaluate").main
    folder = tmp_path / "music"
    write_mel_folder(folder, n_files=4, frames=64, n_mels=32)  # 4 recordings of 2 windows (the tiny run's shape)
    ckpt = str(tiny_run["ckpt_dir"] / "best.ckpt")
    assert main(["--ckpt_path", ckpt, "--data.data_dir", str(folder), "--out", str(tmp_path / "off")]) == 0
    assert "two_sample" not in json.loads((tmp_path / "off" / "metrics.json").read_text())["metrics"]
    assert main(["--ckpt_path", ckpt, "--data.data_dir", str(folder), "--out", str(tmp_path / "on"),
                 "--two_sample_seeds", "1"]) == 0
    assert "two-sample accuracy" in capsys.readouterr().out
    found = json.loads((tmp_path / "on" / "metrics.json").read_text())["metrics"]["two_sample"]
    assert found["windows"] == 4 and found["seeds"] == [0] and len(found["control"]["accuracies"]) == 1
    assert "alpha_0" in found["reconstructions"] and set(found["samples"]) == {"standard"}
    assert "## Classifier two-sample test" in (tmp_path / "on" / "report.md").read_text()
    with pytest.raises(SystemExit) as refused:
        main(["--ckpt_path", ckpt, "--out", str(tmp_path / "bad"), "--two_sample_seeds", "-1"])
    assert refused.value.code == 2
    assert "--two_sample_seeds -1" in capsys.readouterr().err
