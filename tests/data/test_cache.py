"""The log-mel cache of an audio folder: reuse, invalidation, bad files, crashes and kills."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from musicvae.io import atomic

from musicvae.data import cache, cache_job, cache_workers
from musicvae.audio.mel_settings import MelSettings
from musicvae.data.cache import MANIFEST, CacheReport, build_audio_cache, cache_folder
from musicvae.data.mel_arrays import load_mel_array
from helpers import write_tone

MEL = MelSettings(n_mels=32)
GOOD = ["a.wav", "b.flac", "c.ogg", "sub/d.wav", "sub/deeper/e.WAV"]


def write_audio_folder(folder: Path, names: list[str] = GOOD) -> Path:
    for i, name in enumerate(names):
        write_tone(folder / name, seconds=0.5 + 0.25 * i, rate=(22050, 44100, 48000)[i % 3], freq=220.0 * (i + 1))
    (folder / "notes.txt").write_text("not audio, and not named as audio: ignored\n")
    return folder


@pytest.fixture
def audio_dir(tmp_path: Path) -> Path:
    return write_audio_folder(tmp_path / "music")


def build(audio_dir: Path, tmp_path: Path, mel: MelSettings = MEL, workers: int = 0) -> CacheReport:
    return build_audio_cache(audio_dir, tmp_path / "cache", mel, workers=workers)


def test_first_build_caches_every_file(audio_dir: Path, tmp_path: Path) -> None:
    report = build(audio_dir, tmp_path)
    assert [e.rel for e in report.entries] == sorted(GOOD)
    assert report.computed == len(GOOD) and report.reused == 0 and report.problems == []
    for entry in report.entries:
        array = load_mel_array(Path(entry.array), MEL.n_mels)  # memory-mapped as training opens it
        assert isinstance(array, np.memmap) and array.shape == (MEL.n_mels, entry.n_frames)
        assert entry.source == str(audio_dir / entry.rel)
        assert entry.sample_rate == sf.info(entry.source).samplerate
        assert entry.duration == pytest.approx(sf.info(entry.source).duration)
    assert report.seconds_of_audio == pytest.approx(sum(e.duration for e in report.entries))
    folder = cache_folder(tmp_path / "cache", audio_dir, MEL)
    assert Path(report.entries[0].array).is_relative_to(folder)
    assert MelSettings.from_dict(json.loads((folder / "mel.json").read_text())) == MEL
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest["entries"]) == set(GOOD) and manifest["mel"] == MEL.to_dict()
    assert not list(audio_dir.rglob("*.npy"))  # the music folder is only read


def test_second_build_reuses_everything(audio_dir: Path, tmp_path: Path, monkeypatch) -> None:
    first = build(audio_dir, tmp_path)
    monkeypatch.setattr(cache_job, "decode_blocks", lambda *a: pytest.fail("a warm build decoded a file"))
    second = build(audio_dir, tmp_path)
    assert second.computed == 0 and second.reused == len(GOOD)
    assert second.entries == first.entries


def test_changed_file_alone_is_recomputed(audio_dir: Path, tmp_path: Path) -> None:
    first = {e.rel: e for e in build(audio_dir, tmp_path).entries}
    stat = os.stat(audio_dir / "a.wav")
    os.utime(audio_dir / "a.wav", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
    assert build(audio_dir, tmp_path).computed == 1
    write_tone(audio_dir / "sub/d.wav", seconds=2.0)  # rewritten, longer
    report = build(audio_dir, tmp_path)
    assert report.computed == 1 and report.reused == len(GOOD) - 1
    entry = {e.rel: e for e in report.entries}["sub/d.wav"]
    assert entry.n_frames > first["sub/d.wav"].n_frames
    assert np.load(entry.array).shape == (MEL.n_mels, entry.n_frames)


def test_changed_mel_settings_use_a_new_folder(audio_dir: Path, tmp_path: Path) -> None:
    build(audio_dir, tmp_path)
    other = MelSettings(n_mels=16)
    report = build(audio_dir, tmp_path, mel=other)
    assert report.computed == len(GOOD) and report.reused == 0
    assert cache_folder(tmp_path / "cache", audio_dir, other) != cache_folder(tmp_path / "cache", audio_dir, MEL)
    assert all(np.load(e.array).shape[0] == 16 for e in report.entries)
    assert build(audio_dir, tmp_path).computed == 0  # the first settings' cache is still there


def test_removed_file_drops_its_entry_and_array(audio_dir: Path, tmp_path: Path) -> None:
    array = {e.rel: e for e in build(audio_dir, tmp_path).entries}["b.flac"].array
    (audio_dir / "b.flac").unlink()
    report = build(audio_dir, tmp_path)
    assert "b.flac" not in [e.rel for e in report.entries] and not Path(array).exists()


def write_bad_files(folder: Path) -> dict[str, str]:
    """Every kind of unusable recording, with a word its reason must contain."""
    (folder / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    flac = write_tone(folder / "truncated.flac", seconds=2.0).read_bytes()
    (folder / "truncated.flac").write_bytes(flac[: len(flac) // 2])
    (folder / "text.mp3").write_text("this is not an mp3\n" * 50)
    (folder / "empty.ogg").write_bytes(b"")
    sf.write(folder / "silent.wav", np.zeros((22050, 2), np.float32), 22050)
    (folder / "dangling.flac").symlink_to(folder / "nowhere.flac")
    (folder / "folder.wav").mkdir()
    return {"corrupt.wav": "decode", "truncated.flac": "decode", "text.mp3": "decode", "empty.ogg": "empty",
            "silent.wav": "silent", "dangling.flac": "symbolic link", "folder.wav": "directory"}


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_reported_once_and_good_ones_cached(audio_dir: Path, tmp_path: Path, workers: int,
                                                          monkeypatch) -> None:
    bad = write_bad_files(audio_dir)
    report = build(audio_dir, tmp_path, workers=workers)
    assert [e.rel for e in report.entries] == sorted(GOOD)
    paths = [path for path, _ in report.problems]
    assert sorted(paths) == sorted(str(audio_dir / name) for name in bad)  # each exactly once
    for path, reason in report.problems:
        assert bad[Path(path).name] in reason, (path, reason)
    # A warm run reports the same problems from the manifest, without decoding anything again.
    monkeypatch.setattr(cache_job, "decode_blocks", lambda *a: pytest.fail("a warm build decoded a file"))
    again = build(audio_dir, tmp_path)
    assert again.computed == 0 and again.problems == report.problems
    failures = json.loads((cache_folder(tmp_path / "cache", audio_dir, MEL) / MANIFEST).read_text())["failures"]
    assert set(failures) == {"corrupt.wav", "truncated.flac", "text.mp3", "empty.ogg", "silent.wav"}


def test_fixed_file_is_retried(audio_dir: Path, tmp_path: Path) -> None:
    (audio_dir / "later.wav").write_bytes(b"garbage" * 100)
    assert len(build(audio_dir, tmp_path).problems) == 1
    write_tone(audio_dir / "later.wav")
    report = build(audio_dir, tmp_path)
    assert report.problems == [] and report.computed == 1 and len(report.entries) == len(GOOD) + 1


_prepare_one = cache_job.prepare_one


def _crash_on_c(job):
    """Kills its worker process on c.ogg. Module level: jobs go to workers pickled by name."""
    if job[1] == "c.ogg":
        os._exit(1)
    return _prepare_one(job)


def test_crashing_worker_loses_only_its_file(audio_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A codec that kills its process (segfault, out of memory) costs one file, not the build."""
    monkeypatch.setattr(cache_workers, "prepare_one", _crash_on_c)  # forked workers inherit the patch
    report = build(audio_dir, tmp_path, workers=2)
    assert [e.rel for e in report.entries] == sorted(set(GOOD) - {"c.ogg"})
    assert [path for path, _ in report.problems] == [str(audio_dir / "c.ogg")]
    assert "crashed" in report.problems[0][1]


