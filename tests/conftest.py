"""Shared fixtures: tiny synthetic mel folders and one tiny trained run shared by the session."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from musicvae.audio.mel import MelSettings

REPO = Path(__file__).resolve().parents[1]

#: A tiny mel setting: 16 bins keep arrays and models small; still a valid STFT setting.
TINY_MEL = MelSettings(n_mels=16)

#: CLI flags of a tiny model on tiny synthetic data: trains 2 epochs in seconds on 2 cores.
TINY_FLAGS = [
    "--data.synthetic_pieces", "10",
    "--data.synthetic_seconds", "3",
    "--data.mel.n_mels", "32",
    "--data.frames", "32",
    "--data.batch_size", "8",
    "--data.val_split", "0.2",
    "--model.channels", "[8, 16]",
    "--model.latent_dim", "8",
    "--model.lr", "1e-3",
    "--trainer.max_epochs", "2",
    "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]


@pytest.fixture(autouse=True, scope="session")
def private_default_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The default cache (~/.cache/musicvae) is the user's: runs that use it (a resume takes no cache
    folder from a checkpoint) write under the suite's own temporary folder instead."""
    os.environ["MUSICVAE_CACHE"] = str(tmp_path_factory.mktemp("default_cache"))


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread_per_test_process() -> None:
    """Under pytest-xdist (`make test`: as many test processes as cores), each process's training
    and Griffin-Lim run on one thread, as the suite's subprocesses do (OMP_NUM_THREADS=1): two
    threads per process would only make the processes wait on each other for the same cores."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) >= (os.cpu_count() or 1):
        torch.set_num_threads(1)


#: Handlers a command or Lightning sets (Ctrl-C, SIGTERM, SIGCHLD for loader workers, ...).
SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGCHLD", "SIGHUP", "SIGUSR1", "SIGUSR2",
                                                  "SIGPIPE") if hasattr(signal, name))


@contextlib.contextmanager
def global_state_kept() -> Iterator[None]:
    """Puts back what a command run in this process changes for the whole process.

    A command owns its process: cli_main adds warning filters, sets environment variables
    (PL_GLOBAL_SEED from seed_everything, JSONARGPARSE_DEPRECATION_WARNINGS), installs signal
    handlers (Ctrl-C, SIGTERM, loader workers' SIGCHLD), and limits jsonargparse's YAML loader;
    benchmark-quality turns autograd off for its process; a test may change the working directory
    or torch's thread count. Run in-process, each of these would leak into the next test; this
    restores them all, with torch's other process-wide switches (default dtype, matmul precision,
    deterministic algorithms).
    """
    from jsonargparse import _loaders_dumpers as loading  # set_loader keeps one loader per mode, process-wide

    loader_tables = [(table, dict(table)) for table in (loading.loaders, loading.loader_exceptions,
                                                         loading.loader_json_superset, loading.loader_params)]
    filters = list(warnings.filters)
    environ = dict(os.environ)
    handlers = {signum: signal.getsignal(signum) for signum in SIGNALS}
    cwd = os.getcwd()
    threads = torch.get_num_threads()
    torch_switches = (torch.is_grad_enabled(), torch.get_default_dtype(), torch.get_float32_matmul_precision(),
                      torch.are_deterministic_algorithms_enabled())
    argv = list(sys.argv)
    try:
        yield
    finally:
        warnings.filters[:] = filters
        warnings._filters_mutated()  # each module's "shown once" registry starts anew, as in a new process
        os.environ.clear()
        os.environ.update(environ)
        for signum, handler in handlers.items():
            if handler is not None:  # None: set outside Python, cannot be put back from here
                signal.signal(signum, handler)
        os.chdir(cwd)
        torch.set_num_threads(threads)
        torch.set_grad_enabled(torch_switches[0])
        torch.set_default_dtype(torch_switches[1])
        torch.set_float32_matmul_precision(torch_switches[2])
        torch.use_deterministic_algorithms(torch_switches[3])
        for table, saved in loader_tables:
            table.clear()
            table.update(saved)
        sys.argv[:] = argv


@pytest.fixture(autouse=True, scope="module")
def restore_global_state_per_module() -> Iterator[None]:
    """Each module, so a module fixture that trains in-process leaves nothing to the next module."""
    with global_state_kept():
        yield


@pytest.fixture(autouse=True)
def restore_global_state() -> Iterator[None]:
    """Every test, so an in-process command (cli_main, a command's main) leaves nothing behind."""
    with global_state_kept():
        yield


def write_mel_folder(folder: Path, n_files: int = 8, frames: int = 64, n_mels: int = 16, seed: int = 0,
                     sidecar: bool = True, offset: float = 0.0) -> list[Path]:
    """Write `n_files` structured log-mel arrays (a moving harmonic stack over a floor) as .npy."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_files):
        mel = np.full((n_mels, frames), np.log(1e-5), dtype=np.float32)
        t = np.arange(frames)
        for harmonic in range(1, 4):
            bins = (2 + harmonic * 3 + (t // 8 + i) % 3) % n_mels
            mel[bins, t] = 2.0 - harmonic + rng.normal(0, 0.1, frames)
        mel += offset
        path = folder / f"track_{i:02d}.npy"
        np.save(path, mel)
        paths.append(path)
    if sidecar:
        (folder / "mel.json").write_text(json.dumps(MelSettings(n_mels=n_mels).to_dict()))
    return paths


@pytest.fixture
def mel_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mels"
    write_mel_folder(folder)
    return folder


def tiny_fit_args(root: Path, *extra: str) -> list[str]:
    """`fit` arguments for a tiny run whose cache, checkpoints and logs all live under `root`."""
    return [
        "fit",
        *TINY_FLAGS,
        "--data.cache_dir", str(root / "cache"),
        "--checkpoint_dir", str(root / "ckpt"),
        "--trainer.logger.init_args.save_dir", str(root / "logs"),
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny model trained for 2 epochs through the real CLI, shared by every test that needs one."""
    from musicvae.training.cli import cli_main

    root = tmp_path_factory.mktemp("tiny_run")
    with global_state_kept():
        cli = cli_main(tiny_fit_args(root))
    return {
        "root": root,
        "ckpt_dir": root / "ckpt",
        "log_dir": Path(cli.trainer.log_dir),
        "cache_dir": root / "cache",
        "datamodule": cli.datamodule,
    }


@pytest.fixture(scope="session")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run every interrupted one is compared with (tests/helpers.py's EXACT_FLAGS)."""
    from helpers import fit_args, train

    root = tmp_path_factory.mktemp("straight")
    cache = root / "cache"
    result = train(fit_args(root, cache))
    assert result.returncode == 0, result.stderr[-2000:]
    return {"cache": cache, "last": root / "ckpt" / "last.ckpt"}


def load_script(name: str):
    """The command module behind scripts/NAME.py (`musicvae NAME`), to call its main() in-process."""
    from musicvae.commands import COMMANDS

    return importlib.import_module(COMMANDS[name.replace("_", "-")].target.split(":")[0])


@pytest.fixture(scope="module")
def one_thread():
    """Griffin-Lim's many small FFTs ran 3-7x slower with 2 OpenMP threads than with 1 on a busy
    2-core machine (the threads wait on each other); one thread changes no result."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: charactr/vocos-mel-24khz's config.yaml as published (the same as vocos' configs/vocos.yaml model part).
VOCOS_CONFIG = """\
feature_extractor:
  class_path: vocos.feature_extractors.MelSpectrogramFeatures
  init_args:
    sample_rate: 24000
    n_fft:        1024 # 42.66 msec
    hop_length:    256 # 10.66 msec, 3/4 overlap
    n_mels:        100
    padding:    center

backbone:
  class_path: vocos.models.VocosBackbone
  init_args:
    input_channels: 100
    dim: 512
    intermediate_dim: 1536
    num_layers: 8

head:
  class_path: vocos.heads.ISTFTHead
  init_args:
    dim: 512
    n_fft: 1024
    hop_length: 256
    padding: center
"""


def write_vocos_download(folder: Path, config: str = VOCOS_CONFIG, seed: int = 0) -> Path:
    """A Vocos download laid out as Hugging Face serves it (config.yaml, pytorch_model.bin), with
    randomly initialised weights of the architecture `config` describes: nothing is downloaded."""
    from vocos import Vocos

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Vocos.from_hparams(str(folder / "config.yaml"))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="session")
def vocos_download(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real vocos-mel-24khz architecture (13.5M parameters, 54 MB of weights), randomly initialised."""
    return write_vocos_download(tmp_path_factory.mktemp("vocos") / "vocos-mel-24khz")
