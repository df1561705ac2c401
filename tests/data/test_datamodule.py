"""MelDataModule: split by recording, normalisation, silence skipping, and bad input messages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_mel_folder
from musicvae.audio.mel import MelSettings
from musicvae.data.datamodule import MelDataModule
from musicvae.errors import ConfigError, DataError
from musicvae.data.split import is_validation_file, split_files


def make_dm(folder: Path, **kwargs) -> MelDataModule:
    kwargs = {"frames": 16, "batch_size": 2, "val_split": 0.3, **kwargs}
    dm = MelDataModule(data_dir=str(folder), **kwargs)
    dm.setup("fit")
    return dm


def side_files(dm: MelDataModule, dataset) -> set[str]:
    return {dm.sources[int(i)].rel for i in dataset.items[:, 0]}


def test_no_file_on_both_sides_of_the_split(tmp_path):
    write_mel_folder(tmp_path / "m", n_files=30)
    dm = make_dm(tmp_path / "m")
    train, val = side_files(dm, dm.train_set), side_files(dm, dm.val_set)
    assert dm.split_mode == "file"
    assert train and val
    assert not train & val
    assert train | val == {s.rel for s in dm.sources}


def test_adding_files_moves_no_existing_file(tmp_path):
    folder = tmp_path / "m"
    write_mel_folder(folder, n_files=20)
    before = make_dm(folder)
    val_before = side_files(before, before.val_set)
    # New recordings, some in a subfolder (the split key is the path relative to data_dir).
    write_mel_folder(folder / "more", n_files=15, seed=1, sidecar=False)
    after = make_dm(folder)
    val_after, train_after = side_files(after, after.val_set), side_files(after, after.train_set)
    assert val_before <= val_after
    assert side_files(before, before.train_set) <= train_after
    assert any(rel.startswith("more/") for rel in val_after | train_after)


def test_split_rule_is_seeded_and_deterministic():
    names = [f"album/track_{i}.ogg" for i in range(200)]
    a, b = split_files(names, 0.1, seed=123), split_files(names, 0.1, seed=123)
    c = split_files(names, 0.1, seed=124)
    assert a == b and a != c
    assert 5 <= sum(a) <= 40  # about 10% of 200
    assert is_validation_file("x/y.npy", 7, 0.5) == is_validation_file("x\\y.npy", 7, 0.5)


def test_normalisation_uses_the_training_split_only(tmp_path):
    folder = tmp_path / "m"
    paths = write_mel_folder(folder, n_files=20)
    # Make every validation file wildly louder: the statistics must not move.
    for path in paths:
        if is_validation_file(path.relative_to(folder).as_posix(), 0, 0.3):
            np.save(path, np.load(path) + 100.0)
    dm = make_dm(folder, silence_margin=0.0)
    train_values = np.concatenate(
        [np.load(dm.sources[int(f)].path)[:, s : s + 16].ravel() for f, s, _, _ in dm.train_set.items]
    )
    assert dm.normalizer.mean == pytest.approx(train_values.mean(), rel=1e-5)
    assert dm.normalizer.std == pytest.approx(train_values.std(), rel=1e-4)
    batch = torch.stack([dm.train_set[i] for i in range(len(dm.train_set))])
    assert abs(batch.mean().item()) < 0.5  # jittered crops of the training data are close to z-scored


def test_silent_segments_are_skipped(tmp_path):
    folder = tmp_path / "m"
    write_mel_folder(folder, n_files=6, frames=64)
    silent = np.full((16, 64), np.log(1e-5), dtype=np.float32)
    loud_then_silent = np.load(folder / "track_00.npy")
    loud_then_silent[:, 32:] = np.log(1e-5)
    np.save(folder / "track_00.npy", loud_then_silent)
    np.save(folder / "track_silent.npy", silent)
    dm = make_dm(folder, val_split=0.5)
    starts = {(dm.sources[int(f)].rel, int(s)) for f, s, _, _ in np.concatenate([dm.train_set.items, dm.val_set.items])}
    assert not any(rel == "track_silent.npy" for rel, _ in starts)
    assert {s for rel, s in starts if rel == "track_00.npy"} <= {0, 16}


def test_segment_split_fallback_for_few_files(tmp_path):
    write_mel_folder(tmp_path / "m", n_files=3, frames=160)
    with pytest.warns(UserWarning, match="segment split"):
        dm = make_dm(tmp_path / "m", val_split=0.2)
    assert dm.split_mode == "segment"
    for f in range(3):
        train_ends = [s + 16 for g, s, _, _ in dm.train_set.items if g == f]
        val_starts = [s for g, s, _, _ in dm.val_set.items if g == f]
        assert val_starts and max(train_ends) <= min(val_starts)  # no overlap in time
        # Random crops stay inside their region too.
        rows = [i for i, row in enumerate(dm.train_set.items) if row[0] == f]
        for _ in range(50):
            for i in rows:
                assert dm.train_set.crop_start(i) + 16 <= dm.train_set.items[i, 3]


def test_pt_arrays_and_channel_axis_are_accepted(tmp_path):
    folder = tmp_path / "m"
    write_mel_folder(folder, n_files=6)
    for path in list(folder.glob("track_0[0-2].npy")):
        torch.save(torch.from_numpy(np.load(path))[None], path.with_suffix(".pt"))  # (1, n_mels, T)
        path.unlink()
    dm = make_dm(folder)
    assert sum(s.rel.endswith(".pt") for s in dm.sources) == 3
    assert dm.train_set[0].shape == (1, 16, 16)


def test_loader_with_workers_memory_maps(mel_folder):
    dm = make_dm(mel_folder, num_workers=2, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 1, 16, 16) and torch.isfinite(batch).all()


def test_state_dict_restores_statistics(mel_folder):
    dm = make_dm(mel_folder)
    state = dm.state_dict()
    assert state["mel"]["n_mels"] == 16 and state["split_mode"] in ("file", "segment")
    fresh = MelDataModule(data_dir=str(mel_folder), frames=16, batch_size=2, val_split=0.3)
    fresh.load_state_dict({**state, "mean": 5.0, "std": 2.0})
    fresh.setup("fit")
    assert (fresh.normalizer.mean, fresh.normalizer.std) == (5.0, 2.0)


# ---- bad input: each gets a message naming the file or setting -------------------------------


def test_missing_and_empty_data_dir(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        MelDataModule(data_dir=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no mel arrays or audio files found"):
        MelDataModule(data_dir=str(tmp_path / "empty")).setup("fit")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("wrong_mels.npy", np.zeros((20, 64), np.float32), "has 20 mel bins, expected 16"),
        ("transposed.npy", np.zeros((64, 16), np.float32), "looks transposed"),
        ("nan.npy", np.where(np.arange(64) == 40, np.nan, 0.0).astype(np.float32)[None].repeat(16, 0), "NaN or Inf.*frame 40"),
        ("inf.npy", np.full((16, 64), np.inf, np.float32), "NaN or Inf"),
        ("corrupt.npy", b"this is not an npy file", "cannot read"),
        ("ints.npy", np.zeros((16, 64), np.int32), "floating-point"),
        ("dict.pt", {"not": "a tensor"}, "expected a tensor"),
    ],
)
def test_bad_files_are_named(tmp_path, name, content, message):
    folder = tmp_path / "m"
    write_mel_folder(folder, n_files=6)
    target = folder / name
    if isinstance(content, bytes):
        target.write_bytes(content)
    elif name.endswith(".pt"):
        torch.save(content, target)
    else:
        np.save(target, content)
    with pytest.warns(UserWarning, match=message) as record:
        dm = make_dm(folder)
    assert any(name in str(w.message) for w in record)
    assert name not in {s.rel for s in dm.sources}
    with pytest.raises(DataError, match=message):
        make_dm(folder, on_bad_file="error")


def test_dangling_symlink_is_reported(mel_folder):
    os.symlink(mel_folder / "gone.npy", mel_folder / "dangling.npy")
    with pytest.warns(UserWarning, match="dangling.npy: cannot read"):
        make_dm(mel_folder)


def test_short_files_are_counted_in_one_warning(mel_folder):
    for i in range(3):
        np.save(mel_folder / f"short_{i}.npy", np.zeros((16, 5), np.float32))
    with pytest.warns(UserWarning, match=r"skipped 3 file\(s\) shorter than one segment \(16 frames\)"):
        make_dm(mel_folder)


def test_nothing_usable_stops_with_a_message(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((20, 64), np.float32))
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the files is usable"):
        MelDataModule(data_dir=str(folder), mel=MelSettings(n_mels=16), frames=16).setup("fit")


def test_bad_settings_are_refused(mel_folder):
    with pytest.raises(ConfigError, match="val_split=1.5"):
        MelDataModule(val_split=1.5)
    with pytest.raises(ConfigError, match="batch_size=500 is larger than the training set"):
        make_dm(mel_folder, batch_size=500)
    with pytest.raises(ConfigError, match="mel.json declares other mel settings.*n_mels"):
        MelDataModule(data_dir=str(mel_folder), mel=MelSettings(n_mels=32))


def test_sidecar_declares_the_mel_settings(mel_folder):
    (mel_folder / "mel.json").write_text(json.dumps({"n_mels": 16, "hop_length": 128}))
    dm = MelDataModule(data_dir=str(mel_folder))
    assert dm.mel == MelSettings(n_mels=16, hop_length=128)
    assert dm.hparams["mel"]["hop_length"] == 128  # plain dict in the hyper-parameters


def test_a_process_left_with_a_live_loader_iterator_still_exits():
    """Loader workers ignore SIGTERM (so a preempted run can save); multiprocessing ends daemonic
    children at exit with SIGTERM and then waits for them, so a process stopped mid-epoch with its
    iterator alive waited forever (found by scripts/reliability.py --mode ctrl-c). The exit handler
    of musicvae/data/loader_workers.py kills them first."""
    import subprocess
    import sys

    script = """
from torchdata.stateful_dataloader import StatefulDataLoader
from musicvae.data.loader_workers import ignore_stop_signals
loader = StatefulDataLoader(list(range(100)), batch_size=2, num_workers=2, worker_init_fn=ignore_stop_signals)
iterator = iter(loader)  # a global: alive until after the exit handlers, as when a run stops mid-epoch
next(iterator)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