def test_parallel_and_in_process_builds_agree(audio_dir: Path, tmp_path: Path) -> None:
    serial = build_audio_cache(audio_dir, tmp_path / "serial", MEL, workers=0)
    parallel = build_audio_cache(audio_dir, tmp_path / "parallel", MEL, workers=2)
    assert [(e.rel, e.n_frames) for e in serial.entries] == [(e.rel, e.n_frames) for e in parallel.entries]
    for a, b in zip(serial.entries, parallel.entries):
        np.testing.assert_allclose(np.load(a.array), np.load(b.array), atol=1e-4)


def test_leftovers_of_a_kill_are_ignored_and_cleaned(audio_dir: Path, tmp_path: Path) -> None:
    build(audio_dir, tmp_path)
    folder = cache_folder(tmp_path / "cache", audio_dir, MEL)
    dead = folder / "arrays" / f".a.wav.npy.4194305@{atomic.HOST}.tmp"  # above any pid_max: its writer is gone
    dead.write_bytes(b"half an array")
    old = folder / "arrays" / ".b.flac.npy.123@otherhost.tmp"
    old.write_bytes(b"half an array")
    os.utime(old, (0, 0))  # written by another host long ago
    live = folder / "arrays" / ".c.ogg.npy.123@otherhost.tmp"
    live.write_bytes(b"being written on another host right now")
    (folder / MANIFEST).write_text('{"entries": {"a.wav"')  # a manifest cut short is rebuilt
    report = build(audio_dir, tmp_path)
    assert report.computed == len(GOOD) and all(not e.array.endswith(".tmp") for e in report.entries)
    assert not dead.exists() and not old.exists() and live.exists()


