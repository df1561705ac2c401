"""MelDataModule over a folder of music files (and a mix of music files and mel arrays)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import tiny_fit_args
from musicvae.audio.mel import MelSettings
from musicvae.training.cli import cli_main
from musicvae.data.datamodule import MelDataModule
from musicvae.errors import DataError
from musicvae.audio.synth import render_piece

MEL = MelSettings(n_mels=32)
# (relative path, sample rate, channels, format, subtype): a spread of what a collection holds.
FILES = [
    ("album_a/01.wav", 22050, 1, "WAV", "PCM_16"),
    ("album_a/02.flac", 44100, 2, "FLAC", "PCM_24"),
    ("album_a/03.ogg", 48000, 2, "OGG", "VORBIS"),
    ("album_b/04.wav", 8000, 1, "WAV", "FLOAT"),
    ("album_b/05.wav", 96000, 6, "WAV", "PCM_16"),
    ("album_b/06.ogg", 32000, 1, "OGG", "VORBIS"),
]


def write_music(folder: Path, seconds: float = 3.0) -> None:
    for index, (rel, rate, channels, fmt, subtype) in enumerate(FILES):
        wave = render_piece(index, seconds=seconds, sample_rate=rate)
        # Spread the piece over the channels with different gains, as a stereo or surround mix would.
        data = np.stack([wave * (0.5 + 0.5 * c / max(channels, 1)) for c in range(channels)], axis=1)
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, data, rate, format=fmt, subtype=subtype)


@pytest.fixture
def music_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "music"
    write_music(folder)
    return folder


def make_dm(folder: Path, cache: Path, **kwargs) -> MelDataModule:
    dm = MelDataModule(data_dir=str(folder), cache_dir=str(cache), mel=MEL, frames=32, batch_size=4,
                       val_split=0.3, prepare_workers=0, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_a_folder_of_music_files_becomes_segments(music_folder, tmp_path):
    dm = make_dm(music_folder, tmp_path / "cache")
    assert sorted(s.rel for s in dm.sources) == sorted(rel for rel, *_ in FILES)
    x = dm.train_set[0]
    assert x.shape == (1, 32, 32) and torch.isfinite(x).all()
    # Every recording becomes about 3 s of frames at 22050 Hz / hop 256, whatever its rate.
    assert all(abs(s.n_frames - 3.0 * MEL.frames_per_second) <= 2 for s in dm.sources)
    assert not (music_folder / "mel.json").exists()  # the music folder is only read


def test_second_run_reuses_the_cache_and_a_changed_file_is_recomputed(music_folder, tmp_path):
    first = make_dm(music_folder, tmp_path / "cache")
    arrays = {s.rel: Path(s.path) for s in first.sources}
    stamps = {rel: path.stat().st_mtime_ns for rel, path in arrays.items()}
    write_music_one = FILES[0]
    sf.write(music_folder / write_music_one[0], render_piece(9, seconds=4.0, sample_rate=22050), 22050)
    second = make_dm(music_folder, tmp_path / "cache")
    changed = {s.rel for s in second.sources if Path(s.path).stat().st_mtime_ns != stamps[s.rel]}
    assert changed == {write_music_one[0]}
    assert {s.rel: s.n_frames for s in second.sources}[write_music_one[0]] > 3.5 * MEL.frames_per_second


def test_mixed_folder_with_bad_files_reports_each_once(music_folder, tmp_path):
    np.save(music_folder / "precomputed.npy", np.random.default_rng(0).normal(size=(32, 200)).astype(np.float32))
    (music_folder / "broken.wav").write_bytes(b"RIFF\x00\x00not really a wave file")
    (music_folder / "notes.mp3").write_text("a text file with an audio extension")
    (music_folder / "empty.flac").write_bytes(b"")
    sf.write(music_folder / "silence.wav", np.zeros(22050 * 2, np.float32), 22050)
    with pytest.warns(UserWarning) as record:
        dm = make_dm(music_folder, tmp_path / "cache")
    text = "\n".join(str(w.message) for w in record)
    for name in ("broken.wav", "notes.mp3", "empty.flac", "silence.wav"):
        assert text.count(name) == 1, name
    assert "precomputed.npy" in {s.rel for s in dm.sources}
    assert len(dm.sources) == len(FILES) + 1
    with pytest.raises(DataError, match="broken.wav|empty.flac|notes.mp3|silence.wav"):
        make_dm(music_folder, tmp_path / "cache", on_bad_file="error")


def test_a_cache_inside_the_music_folder_is_not_read_as_recordings(music_folder):
    dm = make_dm(music_folder, music_folder / ".cache")
    second = make_dm(music_folder, music_folder / ".cache")  # the cache now holds .npy files
    assert len(second.sources) == len(dm.sources) == len(FILES)


def test_a_folder_without_usable_audio_stops_before_training(tmp_path):
    folder = tmp_path / "music"
    folder.mkdir()
    (folder / "a.wav").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="a.wav"), pytest.raises(DataError, match="none of the files is usable"):
        make_dm(folder, tmp_path / "cache")


@pytest.mark.slow
def test_training_from_a_music_folder_through_the_cli(music_folder, tmp_path):
    # Seed 123 with val_split 0.4 puts 3 of the 6 recordings on the validation side.
    cli = cli_main(tiny_fit_args(tmp_path, "--data.data_dir", str(music_folder), "--data.val_split", "0.4",
                                 "--seed_everything", "123", "--data.batch_size", "4", "--trainer.max_epochs", "1"))
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["MelDataModule"]["mel"] == cli.datamodule.mel.to_dict() == MelSettings(n_mels=32).to_dict()
    assert ckpt["MelDataModule"]["split_mode"] == "file"
    cached = list((tmp_path / "cache" / "audio").rglob("*.npy"))
    assert len(cached) == len(FILES)
