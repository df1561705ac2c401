"""Faults of the machine at a checkpoint write, through the real command: a full disk, a folder
remounted read-only, a deleted folder. Each stops training with one line (the folder, why, what is
kept) and exit status 4; nothing half-written is left behind. The disk is a real filesystem the
test mounts (tmpfs), so the full disk fails inside torch.save as it would for a user."""

from __future__ import annotations

import subprocess

import pytest
import torch

from helpers import fit_args, stage_args, train
from musicvae.training.checkpoints import RAW_WEIGHTS_KEY
from musicvae.io.storage import payload_bytes, size_text, write_fault

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs at tmp_path/disk (these machines run as root); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}): needs root in a "
                    "container that allows mounts")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


#: EMA on in every case (its checkpoints hold two weight sets); the read-only case is the adversarial stage
#: (two optimizer steps per batch: its fault at step 10 meets the write at step 12 inside epoch 0).
@pytest.mark.parametrize("action, stage, says", [
    ("fill", False, "no space left on the device of"),
    ("readonly", True, "is on a read-only filesystem now"),
    ("delete", False, "no longer exists (deleted or unmounted during the run)"),
], ids=["full-disk", "read-only-adversarial-stage", "deleted-folder"])
def test_a_refused_checkpoint_write_stops_with_one_line_and_status_4(tmp_path, straight, tiny_run, small_disk, action,
                                                                      stage, says):
    ckpt_dir = small_disk / "ckpt"
    if stage:
        args = stage_args(tmp_path, tiny_run["ckpt_dir"] / "best.ckpt", tiny_run["cache_dir"], "--data.num_workers", "0")
    else:
        args = fit_args(tmp_path, straight["cache"])
    args = [a if a != str(tmp_path / "ckpt") else str(ckpt_dir) for a in args]
    result = train([*args, "--model.ema_decay", "0.9", "--trainer.callbacks+=probes.DiskFaultAtStep",
                    "--trainer.callbacks.step", "10", "--trainer.callbacks.action", action, "--trainer.callbacks.folder",
                    str(ckpt_dir if action == "delete" else small_disk), "--trainer.callbacks.mount", str(small_disk)])
    assert result.returncode == 4, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("musicvae: error:")]
    assert says in line and f"Training stopped at step 12 (epoch {0 if stage else 1})" in line, line
    assert "Traceback" not in result.stderr
    if action == "delete":
        assert f"no checkpoint of this run remains there ({ckpt_dir} is gone)" in line
        return
    assert f"{ckpt_dir / 'last.ckpt'} (epoch 0, step 8) is kept" in line
    kept = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 8 and RAW_WEIGHTS_KEY in kept and len(kept["optimizer_states"]) == (2 if stage else 1)
    assert not [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]
    if action == "fill":
        assert f"needs about {size_text(payload_bytes(kept))}" in line


def test_write_fault_reads_errnos_and_the_folder(tmp_path):
    full = OSError(28, "No space left on device")
    assert "no space left" in write_fault(full, tmp_path, 10)
    assert write_fault(RuntimeError("a bug"), tmp_path, 10) is None
    assert "no space left" in write_fault(RuntimeError("unexpected pos"), tmp_path, 1 << 62)  # torch.save's, by free space
    assert "no longer exists" in write_fault(FileNotFoundError(2, "x"), tmp_path / "gone", 10)
    assert write_fault(FileNotFoundError(2, "x"), tmp_path / "gone", 10, existed=False) is None


def test_a_full_cache_disk_stops_preparation_and_a_rerun_continues(tmp_path, small_disk, capsys):
    """A full disk during preparation is the machine's fault, not the recordings': nothing is
    recorded as a bad file, the arrays written are kept, and a rerun with room finishes the rest."""
    import numpy as np
    import soundfile as sf

    from conftest import load_script
    from musicvae.audio.synth import render_piece

    music = tmp_path / "music"
    music.mkdir()
    for i in range(6):
        sf.write(music / f"song_{i}.wav", render_piece(i, seconds=20.0, sample_rate=22050), 22050)
    prepare = load_script("prepare")
    (small_disk / "filler").write_bytes(b"\0" * (15 * 1024 * 1024))  # leaves room for about two arrays
    status = prepare.main([str(music), "--data.cache_dir", str(small_disk / "cache"), "--workers", "0", "--no_progress"])
    assert status == 4
    err = capsys.readouterr().err
    assert "log-mel cache not written: no space left on the device of" in err and "continues from there" in err
    kept = len(list((small_disk / "cache").rglob("*.npy")))
    assert 0 < kept < 6
    (small_disk / "filler").unlink()
    status = prepare.main([str(music), "--data.cache_dir", str(small_disk / "cache"), "--workers", "0", "--no_progress"])
    assert status == 0
    arrays = sorted((small_disk / "cache").rglob("*.npy"))
    assert len(arrays) == 6 and all(np.load(a).shape[0] == 128 for a in arrays)
