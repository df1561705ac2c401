"""Bad configuration fails before any work: preflight checks (musicvae/training/preflight.py) and the CLI.

Each bad configuration must end with exit status 2, one message that names the setting and
says what to change, no traceback, and nothing written: no cache, no checkpoint folder, no logs.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from jsonargparse import Namespace

import musicvae.training.preflight as preflight
from conftest import tiny_fit_args, write_mel_folder
from helpers import command_output, exit_status
from musicvae.audio.mel import MelSettings
from musicvae.training.cli import main
from musicvae.data.datamodule import MelDataModule
from musicvae.errors import ConfigError
from musicvae.training.preflight import (
    audio_frames,
    check_batch_size,
    check_creatable_dir,
    logger_save_dirs,
    train_segments_upper_bound,
    training_windows_bound,
)
from musicvae.data.split import MIN_FILES_FOR_FILE_SPLIT, split_files

# ---------------------------------------------------------------------------------------------
# Preflight functions
# ---------------------------------------------------------------------------------------------


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_a_missing_folder_is_creatable_and_nothing_is_made(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    assert check_creatable_dir(target, "--checkpoint_dir") == target
    assert check_creatable_dir(tmp_path, "--checkpoint_dir") == tmp_path  # an existing folder
    assert tree(tmp_path) == []


def test_relative_and_home_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_creatable_dir("runs/x", "--checkpoint_dir") == tmp_path / "runs" / "x"
    assert check_creatable_dir("~/y", "--checkpoint_dir") == tmp_path / "y"


@pytest.mark.parametrize("below", ["", "sub", "sub/deeper"])
def test_a_regular_file_on_the_way_is_refused_by_name(tmp_path, below):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    target = blocker / below if below else blocker
    with pytest.raises(ConfigError) as err:
        check_creatable_dir(target, "--data.cache_dir")
    message = str(err.value)
    assert message.startswith(f"--data.cache_dir {target}:")
    assert "is a regular file, not a folder" in message and str(blocker) in message
    assert "choose another --data.cache_dir" in message
    assert tree(tmp_path) == ["notes.txt"]


def test_a_dangling_symbolic_link_is_refused(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match="dangling symbolic link"):
        check_creatable_dir(tmp_path / "link" / "ckpt", "--checkpoint_dir")


def test_a_symbolic_link_to_a_folder_is_followed(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    check_creatable_dir(tmp_path / "link" / "ckpt", "--checkpoint_dir")


def test_a_folder_without_write_permission_is_refused(tmp_path, monkeypatch):
    # Tests run as root, for whom os.access allows every write; stand in for an ordinary user.
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)
    with pytest.raises(ConfigError, match="may not write into") as err:
        check_creatable_dir(locked / "logs", "--trainer.logger.init_args.save_dir")
    assert str(locked) in str(err.value)
    check_creatable_dir(tmp_path / "open", "--trainer.logger.init_args.save_dir")


def test_logger_save_dirs_reads_every_form_of_the_logger_setting():
    spec = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "logs"}}
    assert logger_save_dirs(spec) == [("--trainer.logger.init_args.save_dir", "logs")]
    assert logger_save_dirs(Namespace(class_path="x.CSVLogger", init_args=Namespace(save_dir="csv"))) == [
        ("--trainer.logger.init_args.save_dir", "csv")
    ]
    assert logger_save_dirs([spec, {"class_path": "x.Other", "init_args": {}}]) == [
        ("--trainer.logger[0].init_args.save_dir", "logs")
    ]
    assert logger_save_dirs(None) == logger_save_dirs(False) == logger_save_dirs(True) == []


def test_training_windows_bound_follows_the_split_rules():
    # Fewer than MIN_FILES_FOR_FILE_SPLIT files: the first 80% of each (segment split).
    assert training_windows_bound([("a", 100), ("b", 100)], frames=10, val_split=0.2, seed=0) == 16
    # Files shorter than one segment are dropped.
    assert training_windows_bound([("a", 9)], frames=10, val_split=0.2, seed=0) == 0
    # A split by file: at least the training files' whole windows.
    files = [(f"f{i}", 100) for i in range(20)]
    is_val = split_files([rel for rel, _ in files], 0.2, 0)
    assert any(is_val) and not all(is_val)
    by_file = 10 * is_val.count(False)
    assert training_windows_bound(files, frames=10, val_split=0.2, seed=0) == max(by_file, 20 * 8)


def tiny_dm(tmp_path: Path, **kwargs) -> MelDataModule:
    settings = dict(cache_dir=str(tmp_path / "cache"), frames=16, batch_size=1, val_split=0.2)
    return MelDataModule(**{**settings, **kwargs})


def real_train_count(dm: MelDataModule) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # segment-split and skipped-file notices
        dm.prepare_data()
        dm.setup("fit")
    return len(dm.train_set)


@pytest.mark.parametrize("pieces, seconds, frames, val_split", [(10, 3, 32, 0.2), (3, 2, 16, 0.1), (6, 1.5, 64, 0.5)])
def test_synthetic_bound_covers_the_real_count(tmp_path, pieces, seconds, frames, val_split):
    dm = tiny_dm(tmp_path, synthetic_pieces=pieces, synthetic_seconds=seconds, frames=frames,
                 val_split=val_split, mel=MelSettings(n_mels=32))
    bound = train_segments_upper_bound(dm)
    assert tree(tmp_path) == []  # counted from the settings, nothing rendered
    real = real_train_count(dm)
    total = pieces * (preflight.synthetic_piece_frames(seconds, 22050, 256) // frames)
    assert real <= bound <= total
    # The frame count of a piece is exact.
    assert {int(np.load(p, mmap_mode="r").shape[1]) for p in dm.folder.glob("*.npy")} == {
        preflight.synthetic_piece_frames(seconds, 22050, 256)
    }


@pytest.mark.parametrize("n_files, seed", [(3, 0), (8, 0), (8, 5), (12, 1)])
def test_array_folder_bound_covers_the_real_count(tmp_path, n_files, seed):
    folder = tmp_path / "mels"
    write_mel_folder(folder, n_files=n_files, frames=70, n_mels=16)
    dm = tiny_dm(tmp_path, data_dir=str(folder), seed=seed)
    bound = train_segments_upper_bound(dm)
    assert not (tmp_path / "cache").exists()
    assert real_train_count(dm) <= bound <= n_files * (70 // 16)


def test_unusable_files_count_nothing_and_a_file_split_that_falls_back_is_covered(tmp_path):
    # Five arrays make a split by file possible on paper; one is corrupt, so the data module is
    # left with four and holds out the tail of each file instead. The bound must cover either rule.
    folder = tmp_path / "mels"
    paths = write_mel_folder(folder, n_files=MIN_FILES_FOR_FILE_SPLIT, frames=64, n_mels=16)
    paths[0].write_bytes(b"not an array")
    (folder / "wrong_bins.npy").write_bytes(b"")
    np.save(folder / "ints.npy", np.zeros((16, 64), dtype=np.int32))
    np.save(folder / "transposed.npy", np.zeros((64, 16), dtype=np.float32))
    assert preflight.array_frames(paths[0], 16) == 0
    assert preflight.array_frames(folder / "ints.npy", 16) == 0
    assert preflight.array_frames(folder / "transposed.npy", 16) == 0
    dm = tiny_dm(tmp_path, data_dir=str(folder))
    bound = train_segments_upper_bound(dm)
    real = real_train_count(dm)
    assert dm.split_mode == "segment" and real <= bound


def test_pt_arrays_are_read_from_their_header_or_left_unknown(tmp_path):
    folder = tmp_path / "mels"
    folder.mkdir()
    torch.save(torch.zeros(1, 16, 50), folder / "a.pt")
    torch.save({"not": "a tensor"}, folder / "b.pt")
    assert preflight.array_frames(folder / "a.pt", 16) == 50
    assert preflight.array_frames(folder / "b.pt", 16) == 0
    torch.save(torch.zeros(16, 50), folder / "legacy.pt", _use_new_zipfile_serialization=False)
    assert preflight.array_frames(folder / "legacy.pt", 16) is None
    dm = tiny_dm(tmp_path, data_dir=str(folder), mel=MelSettings(n_mels=16))
    assert train_segments_upper_bound(dm) is None
    assert check_batch_size(dm) is None  # unknown: left to the data module's own check


def write_wavs(folder: Path, seconds: list[float], rate: int = 22050) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, length in enumerate(seconds):
        t = np.arange(int(length * rate)) / rate
        wave = 0.3 * np.sin(2 * np.pi * (220 + 40 * i) * t) * (1 + np.sin(2 * np.pi * 2 * t)) / 2
        path = folder / f"song_{i}.wav"
        sf.write(path, wave.astype(np.float32), rate, subtype="PCM_16")
        paths.append(path)
    return paths


@pytest.mark.parametrize("rate, seconds", [(22050, [1.0, 1.2, 0.7]), (16000, [0.8] * 6), (44100, [1.0, 0.3, 2.0, 1.1, 0.9, 1.5, 0.6])])
def test_audio_folder_bound_covers_the_real_count(tmp_path, rate, seconds):
    folder = tmp_path / "music"
    paths = write_wavs(folder, seconds, rate)
    (folder / "broken.wav").write_bytes(b"RIFF nonsense")
    mel = MelSettings(n_mels=16)
    assert audio_frames(folder / "broken.wav", mel.sample_rate, mel.hop_length) == 0
    dm = tiny_dm(tmp_path, data_dir=str(folder), mel=mel, prepare_workers=0)
    bound = train_segments_upper_bound(dm)
    assert not (tmp_path / "cache").exists()  # headers only: no decoding, no cache
    real = real_train_count(dm)
    # The header's frame count is the decoded one (as the cache computes it) for WAV.
    frames = {Path(s.rel).name: s.n_frames for s in dm.sources}
    for path in paths:
        if path.name in frames:
            assert audio_frames(path, mel.sample_rate, mel.hop_length) == frames[path.name]
    assert real <= bound


def test_batch_size_check_names_the_setting_the_bound_and_the_folder(tmp_path):
    folder = tmp_path / "mels"
    write_mel_folder(folder, n_files=3, frames=64, n_mels=16)
    dm = tiny_dm(tmp_path, data_dir=str(folder), batch_size=100)
    with pytest.raises(ConfigError) as err:
        check_batch_size(dm)
    assert str(err.value) == (
        f"data.batch_size=100 is larger than the training set (at most 9 segments of 16 frames in {folder}): "
        "lower data.batch_size or add data"
    )
    assert check_batch_size(tiny_dm(tmp_path, data_dir=str(folder), batch_size=9)) == 9


# ---------------------------------------------------------------------------------------------
# The command line: every bad configuration is refused before any work
# ---------------------------------------------------------------------------------------------


def write_bad_yaml(root: Path) -> list[str]:
    (root / "bad.yaml").write_text("data:\n  batch_size: 4\n  foo: 1\n")
    return ["--config", str(root / "bad.yaml")]


def write_bad_trainer_yaml(root: Path) -> list[str]:
    (root / "typo.yaml").write_text("trainer:\n  max_epoch: 3\n")
    return ["--config", str(root / "typo.yaml")]


def file_at(root: Path, name: str = "blocker") -> Path:
    (root / name).write_text("a file where a folder is expected\n")
    return root / name


def mel_arrays(root: Path) -> list[str]:
    write_mel_folder(root / "mels", n_files=4, frames=96, n_mels=32)  # mel.json agrees with TINY_FLAGS
    return ["--data.data_dir", str(root / "mels"), "--data.batch_size", "100000"]


def wav_files(root: Path) -> list[str]:
    write_wavs(root / "music", [1.0, 1.5, 0.8])
    return ["--data.data_dir", str(root / "music"), "--data.batch_size", "100000"]


#: id -> (extra flags given the test's folder, texts stderr must contain).
CASES = {
    "unknown-yaml-key": (write_bad_yaml, ["data.foo", "--help"]),
    "unknown-yaml-trainer-key": (write_bad_trainer_yaml, ["max_epoch", "--help"]),
    "unknown-flag": (lambda root: ["--bogus", "1"], ["unrecognized arguments: --bogus", "--help"]),
    "typo-flag": (lambda root: ["--trainer.max_epoch", "3"], ["unrecognized arguments: --trainer.max_epoch", "--help"]),
    "batch-size-not-int": (lambda root: ["--data.batch_size", "abc"], ["data.batch_size", "Expected a <class 'int'>"]),
    "lr-not-float": (lambda root: ["--model.lr", "fast"], ["model.lr", "Expected a <class 'float'>"]),
    "val-split-0": (lambda root: ["--data.val_split", "0"], ["data.val_split=0.0 must be between 0 and 1"]),
    "val-split-1": (lambda root: ["--data.val_split", "1"], ["data.val_split=1.0 must be between 0 and 1"]),
    "val-split-1.5": (lambda root: ["--data.val_split", "1.5"], ["data.val_split=1.5 must be between 0 and 1"]),
    "val-split-negative": (lambda root: ["--data.val_split", "-0.1"], ["data.val_split=-0.1 must be between 0 and 1"]),
    "batch-size-synthetic": (
        lambda root: ["--data.batch_size", "100000"],
        ["data.batch_size=100000 is larger than the training set (at most 64 segments of 32 frames",
         "lower data.batch_size or add data"],
    ),
    "batch-size-arrays": (
        mel_arrays, ["data.batch_size=100000 is larger than the training set", "lower data.batch_size"]
    ),
    "batch-size-wavs": (
        wav_files, ["data.batch_size=100000 is larger than the training set", "lower data.batch_size"]
    ),
    "mel-n-fft-negative": (
        lambda root: ["--data.mel.n_fft", "-5"],
        ["--data.mel: invalid mel settings: n_fft=-5 and hop_length=256 must be positive"],
    ),
    "mel-f-max-above-nyquist": (
        lambda root: ["--data.mel.f_max", "20000", "--data.mel.sample_rate", "16000"],
        ["--data.mel: invalid mel settings: need 0 <= f_min < f_max <= sample_rate/2", "f_max=20000"],
    ),
    "linear-path-too-few-segments": (
        lambda root: ["--model.linear_path", "true", "--model.latent_dim", "100"],
        ["model.linear_path needs at least model.latent_dim=100 training segments for its PCA, and the training "
         "set has at most 64"],
    ),
    "model-setting-typo": (
        lambda root: ["--model.lrr", "3"],
        ["--model.lrr: MusicVAEModule has no such setting (musicvae fit --model.help MusicVAEModule lists them)"],
    ),
    "model-setting-of-an-earlier-version": (
        lambda root: ["--model.kl_warmup_steps", "3"],
        ["--model.kl_warmup_steps: MusicVAEModule has no such setting; it is now --model.kl.warmup_steps"],
    ),
    "media-setting-under-model": (
        lambda root: ["--model.audio_every_n_epochs", "0"],
        ["it is now --media.audio_every_n_epochs"],
    ),
    "adversarial-flag-of-an-earlier-version": (
        lambda root: ["--model.adversarial", "true"],
        ["the adversarial stage is now --model SharpenModule"],
    ),
    "media-alpha-out-of-range": (
        lambda root: ["--media.alpha", "1.5"],
        ["media.alpha=1.5 must lie in [0, 1]"],
    ),
    "checkpoint-dir-under-file": (
        lambda root: ["--checkpoint_dir", str(file_at(root) / "ckpt")],
        ["--checkpoint_dir", "is a regular file, not a folder", "choose another --checkpoint_dir"],
    ),
    "checkpoint-dir-is-file": (
        lambda root: ["--checkpoint_dir", str(file_at(root))],
        ["--checkpoint_dir", "is a regular file, not a folder", "choose another --checkpoint_dir"],
    ),
    "log-dir-under-file": (
        lambda root: ["--trainer.logger.init_args.save_dir", str(file_at(root) / "logs" / "deeper")],
        ["--trainer.logger.init_args.save_dir", "is a regular file", "choose another --trainer.logger.init_args.save_dir"],
    ),
    "cache-dir-under-file": (
        lambda root: ["--data.cache_dir", str(file_at(root) / "cache")],
        ["--data.cache_dir", "is a regular file", "choose another --data.cache_dir"],
    ),
}


def bad_run(tmp_path: Path, case: str) -> tuple[list[str], list[str], list[str]]:
    """The `fit` arguments of a bad case, what stderr must say, and the folder's files before."""
    make_extra, expected = CASES[case]
    extra = make_extra(tmp_path)
    return tiny_fit_args(tmp_path / "run", *extra), expected, tree(tmp_path)