def test_missing_array_is_recomputed(audio_dir: Path, tmp_path: Path) -> None:
    entry = build(audio_dir, tmp_path).entries[0]
    os.unlink(entry.array)
    report = build(audio_dir, tmp_path)
    assert report.computed == 1 and Path(report.entries[0].array).exists()


def test_missing_data_dir_is_a_data_error(tmp_path: Path) -> None:
    from musicvae.errors import DataError

    with pytest.raises(DataError, match="does not exist"):
        build(tmp_path / "nowhere", tmp_path)


def test_moved_folder_gets_its_own_cache(audio_dir: Path, tmp_path: Path) -> None:
    build(audio_dir, tmp_path)
    moved = shutil.copytree(audio_dir, tmp_path / "copy")
    assert build(moved, tmp_path).computed == len(GOOD)


def test_a_decoder_that_hangs_is_killed_after_the_timeout_and_reported(tmp_path, monkeypatch):
    """Each file decodes in a process of its own; one stuck with every signal blocked (so no
    Python-level alarm could stop it) is killed at the timeout and reported like a bad file."""
    import signal
    import time

    import soundfile as sf

    from musicvae.audio.decode import decode_blocks

    music = tmp_path / "music"
    music.mkdir()
    rate = 22050
    for name in ("good_a", "stuck", "good_b"):
        sf.write(music / f"{name}.wav", (0.1 * np.sin(np.arange(rate * 2) * 0.05)).astype(np.float32), rate)

    def hanging_decode(path, *args, **kwargs):
        if "stuck" in str(path):
            signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
            while True:
                time.sleep(1)
        return decode_blocks(path, *args, **kwargs)

    monkeypatch.setattr(cache_job, "decode_blocks", hanging_decode)  # forked decoding processes inherit it
    started = time.monotonic()
    report = cache.build_audio_cache(music, tmp_path / "cache", MelSettings(n_mels=32), workers=2, decode_timeout=3)
    assert time.monotonic() - started < 60
    assert sorted(Path(e.rel).stem for e in report.entries) == ["good_a", "good_b"]
    [(path, reason)] = report.problems
    assert path.endswith("stuck.wav") and "decoding took longer than 3 s (--data.decode_timeout)" in reason
    # A hung decoder is the file's fault (unlike running out of memory): remembered, not tried again.
    again = cache.build_audio_cache(music, tmp_path / "cache", MelSettings(n_mels=32), workers=2, decode_timeout=3)
    assert again.reused == 3 and again.computed == 0 and again.problems == report.problems


# --- failures that are not the file's fault ------------------------------------------------------

def _decoder_failing_on(name: str, failure):
    """cache_job.decode_blocks, calling `failure()` instead for the file `name`."""
    decode = cache_job.decode_blocks

    def patched(path):
        if Path(path).name == name:
            failure()
        return decode(path)

    return patched


def _numpy_out_of_memory():
    np.empty(1 << 62, np.uint8)  # numpy's MemoryError, as a real allocation raises it


def _torch_out_of_memory():
    torch.empty(1 << 62, dtype=torch.uint8)  # torch's CPU allocator raises a RuntimeError


@pytest.mark.parametrize("failure", [_numpy_out_of_memory, _torch_out_of_memory], ids=["numpy", "torch"])
def test_running_out_of_memory_is_retried_and_recorded_after_three_builds(audio_dir, tmp_path, monkeypatch, failure):
    monkeypatch.setattr(cache_job, "decode_blocks", _decoder_failing_on("b.flac", failure))
    folder = cache_folder(tmp_path / "cache", audio_dir, MEL)
    for attempt in range(1, cache.MAX_RETRIES):
        report = build(audio_dir, tmp_path)
        [(path, reason)] = report.problems
        assert path == str(audio_dir / "b.flac") and reason.startswith("out of memory"), reason
        assert f"the next run tries it again ({attempt} of {cache.MAX_RETRIES} tries)" in reason
        assert report.computed == (len(GOOD) if attempt == 1 else 1)  # tried again; the others reused
        manifest = json.loads((folder / MANIFEST).read_text())
        assert "b.flac" not in manifest["failures"] and manifest["retries"]["b.flac"]["count"] == attempt
    report = build(audio_dir, tmp_path)  # the third build in a row: this file exhausts memory by itself
    [(_, reason)] = report.problems
    assert reason.startswith("out of memory") and "in 3 builds in a row; not tried again until the file changes" in reason
    monkeypatch.setattr(cache_job, "decode_blocks", lambda *a: pytest.fail("a recorded failure was decoded again"))
    assert build(audio_dir, tmp_path).problems == report.problems
    monkeypatch.undo()
    write_tone(audio_dir / "b.flac", seconds=1.0)  # a new version of the file is tried again
    assert build(audio_dir, tmp_path).problems == []


