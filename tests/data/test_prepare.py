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

from conftest import load_script
from musicvae.audio.mel import MelSettings
from musicvae.data.cache import MANIFEST, build_audio_cache, cache_folder
from musicvae.data.segments import load_mel_array
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
from musicvae.data import cache
from musicvae.audio.mel import MelSettings
cache._SAVE_EVERY_S = 0.0  # save the manifest after every file
done = []
real = cache._prepare_one
def prepare_then_die(job):
    if len(done) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    done.append(job)
    return real(job)
cache._prepare_one = prepare_then_die
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
