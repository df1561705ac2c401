"""Helpers shared by test modules in different folders (commands run in-process or in a child
process, kill/resume checks, audio)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
import soundfile as sf
import torch

from conftest import REPO, global_state_kept, load_script, tiny_fit_args

# ---- commands in this process -------------------------------------------------------------------
# A new interpreter costs 5-8 s of imports on the 2-core machine before a test does any work, so a
# command runs here, in the test's own process, as `python scripts/X.py ARGS` would run it: its exit
# status, and what it writes to stdout and stderr (Lightning's log lines and warnings included).
# conftest.global_state_kept puts back what the command changes for the whole process. A real
# process remains only where the process is the point (start_like_a_terminal, run_train, DDP).

#: Lightning's loggers: "lightning" has a console handler; the other two have one of their own
#: when the root logger had none at import (propagate is then off).
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


class _EachRecordOnce(logging.StreamHandler):
    """Installed on several loggers of one hierarchy: a record that propagates through two of them
    is written once."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.seen: list[logging.LogRecord] = []  # held, so no id is reused

    def emit(self, record: logging.LogRecord) -> None:
        if any(record is r for r in self.seen):
            return
        self.seen.append(record)
        super().emit(record)


@contextlib.contextmanager
def command_output(stdout: TextIO, stderr: TextIO) -> Iterator[None]:
    """What a command prints, logs (Lightning's INFO lines) and warns, into `stdout`/`stderr`, as a
    console would show it; pytest's own capture and warning recording see none of it."""
    handler = _EachRecordOnce(stderr)
    handler.setLevel(logging.INFO)
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.showwarning = show
            yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def exit_status(main: Callable[[], object]) -> int:
    """`main()`'s exit status as the interpreter would give it: SystemExit's code, 1 and a traceback
    on stderr for any other exception."""
    try:
        status = main()
    except SystemExit as stop:
        if stop.code is None:
            return 0
        if not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
            return 1
        return stop.code
    except Exception:  # noqa: BLE001 - the interpreter's own behaviour: print it, exit 1
        traceback.print_exc()
        return 1
    return status if isinstance(status, int) else 0


def _entry(script: str, args: Sequence[str]) -> Callable[[], object]:
    """`python scripts/SCRIPT.py ARGS` (script "train" is the training command; "musicvae" the umbrella)."""
    args = list(args)
    if script == "train":
        from musicvae.training.cli import subcommand_main

        return lambda: subcommand_main(args, program="python scripts/train.py")
    if script == "musicvae":
        from musicvae.commands import main

        return lambda: main(args)
    return lambda: load_script(script).main(args)


@contextlib.contextmanager
def console_output() -> Iterator[dict[str, str]]:
    """A command's console, at the file-descriptor level: what this process and the processes it
    forks (loader workers, decoders) write to stdout and stderr, as a terminal would show it.
    The texts are in the yielded dict ("stdout", "stderr") once the block has ended."""
    texts: dict[str, str] = {}
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out_file.fileno(), 1)
        os.dup2(err_file.fileno(), 2)
        stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        try:
            with command_output(stdout, stderr):
                yield texts
        finally:
            stdout.close(), stderr.close()  # flushed; fds 1 and 2 stay open (closefd=False)
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
        for name, handle in (("stdout", out_file), ("stderr", err_file)):
            handle.seek(0)
            texts[name] = handle.read().decode("utf-8", errors="replace")


def run_command(script: str, args: Sequence[str], env: dict | None = None, cwd: Path | None = None,
                threads: int | None = 1) -> subprocess.CompletedProcess:
    """`python scripts/SCRIPT.py ARGS` (or `musicvae ARGS` for "musicvae") run in this process.

    `threads`: torch's thread count for the run; 1 is what the subprocesses got (OMP_NUM_THREADS=1),
    and what exact-resume comparisons need on every side.
    """
    with global_state_kept():
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        if threads:
            torch.set_num_threads(threads)
        with console_output() as texts:
            status = exit_status(_entry(script, args))
    return subprocess.CompletedProcess([script, *args], status, texts["stdout"], texts["stderr"])


def train(args: Sequence[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python scripts/train.py ARGS` in this process."""
    return run_command("train", args, env=env, cwd=cwd)


# ---- commands in a forked child: runs that a signal ends ---------------------------------------
# A SIGKILL, a SIGTERM or a kill inside a checkpoint write ends the process it hits. os.fork gives
# a real process, with the imports already done: the run and its signal are real, the interpreter
# start is not paid again.

class Child:
    """A forked child running one command, with Popen's face (pid, poll, wait, communicate, returncode)."""

    def __init__(self, script: str, args: Sequence[str], env: dict | None = None) -> None:
        self.args = [script, *args]
        folder = Path(tempfile.mkdtemp(prefix="child-"))
        self._out, self._err = folder / "stdout", folder / "stderr"
        self.returncode: int | None = None
        self._texts: tuple[str, str] | None = None
        sys.stdout.flush(), sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            status = 1
            try:
                status = _child_main(script, list(args), env or {}, self._out, self._err)
            finally:
                os._exit(status)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        if self._texts is None:
            self._texts = self._out.read_text(errors="replace"), self._err.read_text(errors="replace")
            shutil.rmtree(self._out.parent, ignore_errors=True)
        return self._texts

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def result(self, timeout: float | None = 600) -> subprocess.CompletedProcess:
        out, err = self.communicate(timeout)
        return subprocess.CompletedProcess(self.args, self.returncode, out, err)


def _child_main(script: str, args: list[str], env: dict, out_path: Path, err_path: Path) -> int:
    """In the forked child: a fresh process's signal dispositions, output to files line by line (a
    killed child keeps what it wrote), then the command."""
    for path, fd in ((out_path, 1), (err_path, 2)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    stdout = open(1, "w", buffering=1, closefd=False)
    stderr = open(2, "w", buffering=1, closefd=False)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGCHLD):  # SIGPIPE stays ignored, as Python starts it
        signal.signal(signum, signal.SIG_DFL)
    os.environ.update(env)
    torch.set_num_threads(1)
    with command_output(stdout, stderr):
        status = exit_status(_entry(script, args))
    stdout.flush(), stderr.flush()
    return status


def train_in_child(args: Sequence[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`python scripts/train.py ARGS` in a forked child, waited for: for runs that a signal ends."""
    return Child("train", args, env).result()


#: Dropout and two loader workers on, so exactness covers worker prefetch and dropout masks;
#: a mid-epoch checkpoint every 4 of the 16 steps (2 epochs of 8).
EXACT_FLAGS = ["--model.dropout", "0.1", "--data.num_workers", "2", "--checkpoint_every_n_steps", "4"]


def run_train(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`python scripts/train.py ARGS` in a new process: only where Lightning must start more ranks from it (DDP)."""
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
