"""Helpers shared by test modules in different folders (subprocess runs, kill/resume checks, audio)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import REPO, tiny_fit_args


def run_script(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


#: Dropout and two loader workers on, so exactness covers worker prefetch and dropout masks;
#: a mid-epoch checkpoint every 4 of the 16 steps (2 epochs of 8).
EXACT_FLAGS = ["--model.dropout", "0.1", "--data.num_workers", "2", "--checkpoint_every_n_steps", "4"]


def run_train(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests"), **(env or {})}
    return subprocess.run([sys.executable, "scripts/train.py", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=600)


def fit_args(root: Path, cache: Path, *extra: str) -> list[str]:
    args = tiny_fit_args(root, *EXACT_FLAGS, *extra)
    return [a if a != str(root / "cache") else str(cache) for a in args]  # one shared cache


def start_like_a_terminal(args: list[str]) -> subprocess.Popen:
    """scripts/train.py in a process group of its own, SIGINT at its default whatever pytest's is
    (a background shell job inherits SIGINT ignored, and a test would then pass for that reason)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    return subprocess.Popen([sys.executable, "scripts/train.py", *args], cwd=REPO, env=environment, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(marker: Path, proc: subprocess.Popen) -> int:
    """The pid in `marker`, once the run has written it (WaitAtStep)."""
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    return int(marker.read_text())


def sigint_ignored(pid: int) -> bool:
    mask = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask.split()[1], 16) & (1 << (signal.SIGINT - 1)))


#: The adversarial stage over the tiny flags (tests/training/test_adversarial.py, test_storage_faults.py).
SHARP = str(REPO / "configs" / "sharp.yaml")
#: 8 batches per epoch, 2 epochs: 16 batches = 32 optimizer steps; the decoder answers the
#: discriminator from optimizer step 10 (batch 5); a mid-epoch last.ckpt every 4 optimizer steps.
START = 10
STAGE_FLAGS = ["--model.disc_channels", "[8, 16]", "--model.adv_start_step", str(START), "--trainer.max_epochs", "2",
               "--trainer.max_steps", "-1", "--checkpoint_every_n_steps", "4", "--model.dropout", "0.1",
               "--data.num_workers", "2", "--monitor", "val/realism_differences"]

def stage_args(root: Path, init: Path, cache: Path, *extra: str) -> list[str]:
    """`fit` of the adversarial stage: configs/sharp.yaml over the tiny flags, from `init`'s weights."""
    from conftest import TINY_FLAGS

    return ["fit", "--config", SHARP, *TINY_FLAGS, *STAGE_FLAGS, "--data.cache_dir", str(cache),
            "--checkpoint_dir", str(root / "ckpt"), "--trainer.logger.init_args.save_dir", str(root / "logs"),
            "--model.init_from", str(init), *extra]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def signal_probe(step: int, name: str) -> list[str]:
    return ["--trainer.callbacks+=probes.SignalAtStep", "--trainer.callbacks.step", str(step),
            "--trainer.callbacks.signal", name]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The uninterrupted run every interrupted one is compared with."""
    root = tmp_path_factory.mktemp("straight")
    cache = root / "cache"
    result = run_train(fit_args(root, cache))
    assert result.returncode == 0, result.stderr[-2000:]
    return {"cache": cache, "last": root / "ckpt" / "last.ckpt"}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"



def write_tone(path: Path, seconds: float = 1.0, rate: int = 22050, freq: float = 440.0, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(round(seconds * rate)) / rate
    wave = np.repeat((0.3 * np.sin(2 * np.pi * freq * t))[:, None], channels, axis=1)
    sf.write(path, wave.astype(np.float32), rate, subtype="VORBIS" if path.suffix == ".ogg" else "PCM_16")
    return path
