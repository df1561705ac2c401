"""Shared pieces of the training benchmark (scripts/bench.py): sizes, the machine, builders.

The sections are in musicvae/benchmarks/speed_throughput.py (Lightning overhead, arithmetic efficiency),
bench_data.py (the data path), bench_memory.py (private memory) and bench_report.py (the run
and its table); the timing loops they share are in musicvae/benchmarks/timing.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

GOAL_OVERHEAD = 0.03
GOAL_CONV_FRACTION = 0.30
GOAL_DATA_RATIO = 10.0
MB = 2**20


@dataclass(frozen=True)
class Sizes:
    """Everything --quick shrinks."""

    n_mels: int = 128
    frames: int = 128
    channels: tuple[int, ...] = (32, 64, 128, 256)
    latent_dim: int = 64
    batch_size: int = 32
    # Short repeats, many of them: on a shared machine another job slows some repeats down, and
    # medians stay put only while those are a minority.
    steps: int = 5  # training steps per timed repeat
    repeats: int = 15  # timed repeats per variant, after one warm-up
    synthetic_pieces: int = 72
    synthetic_seconds: float = 100.0  # 72 x 100 s = 2 h
    matmul_n: int = 2048
    matmul_reps: int = 8
    loader_batches: int = 100
    memory_loader_batches: int = 600  # > 3 epochs of 2.7 h of audio (184 batches each)
    memory_steps: int = 8
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    experiment_repeats: int = 5
    experiment_steps: int = 3


QUICK = Sizes(n_mels=32, frames=32, channels=(8, 16), latent_dim=8, batch_size=8, steps=3, repeats=2,
              synthetic_pieces=8, synthetic_seconds=6.0, matmul_n=256, matmul_reps=4, loader_batches=10,
              memory_loader_batches=10, memory_steps=2, experiment_repeats=1, experiment_steps=2)


def quiet() -> None:
    """Lightning's start-up banners and the data module's warnings (split mode, few workers)
    would drown the table; the bench reports what it measures itself."""
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def machine(device: torch.device) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "load_average_start": list(os.getloadavg()),
    }
    import lightning

    info["lightning"] = lightning.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                    # cuDNN convolutions use TF32 by default, float32 matmuls do not: both recorded.
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return info


def make_module(sizes: Sizes) -> Any:
    from musicvae.training.module import MusicVAEModule

    torch.manual_seed(0)
    return MusicVAEModule(n_mels=sizes.n_mels, frames=sizes.frames, latent_dim=sizes.latent_dim,
                          channels=list(sizes.channels))


def make_datamodule(args: argparse.Namespace, sizes: Sizes, num_workers: int = 0, data_dir: Optional[str] = None,
                    device_cache: bool = False) -> Any:
    from musicvae.audio.mel_settings import MelSettings
    from musicvae.data.datamodule import MelDataModule

    folder = data_dir or args.data_dir
    mel = MelSettings(n_mels=sizes.n_mels) if not (folder and (Path(folder) / "mel.json").exists()) else None
    return MelDataModule(data_dir=folder, cache_dir=args.cache_dir, frames=sizes.frames, batch_size=sizes.batch_size,
                         num_workers=num_workers, mel=mel, synthetic_pieces=sizes.synthetic_pieces,
                         synthetic_seconds=sizes.synthetic_seconds, prepare_workers=None, device_cache=device_cache)



def take_batches(loader: Any, count: int) -> list[torch.Tensor]:
    """The loader's first `count` batches, going round again when an epoch is shorter."""
    batches: list[torch.Tensor] = []
    while len(batches) < count:
        before = len(batches)
        for batch in loader:
            batches.append(batch)
            if len(batches) == count:
                break
        if len(batches) == before:
            raise RuntimeError("the training loader yields no batches")
    return batches


def project_callbacks(checkpoint_dir: Path) -> list[Any]:
    """The callbacks the command line adds to every fit (musicvae/training/run_callbacks.py), minus the
    checkpoint ones: the same list, so the benchmark times what a run pays."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from musicvae.training.run_callbacks import run_callbacks

    every = run_callbacks(subcommand="fit", checkpoint_dir=checkpoint_dir, monitor="val/loss", every_n_steps=0,
                          skip_nonfinite=0, run_config={}, run_id="benchmark", resumed_hparams=None, interrupt=False,
                          resume_hint="", logging=False, ema_decay=None, predict_dir=str(checkpoint_dir))
    return [cb for cb in every if not isinstance(cb, ModelCheckpoint)]