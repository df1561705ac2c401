"""Bad data never kills a run: a mixed folder where a third of the files are broken in different
ways trains to the end on the good ones, and the report names every bad file exactly once.

The folder (see `build_mixed_folder`) holds 38 usable recordings (WAV/FLAC/OGG audio, `.npy` and
`.pt` log-mel arrays, a WAV named `.ogg`) and 25 bad files of 11 kinds (see BAD), plus two arrays
that are fine when the folder is scanned and break while the model trains (SPOILED): 65 files,
27 of them bad in 12 ways.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import tiny_fit_args, write_mel_folder
from helpers import train
from musicvae.data import cache, cache_job, recordings
from musicvae.audio.decode import AudioError, decode_audio
from musicvae.audio.mel_settings import MelSettings
from musicvae.data.cache import build_audio_cache
from musicvae.training.cli import cli_main
from musicvae.data.datamodule import MelDataModule
from musicvae.errors import DataError
from musicvae.data.segments import Normalizer, SegmentDataset

REPO = Path(__file__).resolve().parents[2]
N_MELS, FRAMES = 32, 32
MEL = MelSettings(n_mels=N_MELS)

#: Bad files by kind: relative path -> what the report must say about it (a regular expression).
BAD: dict[str, dict[str, str]] = {
    "truncated audio": {
        "album_a/cut_wave.wav": "truncated",
        "album_b/cut_lossless.flac": "cannot decode|truncated",
        "album_c/cut_vorbis.ogg": "truncated",
    },
    "not audio, audio name": {
        "album_a/picture.wav": "format not recognised",
        "album_b/readme.mp3": "format not recognised",
    },
    "zero bytes": {
        "album_c/empty_audio.wav": r"empty file \(0 bytes\)",
        "arrays/empty_array.npy": r"empty file \(0 bytes\)",
    },
    "NaN / Inf values": {
        "arrays/nan_values.npy": "NaN or Inf",
        "arrays/inf_values.npy": "NaN or Inf",
    },
    "wrong shape": {
        "arrays/transposed.npy": "looks transposed",
        "arrays/wrong_mels.npy": "has 20 mel bins, expected 32",
        "arrays/cube.npy": r"got \(2, 32, 160\)",
    },
    "bad .pt": {
        "arrays/garbage.pt": "cannot read the array",
        "arrays/not_tensor.pt": "expected a tensor",
    },
    "silent": {
        "album_a/silence_30s.wav": "silent",
        "album_b/hiss.flac": "silent",
        "arrays/flat.npy": "silent",
    },
    "shorter than one segment": {
        "album_c/blip.wav": "shorter than one segment",
        "arrays/stub.npy": "shorter than one segment",
    },
    "dangling symlink": {
        "album_a/dangling_audio.wav": "broken symbolic link",
        "arrays/dangling_array.npy": "broken symbolic link",
    },
    "directory named like a file": {
        "album_b/song.wav": "is a directory",
        "arrays/block.npy": "is a directory",
    },
    "deleted between listing and reading": {
        "album_c/vanishing.flac": "vanished|not found",
        "arrays/vanishing_array.npy": "vanished|not found",
    },
}
#: Usable when the folder is scanned, spoiled after a few training steps (deleted; truncated in place).
SPOILED = {"late/deleted_mid_run.npy": "during training .*file not found",
           "late/truncated_mid_run.npy": "during training .*truncated"}
#: Files that need an in-process patch to break at the right moment (a subprocess run leaves them out).
NEEDS_PATCH = set(BAD["deleted between listing and reading"])


@dataclass
class Mixed:
    folder: Path
    good: list[str]
    bad: dict[str, str] = field(default_factory=dict)  # rel -> expected reason pattern
    spoiled: dict[str, str] = field(default_factory=dict)


def tone(seconds: float, rate: int, seed: int, channels: int = 1, level: float = 0.3) -> np.ndarray:
    """A chord with a little noise, (samples, channels) float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    f0 = 110.0 * 2 ** (seed % 24 / 12)
    wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3)) + 0.05 * rng.standard_normal(t.size)
    wave = level * wave / np.abs(wave).max()
    return np.repeat(wave[:, None], channels, axis=1).astype(np.float32)


def write_audio(path: Path, wave: np.ndarray, rate: int, fmt: str | None = None, subtype: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, rate, format=fmt, subtype=subtype)
    return path


def cut(path: Path, fraction: float) -> None:
    data_bytes = path.read_bytes()
    path.write_bytes(data_bytes[: int(len(data_bytes) * fraction)])