def _killed_on_b(job):
    """SIGKILLs its process on b.flac, as the kernel's OOM killer would. Module level: pickled by name."""
    if job[1] == "b.flac":
        os.kill(os.getpid(), signal.SIGKILL)
    return _prepare_one(job)


@pytest.mark.parametrize("timeout", [None, 60.0], ids=["pool", "process-per-file"])
def test_a_decoder_killed_from_outside_is_retried_not_recorded(audio_dir, tmp_path, monkeypatch, timeout):
    """SIGKILL comes from outside the process (the OOM killer): not the file's fault. Any other
    death is the codec's on this file (test_crashing_worker_loses_only_its_file)."""
    monkeypatch.setattr(cache_workers, "prepare_one", _killed_on_b)  # forked processes inherit the patch
    report = build_audio_cache(audio_dir, tmp_path / "cache", MEL, workers=2, decode_timeout=timeout)
    assert [e.rel for e in report.entries] == sorted(set(GOOD) - {"b.flac"})
    [(path, reason)] = report.problems
    assert path == str(audio_dir / "b.flac") and "killed (SIGKILL" in reason and "(1 of 3 tries)" in reason
    monkeypatch.undo()
    report = build(audio_dir, tmp_path)
    assert report.problems == [] and report.computed == 1


def _interrupted_on_b(job):
    if job[1] == "b.flac":
        raise KeyboardInterrupt
    return _prepare_one(job)


def test_ctrl_c_in_a_decoding_process_is_not_recorded(audio_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_workers, "prepare_one", _interrupted_on_b)
    report = build_audio_cache(audio_dir, tmp_path / "cache", MEL, workers=2, decode_timeout=60.0)
    assert report.problems == [(str(audio_dir / "b.flac"), "its decoding was interrupted (Ctrl-C); the next run "
                                                           "tries it again")]
    monkeypatch.undo()
    report = build(audio_dir, tmp_path)
    assert report.problems == [] and report.computed == 1


def test_ctrl_c_in_process_stops_the_build_and_records_nothing(audio_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_job, "decode_blocks", _decoder_failing_on("b.flac", lambda: (_ for _ in ()).throw(KeyboardInterrupt)))
    with pytest.raises(KeyboardInterrupt):
        build(audio_dir, tmp_path)
    manifest = json.loads((cache_folder(tmp_path / "cache", audio_dir, MEL) / MANIFEST).read_text())
    assert list(manifest["entries"]) == ["a.wav"] and manifest["failures"] == {}  # the work before it is kept
    monkeypatch.undo()
    report = build(audio_dir, tmp_path)
    assert report.problems == [] and report.computed == len(GOOD) - 1


# --- long recordings -----------------------------------------------------------------------------

def test_a_long_log_mel_is_written_in_pieces_equal_to_the_whole(audio_dir, tmp_path, monkeypatch):
    whole = {e.rel: np.load(e.array) for e in build(audio_dir, tmp_path).entries}
    opened = []
    open_memmap = np.lib.format.open_memmap
    monkeypatch.setattr(np.lib.format, "open_memmap", lambda *a, **k: opened.append(a[0]) or open_memmap(*a, **k))
    monkeypatch.setattr(cache_job, "_IN_MEMORY_BYTES", 4096)  # every array here is "long": 32 frames in memory
    report = build_audio_cache(audio_dir, tmp_path / "pieces", MEL)
    for entry in report.entries:
        array = np.load(entry.array)
        assert array.flags.c_contiguous
        np.testing.assert_array_equal(array, whole[entry.rel])
    assert len(opened) > 2 * len(GOOD)  # each array created, then filled piece by piece
    assert not list((tmp_path / "pieces").rglob("*.tmp"))  # no scratch file left


def test_a_full_disk_while_a_long_array_is_written_stops_the_build_and_records_nothing(audio_dir, tmp_path,
                                                                                      monkeypatch):
    from musicvae.io.storage import StorageError

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_job, "_IN_MEMORY_BYTES", 4096)
    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(StorageError, match="no space left on the device of"):
        build(audio_dir, tmp_path)
    folder = cache_folder(tmp_path / "cache", audio_dir, MEL)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["failures"] == {} and manifest["retries"] == {}
    assert not list(folder.rglob("*.tmp"))
    monkeypatch.undo()
    assert build(audio_dir, tmp_path).problems == []