def assert_refused_before_any_work(tmp_path: Path, before: list[str], code, stderr: str, expected: list[str]) -> None:
    assert code == 2, stderr[-3000:]
    for text in expected:
        assert text in stderr, f"{text!r} not in stderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr
    for name in ("cache", "ckpt", "logs"):
        assert not (tmp_path / "run" / name).exists(), name
    assert tree(tmp_path) == before  # nothing written anywhere under the test's folder


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_is_refused_before_any_work(case, tmp_path, monkeypatch):
    """`python scripts/train.py ARGS` (its main, in-process): exit 2, what stderr says (Lightning's log
    lines and warnings included, as a console shows them), no traceback, nothing written."""
    workdir = tmp_path / "cwd"  # relative defaults (logs/, checkpoints/) would land here
    workdir.mkdir()
    args, expected, before = bad_run(tmp_path, case)
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    out, err = io.StringIO(), io.StringIO()
    with command_output(out, err):
        code = exit_status(main)
    assert_refused_before_any_work(tmp_path, before, code, err.getvalue(), expected)
    assert list(workdir.iterdir()) == []
    # One line of ours, or jsonargparse's own refusal (its usage, then "error: ...") and none of ours.
    refused_by_the_parser = err.getvalue().startswith("usage:")
    assert err.getvalue().count("musicvae: error: ") == (0 if refused_by_the_parser else 1), err.getvalue()