def build_mixed_folder(folder: Path, patched: bool = True) -> Mixed:
    """38 good recordings, 25 (23 without `patched`) bad files and 2 to spoil during training."""
    good: list[str] = []
    rates, kinds = (22050, 44100, 16000), [("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_24"), ("ogg", "OGG", "VORBIS")]
    for i in range(24):  # 8 each of WAV, FLAC, OGG over three album folders, mono and stereo
        ext, fmt, subtype = kinds[i % 3]
        rel = f"album_{'abc'[i % 3]}/track_{i:02d}.{ext}"
        write_audio(folder / rel, tone(2.0, rates[i // 3 % 3], seed=i, channels=1 + i % 2), rates[i // 3 % 3], fmt, subtype)
        good.append(rel)
    # A WAV named .ogg: libsndfile reads files by their content, so it is a usable recording.
    write_audio(folder / "album_c/misnamed_wave.ogg", tone(2.0, 22050, seed=30), 22050, "WAV", "PCM_16")
    good.append("album_c/misnamed_wave.ogg")
    for path in write_mel_folder(folder / "arrays", n_files=11, frames=160, n_mels=N_MELS, sidecar=False):
        good.append(path.relative_to(folder).as_posix())
    for i in range(2):
        torch.save(torch.from_numpy(np.load(folder / "arrays/track_00.npy") + i), folder / f"arrays/tensor_{i}.pt")
        good.append(f"arrays/tensor_{i}.pt")
    (folder / "arrays/notes.txt").write_text("not audio, not an array, and not named as either: ignored\n")

    # Truncated audio: real files cut short (a copy or download that was interrupted).
    cut(write_audio(folder / "album_a/cut_wave.wav", tone(2.0, 22050, seed=40), 22050, "WAV", "PCM_16"), 0.5)
    cut(write_audio(folder / "album_b/cut_lossless.flac", tone(3.0, 44100, seed=41), 44100, "FLAC", "PCM_16"), 0.5)
    cut(write_audio(folder / "album_c/cut_vorbis.ogg", tone(4.0, 44100, seed=42, channels=2), 44100, "OGG", "VORBIS"), 0.6)
    # Not audio at all, with an audio name.
    (folder / "album_a/picture.wav").write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(1).bytes(2000))
    (folder / "album_b/readme.mp3").write_text("liner notes, saved with the wrong extension\n" * 20)
    (folder / "album_c/empty_audio.wav").write_bytes(b"")
    (folder / "arrays/empty_array.npy").write_bytes(b"")
    good_mel = np.load(folder / "arrays/track_01.npy")
    np.save(folder / "arrays/nan_values.npy", np.where(np.arange(160) == 77, np.nan, good_mel).astype(np.float32))
    np.save(folder / "arrays/inf_values.npy", np.where(np.arange(160) >= 100, np.inf, good_mel).astype(np.float32))
    np.save(folder / "arrays/transposed.npy", good_mel.T.copy())
    np.save(folder / "arrays/wrong_mels.npy", good_mel[:20])
    np.save(folder / "arrays/cube.npy", np.stack([good_mel, good_mel]))
    (folder / "arrays/garbage.pt").write_bytes(np.random.default_rng(2).bytes(3000))
    torch.save({"mel": torch.from_numpy(good_mel)}, folder / "arrays/not_tensor.pt")
    # Silence: 30 s of digital zeros, a hiss far below the silence margin, a flat array at the floor.
    write_audio(folder / "album_a/silence_30s.wav", np.zeros((30 * 22050, 1), np.float32), 22050, "WAV", "PCM_16")
    hiss = 3e-7 * np.random.default_rng(3).standard_normal((3 * 44100, 1))
    write_audio(folder / "album_b/hiss.flac", hiss.astype(np.float32), 44100, "FLAC", "PCM_24")
    np.save(folder / "arrays/flat.npy", np.full((N_MELS, 160), np.log(1e-5), np.float32))
    # Shorter than one segment of 32 frames.
    write_audio(folder / "album_c/blip.wav", tone(0.2, 22050, seed=50), 22050, "WAV", "PCM_16")
    np.save(folder / "arrays/stub.npy", good_mel[:, :10])
    os.symlink(folder / "album_a/moved_away.wav", folder / "album_a/dangling_audio.wav")
    os.symlink(folder / "arrays/moved_away.npy", folder / "arrays/dangling_array.npy")
    (folder / "album_b/song.wav").mkdir()
    (folder / "album_b/song.wav/cover.txt").write_text("a folder named like a recording\n")
    (folder / "arrays/block.npy").mkdir()
    bad = {rel: reason for kind in BAD.values() for rel, reason in kind.items()}
    if patched:
        write_audio(folder / "album_c/vanishing.flac", tone(2.0, 22050, seed=60), 22050, "FLAC", "PCM_16")
        np.save(folder / "arrays/vanishing_array.npy", good_mel)
    else:
        bad = {rel: reason for rel, reason in bad.items() if rel not in NEEDS_PATCH}
    for rel in SPOILED:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(folder / rel, np.load(folder / "arrays/track_02.npy") + 0.5)
    return Mixed(folder, sorted(good), bad, dict(SPOILED))


@pytest.fixture
def mixed(tmp_path: Path) -> Mixed:
    return build_mixed_folder(tmp_path / "music")


@pytest.fixture
def vanish_while_reading(monkeypatch, mixed: Mixed) -> None:
    """Delete one audio file right after it is listed and one array right before it is read."""
    list_audio, scan_array = cache.find_audio_files, recordings.scan_mel_file
    audio, array = mixed.folder / "album_c/vanishing.flac", mixed.folder / "arrays/vanishing_array.npy"

    def listing_then_delete(folder):
        found = list_audio(folder)
        audio.unlink(missing_ok=True)
        return found

    def delete_then_scan(path, *args, **kwargs):
        if Path(path) == array:
            array.unlink(missing_ok=True)
        return scan_array(path, *args, **kwargs)

    monkeypatch.setattr(cache, "find_audio_files", listing_then_delete)
    monkeypatch.setattr(recordings, "scan_mel_file", delete_then_scan)


def spoil_flags(mixed: Mixed) -> list[str]:
    # In tests/probes.py: the training subprocess imports it by its class path.
    spec = ('[{"class_path": "probes.SpoilDuringTraining", "init_args": '
            f'{{"delete": "{mixed.folder / "late/deleted_mid_run.npy"}", '
            f'"truncate": "{mixed.folder / "late/truncated_mid_run.npy"}"}}}}]')
    return ["--trainer.callbacks", spec]


def mentions(text: str, rel: str) -> int:
    """How often `rel` appears as a path (or the end of one) in `text`."""
    return len(re.findall(r"(?<![\w.-])" + re.escape(rel) + r"(?![\w.-])", text))


def lines_naming(text: str, rel: str) -> list[str]:
    return [line for line in text.splitlines() if mentions(line, rel)]


def check_report(text: str, mixed: Mixed) -> None:
    """Every bad (and spoiled) file named exactly once, with its reason; no good file named."""
    wrong = {}
    for rel, reason in {**mixed.bad, **mixed.spoiled}.items():
        lines = lines_naming(text, rel)
        if mentions(text, rel) != 1 or not re.search(reason, lines[0], re.IGNORECASE):
            wrong[rel] = lines
    assert not wrong, f"bad files not named exactly once with their reason: {wrong}\n--- report ---\n{text}"
    named_good = [rel for rel in mixed.good if mentions(text, rel)]
    assert not named_good, f"good files named in the report: {named_good}\n--- report ---\n{text}"


# --- unit-level: each layer survives its kind of bad file -------------------------------------------


@pytest.mark.parametrize("fmt, subtype, fraction", [("WAV", "PCM_16", 0.5), ("FLAC", "PCM_16", 0.5),
                                                    ("OGG", "VORBIS", 0.6), ("AIFF", "PCM_16", 0.5)])
def test_truncated_audio_is_refused_and_whole_audio_is_not(tmp_path, fmt, subtype, fraction):
    path = write_audio(tmp_path / f"a.{fmt.lower()}", tone(3.0, 44100, seed=1, channels=2), 44100, fmt, subtype)
    wave, rate = decode_audio(path)
    assert rate == 44100 and wave.shape == (3 * 44100,)
    cut(path, fraction)
    with pytest.raises(AudioError, match=r"a\.\w+: (truncated|cannot decode)") as err:
        decode_audio(path)
    assert str(err.value).count(path.name) == 1


def test_an_unfinished_wav_header_is_not_called_truncated(tmp_path):
    # Recorders that stream to disk may leave the data size at 0xFFFFFFFF: the samples are all there.
    # Others miscount by a few bytes. Neither is a cut file: every sample decodes.
    path = write_audio(tmp_path / "stream.wav", tone(1.0, 22050, seed=2), 22050, "WAV", "PCM_16")
    raw = bytearray(path.read_bytes())
    at = raw.index(b"data")
    for size in (0xFFFFFFFF, 2 * 22050 + 6):
        raw[at + 4 : at + 8] = size.to_bytes(4, "little")
        path.write_bytes(bytes(raw))
        assert decode_audio(path)[0].shape == (22050,)


def test_cache_reports_a_file_deleted_between_listing_and_reading_once(tmp_path, monkeypatch):
    folder = tmp_path / "music"
    for i in range(3):
        write_audio(folder / f"t{i}.wav", tone(1.0, 22050, seed=i), 22050)
    listing = cache.find_audio_files
    deleted = []

    def listing_then_delete(path):
        found = listing(path)
        if not deleted:  # the first build lists t1.wav, then it disappears
            (folder / "t1.wav").unlink()
            deleted.append(True)
        return found

    monkeypatch.setattr(cache, "find_audio_files", listing_then_delete)
    first = build_audio_cache(folder, tmp_path / "cache", MEL)
    assert [p for p, _ in first.problems] == [str(folder / "t1.wav")]
    # Training builds twice (prepare_data with every core, then setup): the second build, which
    # the report comes from, still names the file the first one lost; a third does not.
    second = build_audio_cache(folder, tmp_path / "cache", MEL)
    assert [p for p, _ in second.problems] == [str(folder / "t1.wav")]
    assert build_audio_cache(folder, tmp_path / "cache", MEL).problems == []
    assert [e.rel for e in second.entries] == ["t0.wav", "t2.wav"]


def test_cache_reports_a_file_deleted_while_the_pool_decodes_it(tmp_path, monkeypatch):
    folder = tmp_path / "music"
    for i in range(4):
        write_audio(folder / f"t{i}.wav", tone(1.0, 22050, seed=i), 22050)
    decode = cache_job.decode_blocks

    def delete_then_decode(path):
        if Path(path).name == "t2.wav":
            Path(path).unlink()
        return decode(path)

    monkeypatch.setattr(cache_job, "decode_blocks", delete_then_decode)  # forked workers inherit the patch
    first = build_audio_cache(folder, tmp_path / "cache", MEL, workers=2)
    assert first.problems == [(str(folder / "t2.wav"), "vanished after it was listed: file not found")]
    second = build_audio_cache(folder, tmp_path / "cache", MEL)
    assert second.problems == first.problems and len(second.entries) == 3
    assert build_audio_cache(folder, tmp_path / "cache", MEL).problems == []


def segment_dataset(folder: Path, n_files: int = 4) -> SegmentDataset:
    paths = write_mel_folder(folder, n_files=n_files, frames=64, n_mels=N_MELS, sidecar=False)
    items = np.array([(f, s, 0, 64) for f in range(n_files) for s in (0, 32)], dtype=np.int64)
    return SegmentDataset([str(p) for p in paths], items, FRAMES, N_MELS, Normalizer(), random_crop=False)


def test_dataset_survives_files_that_break_after_the_scan(tmp_path):
    dataset = segment_dataset(tmp_path / "m")
    before = [dataset[i] for i in range(len(dataset))]  # every file opened (memory-mapped)
    Path(dataset.paths[1]).unlink()  # deleted while mapped: its items now come from file 2
    with open(dataset.paths[3], "r+b") as handle:  # truncated while mapped: reading it would SIGBUS
        handle.truncate(200)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        after = [dataset[i] for i in range(len(dataset))] + [dataset[(i, 7)] for i in range(len(dataset))]
    text = "\n".join(str(w.message) for w in record)
    for index in (1, 3):
        assert text.count(Path(dataset.paths[index]).name) == 1, text
    assert "file not found" in text and "truncated" in text
    # Deterministic stand-ins: the next item of a readable file, at the same crop.
    assert torch.equal(after[2], before[4]) and torch.equal(after[3], before[4])
    assert torch.equal(after[6], before[0]) and torch.equal(after[7], before[0])
    assert all(torch.equal(after[i], before[i]) for i in (0, 1, 4, 5))
    assert all(torch.equal(a, b) for a, b in zip(after[8:], after[:8]))


def test_dataset_raises_only_when_no_file_is_readable(tmp_path):
    dataset = segment_dataset(tmp_path / "m", n_files=2)
    for path in dataset.paths:
        Path(path).unlink()
    with pytest.warns(UserWarning, match="not found"), pytest.raises(DataError, match="none of the 2 files"):
        dataset[0]


def test_a_file_changed_to_nan_after_the_scan_is_dropped(tmp_path):
    dataset = segment_dataset(tmp_path / "m")
    mel = np.load(dataset.paths[0])
    mel[:, 3] = np.nan
    np.save(dataset.paths[0], mel)
    with pytest.warns(UserWarning, match="track_00.npy: .*NaN or Inf"):
        assert torch.equal(dataset[0], dataset[2])
    assert torch.equal(dataset[1], dataset[2])  # the whole file is dropped, not only its NaN frames


def test_workers_share_what_they_found_bad(tmp_path):
    dataset = segment_dataset(tmp_path / "m")
    Path(dataset.paths[0]).unlink()
    # Worker 0 meets the deleted file in its first batch, worker 1 in its second.
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, sampler=[0, 1, 2, 3, 4, 5, 6, 0])
    batches = list(loader)
    assert len(batches) == 4 and all(torch.isfinite(b).all() for b in batches)
    assert torch.equal(batches[0][0], dataset[2]) and torch.equal(batches[3][1], dataset[2])
    assert dataset.unreadable_files() == [dataset.paths[0]]  # what the workers found, seen here


# --- the guarantee: training on the mixed folder ---------------------------------------------------


def test_a_warm_cache_names_the_same_bad_files_once_again(tmp_path):
    mixed = build_mixed_folder(tmp_path / "music", patched=False)
    reports = []
    for _ in range(2):  # cold: decodes every file; warm: the manifest's failures, nothing decoded
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            dm = MelDataModule(data_dir=str(mixed.folder), cache_dir=str(tmp_path / "cache"), mel=MEL,
                               frames=FRAMES, batch_size=8, val_split=0.2, prepare_workers=0)
            dm.prepare_data()
            dm.setup("fit")
        reports.append("\n".join(str(w.message) for w in record))
        check_report(reports[-1], Mixed(mixed.folder, mixed.good, mixed.bad))
        assert sorted(s.rel for s in dm.sources) == sorted(mixed.good + list(mixed.spoiled))
    assert reports[0] == reports[1]
    with pytest.raises(DataError, match="cut_wave.wav: truncated"):
        MelDataModule(data_dir=str(mixed.folder), cache_dir=str(tmp_path / "cache"), mel=MEL, frames=FRAMES,
                      on_bad_file="error").setup("fit")


@pytest.mark.slow
def test_training_on_a_mixed_folder_completes_and_names_each_bad_file_once(
    mixed: Mixed, vanish_while_reading, tmp_path, recwarn, capfd
):
    cli = cli_main(tiny_fit_args(tmp_path, "--data.data_dir", str(mixed.folder), "--data.prepare_workers", "2",
                                 *spoil_flags(mixed)))
    assert cli.trainer.current_epoch == 2 and not cli.trainer.interrupted
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    out, err = capfd.readouterr()
    text = "\n".join(str(w.message) for w in recwarn) + "\n" + out + "\n" + err
    check_report(text, mixed)
    trained = sorted(s.rel for s in cli.datamodule.sources)
    assert trained == sorted(mixed.good + list(mixed.spoiled))  # every good file, no bad one
    files = {int(f) for f in cli.datamodule.train_set.items[:, 0]} | {int(f) for f in cli.datamodule.val_set.items[:, 0]}
    assert len(files) == len(mixed.good) + len(mixed.spoiled)


@pytest.mark.slow
def test_train_script_on_a_mixed_folder_with_workers(tmp_path):
    mixed = build_mixed_folder(tmp_path / "music", patched=False)
    args = tiny_fit_args(tmp_path, "--data.data_dir", str(mixed.folder), "--data.num_workers", "2",
                         "--trainer.max_epochs", "1", *spoil_flags(mixed))
    result = train(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "training finished" in result.stdout + result.stderr
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    check_report(result.stdout + result.stderr, mixed)


class _Payload:
    """Unpickling this writes `marker`: what an object array in a crafted .npy would do to allow_pickle=True."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_a_mel_array_holding_python_objects_is_refused_and_never_unpickled(tmp_path):
    from musicvae.data.mel_arrays import scan_mel_file
    from musicvae.errors import DataError

    marker = tmp_path / "PWNED"
    path = tmp_path / "crafted.npy"
    np.save(path, np.array([[_Payload(str(marker))]], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=str(path)):
        scan_mel_file(path, "crafted.npy", 1, -11.5)
    assert not marker.exists()
    np.load(path, allow_pickle=True)  # the control: the payload is live
    assert marker.read_text() == "pwned"
