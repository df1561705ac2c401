"""`scripts/prepare.py` end to end, and kills in the middle of a preparation."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import load_script
from musicvae.audio.mel import MelSettings
from musicvae.data.cache import MANIFEST, build_audio_cache, cache_folder
from musicvae.data.mel_arrays import load_mel_array
from helpers import run_command, write_tone

ROOT = Path(__file__).resolve().parents[2]
PREPARE = ROOT / "scripts" / "prepare.py"
MEL = MelSettings(n_mels=32)


prepare_main = load_script("prepare").main


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    """`python scripts/prepare.py ARGS`, in this process (tests/helpers.py)."""
    return run_command("prepare", args)


def write_collection(folder: Path, n: int, seconds: float = 3.0) -> list[Path]:
    return [write_tone(folder / f"album{i % 3}" / f"track{i:02d}.flac", seconds, rate=(22050, 44100)[i % 2],
                       freq=110.0 * (1 + i % 7), channels=2) for i in range(n)]


def assert_usable(report, n_good: int) -> None:
    """Every entry loads as a finite (n_mels, n_frames) array; no temporary file is an entry."""
    assert len(report.entries) == n_good and report.problems == []
    for entry in report.entries:
        assert not Path(entry.array).name.startswith(".") and entry.array.endswith(".npy")
        array = load_mel_array(Path(entry.array), MEL.n_mels)
        assert array.shape == (MEL.n_mels, entry.n_frames) and np.isfinite(array).all()


def test_help_explains_multi_gpu_preparation(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        prepare_main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "multi-GPU" in out and "timeout" in out and "--data.mel.n_mels" in out


@pytest.mark.slow
def test_prepare_prints_files_hours_and_segments(tmp_path: Path) -> None:
    audio, cache = tmp_path / "music", tmp_path / "cache"
    write_collection(audio, 4)
    (audio / "broken.wav").write_bytes(b"RIFF but nothing else")
    args = [str(audio), "--cache_dir", str(cache), "--workers", "2", "--n_mels", "32", "--frames", "32"]
    result = run_prepare(*args)
    assert result.returncode == 0, result.stderr
    # 3 s at 22050 Hz is 1 + 66150 // 256 = 259 frames: 8 segments of 32 frames per file.
    assert "files: 4 usable, 1 skipped (5 decoded now, 0 unchanged" in result.stdout
    assert "hours of audio: 0.003" in result.stdout and "segments: 32 of 32 frames" in result.stdout
    assert f"cache: {cache_folder(cache, audio, MEL)}" in result.stdout
    assert len(re.findall(r"skipped .*broken\.wav: cannot decode", result.stderr)) == 1
    again = run_prepare(*args, "--no_progress")
    assert "(0 decoded now, 5 unchanged since the last run)" in again.stdout
    assert again.stderr.count("broken.wav") == 1
    # Training finds the same cache without decoding anything.
    assert build_audio_cache(audio, cache, MEL).computed == 0


def test_prepare_fails_without_usable_audio(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "music").mkdir()
    (tmp_path / "music" / "x.mp3").write_text("no audio here")
    assert prepare_main([str(tmp_path / "music"), "--cache_dir", str(tmp_path / "cache"), "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert "no usable audio file" in err and "x.mp3: cannot decode" in err
    assert prepare_main([str(tmp_path / "nowhere"), "--cache_dir", str(tmp_path / "cache")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert prepare_main([str(tmp_path), "--n_mels", "0"]) == 2
    assert "n_mels=0" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_during_prepare_leaves_a_usable_cache(tmp_path: Path) -> None:
    audio, cache = tmp_path / "music", tmp_path / "cache"
    n = 40
    write_collection(audio, n, seconds=4.0)
    process = subprocess.Popen(
        [sys.executable, str(PREPARE), str(audio), "--cache_dir", str(cache), "--workers", "2",
         "--n_mels", "32", "--no_progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    arrays = cache_folder(cache, audio, MEL) / "arrays"
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline and not any(arrays.rglob("*.npy")):
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)  # the script and its workers, mid-write or not
    out, _ = process.communicate()
    assert process.returncode == -signal.SIGKILL and b"files:" not in out, "finished before the kill"
    report = build_audio_cache(audio, cache, MEL)
    assert_usable(report, n)
    assert not list(arrays.rglob("*.tmp"))  # the killed writers' temporaries were removed


KILL_AT_FOURTH = """
import os, signal, sys
from musicvae.data import cache, cache_workers
from musicvae.audio.mel_settings import MelSettings
cache._SAVE_EVERY_S = 0.0  # save the manifest after every file
done = []
real = cache_workers.prepare_one
def prepare_then_die(job):
    if len(done) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    done.append(job)
    return real(job)
cache_workers.prepare_one = prepare_then_die
cache.build_audio_cache(sys.argv[1], sys.argv[2], MelSettings(n_mels=32))
"""


@pytest.mark.slow
def test_work_saved_before_a_kill_is_reused(tmp_path: Path) -> None:
    audio, cache = tmp_path / "music", tmp_path / "cache"
    write_collection(audio, 6, seconds=1.0)
    result = subprocess.run([sys.executable, "-c", KILL_AT_FOURTH, str(audio), str(cache)],
                            cwd=ROOT, capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert (cache_folder(cache, audio, MEL) / MANIFEST).exists()
    report = build_audio_cache(audio, cache, MEL)
    assert (report.reused, report.computed) == (3, 3)
    assert_usable(report, 6)


def write_long_flac(path: Path, seconds: int, rate: int = 44100) -> Path:
    """A stereo FLAC written 10 s at a time: a tone that changes every block, over faint noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seconds)
    with sf.SoundFile(path, "w", rate, 2, subtype="PCM_16", format="FLAC") as out:
        for block in range(0, seconds, 10):
            t = np.arange(block * rate, min(seconds, block + 10) * rate) / rate
            tone = 0.2 * np.sin(2 * np.pi * 220.0 * 2 ** (block % 120 / 120) * t)[:, None] * [1.0, 0.8]
            out.write((tone + 1e-3 * rng.standard_normal((len(t), 2))).astype(np.float32))
    return path


#: A process that prepares one folder in-process and prints how far (kB) its peak resident memory rose above its imports.
PEAK_ABOVE_IMPORTS = """
import resource, sys
from musicvae.audio.mel import MelSettings
from musicvae.data.cache import build_audio_cache
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = build_audio_cache(sys.argv[1], sys.argv[2], MelSettings(), workers=0)
assert len(report.entries) == 1, report.problems
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in kB on Linux")
def test_preparation_memory_does_not_grow_with_the_recording_length(tmp_path):
    """A process of its own per length: peak memory is the process's. Before decoding, resampling and
    the STFT went block by block, the 8-minute FLAC peaked 740 MB above the 1-minute one (docs/data.md)."""
    rise = {}
    for minutes in (1, 8):
        folder = tmp_path / f"{minutes}min"
        write_long_flac(folder / "mix.flac", 60 * minutes)
        done = subprocess.run([sys.executable, "-c", PEAK_ABOVE_IMPORTS, str(folder), str(tmp_path / "cache")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        rise[minutes] = int(done.stdout.split()[-1]) / 1024  # MB
    # Measured: 7-11 MB (the 8-minute log-mel is written in pieces, the 1-minute one from memory).
    # Keeping the 8-minute log-mel whole would add 42 MB, its waveform 85 MB.
    assert rise[8] - rise[1] < 24, rise
