"""Helpers shared by test modules in different folders (subprocess runs, kill/resume checks, audio)."""

from __future__ import annotations

import os
import subprocess
import sys
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
