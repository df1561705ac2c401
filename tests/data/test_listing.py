"""Listing a data folder and naming what is wrong with it (musicvae/data/listing.py, and the
preflight of `fit`): symbolic links to folders are followed, each folder once, and a link loop is
called one; a folder with nothing usable is named as such, not blamed on data.batch_size; a file
name with a newline cannot forge a line of a report or an error.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import load_script, write_mel_folder
from musicvae.audio.mel import MelSettings
from musicvae.data.cache import build_audio_cache
from musicvae.data.datamodule import MelDataModule
from musicvae.data.listing import list_folder
from musicvae.errors import ConfigError, DataError, printable
from musicvae.training.preflight import check_batch_size

MEL = MelSettings(n_mels=16)


def data_module(folder: Path, tmp_path: Path, **kwargs) -> MelDataModule:
    settings = dict(cache_dir=str(tmp_path / "cache"), frames=16, batch_size=1, val_split=0.2, mel=MEL,
                    prepare_workers=0)
    return MelDataModule(data_dir=str(folder), **{**settings, **kwargs})


def sources(dm: MelDataModule) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the segment-split notice
        dm.prepare_data()
        dm.setup("fit")
    return sorted(s.rel for s in dm.sources)


def test_linked_folders_are_followed_once_and_a_loop_is_reported(tmp_path):
    data, album = tmp_path / "data", tmp_path / "elsewhere" / "album"
    write_mel_folder(data, n_files=3, frames=40)
    write_mel_folder(album, n_files=2, frames=40, seed=1, sidecar=False)
    os.symlink(album, data / "linked_album")  # outside the data folder: followed
    os.symlink(album, data / "same_album_again")  # the same folder through a second link: listed once
    (data / "sub").mkdir()
    os.symlink(data / "sub", data / "sub_again")  # inside the data folder: listed where it is
    os.symlink(data, data / "sub" / "back_up")  # a loop
    listing = list_folder(data)
    assert listing.dirs == ["linked_album", "sub"]
    assert [path for path, _ in listing.loops] == [str(data / "sub" / "back_up")]
    assert "symbolic link loop" in listing.loops[0][1]
    dm = data_module(data, tmp_path)
    assert sources(dm) == ["linked_album/track_00.npy", "linked_album/track_01.npy",
                           *(f"track_{i:02d}.npy" for i in range(3))]
    assert any("back_up: symbolic link loop" in problem for problem in dm.problems)


def test_a_file_link_loop_is_called_a_loop_not_a_broken_link(tmp_path):
    data = tmp_path / "data"
    write_mel_folder(data, n_files=3, frames=40)
    os.symlink("b.wav", data / "a.wav")
    os.symlink("a.wav", data / "b.wav")
    os.symlink("self.npy", data / "self.npy")
    report = build_audio_cache(data, tmp_path / "cache", MEL)
    assert {Path(path).name: reason for path, reason in report.problems} == {
        "a.wav": "symbolic link loop (following it never reaches a file)",
        "b.wav": "symbolic link loop (following it never reaches a file)"}
    dm = data_module(data, tmp_path)
    sources(dm)
    assert [p for p in dm.problems if "self.npy" in p] == [
        f"{data / 'self.npy'}: cannot read the array (symbolic link loop (following it never reaches a file))"]


def test_a_newline_in_a_file_name_cannot_forge_a_report_line(tmp_path, capsys):
    music = tmp_path / "music"
    music.mkdir()
    sf.write(music / "good.wav", 0.3 * np.sin(np.arange(22050) / 5).astype(np.float32), 22050)
    forged = "evil.wav\nskipped good.wav: forged"  # a name cannot hold "/", anything else it can
    (music / f"{forged}.wav").write_bytes(b"not audio")
    assert load_script("prepare").main([str(music), "--data.cache_dir", str(tmp_path / "cache"), "--workers", "0",
                                        "--no_progress"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    [line] = lines  # the bad file's one line, its name escaped; nothing that reads as a second report line
    assert line.startswith(f"skipped {music}/evil.wav\\nskipped good.wav: forged.wav: "), line
    error = DataError(f"{music / forged}: unreadable")
    assert "\n" not in str(error) and str(error).count("\\n") == 1
    assert printable("Beyoncé — 曲\t.wav") == "Beyoncé — 曲\\t.wav"  # only control characters change


@pytest.mark.parametrize("case", ["empty", "silent_audio", "silent_arrays", "too_short"])
def test_a_folder_without_music_is_named_not_blamed_on_the_batch_size(case, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    if case == "silent_audio":
        for i in range(3):
            sf.write(data / f"quiet_{i}.wav", np.zeros(22050, dtype=np.float32), 22050)
    elif case == "silent_arrays":
        for i in range(3):
            np.save(data / f"quiet_{i}.npy", np.full((16, 40), np.log(1e-5), dtype=np.float32))
    elif case == "too_short":
        write_mel_folder(data, n_files=3, frames=10)
    says = {"empty": "no mel arrays or audio files found", "silent_audio": "every recording is silent (3 file(s)",
            "silent_arrays": "every recording is silent (3 file(s)",
            "too_short": "none of its 3 recording(s) is as long as one segment of 16 frames (the longest has 10)"}[case]
    with pytest.raises(DataError, match=rf"^{data}: ") as err:
        check_batch_size(data_module(data, tmp_path, batch_size=64))  # more segments than the headers promise
    assert says in str(err.value) and "batch_size" not in str(err.value)
    assert not (tmp_path / "cache").exists()  # looked at, never prepared
    if case.startswith("silent"):  # a batch the headers could fill: the data module says the same after preparing
        dm = data_module(data, tmp_path, batch_size=1)
        assert check_batch_size(dm) >= 1
        with pytest.raises(DataError, match=rf"^{data}: every recording is silent"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sources(dm)


def test_a_folder_with_too_little_music_still_blames_the_batch_size(tmp_path):
    data = tmp_path / "data"
    write_mel_folder(data, n_files=2, frames=40)
    np.save(data / "quiet.npy", np.full((16, 40), np.log(1e-5), dtype=np.float32))
    with pytest.raises(ConfigError, match="data.batch_size=8 is larger than the training set"):
        check_batch_size(data_module(data, tmp_path, batch_size=8))
