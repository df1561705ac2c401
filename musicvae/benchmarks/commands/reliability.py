"""Fault training many times and check that every fault leaves a checkpoint that loads and resumes.

Each trial trains a tiny model on synthetic music in a subprocess (checkpointing every step) and,
at a uniformly random moment between the clean run's first checkpoint and its end, does one of:
- injected: SIGKILL halfway through a chosen checkpoint write (the fault plugin
  musicvae/benchmarks/faults.py, passed on the run's command line), the worst moment there is; random: SIGKILL to the whole
  process group;
- ctrl-c: SIGINT to the group, as a terminal sends it (the run must save and exit 130);
- disk-full: fills the checkpoint folder's disk (a tmpfs the script mounts: root only) until a
  write fails; read-only: remounts it read-only (the run must stop with one line, exit 4, no
  temporary file left; the resume runs once the disk is freed or writable again);
- dead-rank: SIGKILL to rank 1 of a 2-process (gloo) run (rank 0 must stop with one line, exit 5,
  and no process of the run may be left).
A trial survives when it ended as described, `last.ckpt` loads with `torch.load(weights_only=True)`,
and `--ckpt_path` on it trains to the end of the run.

    python scripts/reliability.py --kills 20             # 20 injected + 20 random
    python scripts/reliability.py --kills 5 --mode random --json
    python scripts/reliability.py --kills 10 --mode faults  # 10 each of disk-full, read-only, dead-rank
    python scripts/reliability.py --kills 10 --mode all     # every kind

Prints survived/tried per kind (the Reliability figures of the README and docs/reliability.md come from this).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Optional

import torch

#: The folder holding the musicvae package (a checkout or site-packages): children import it from there.
PACKAGE_PARENT = Path(__file__).resolve().parents[3]

from musicvae.benchmarks.faults import kill_in_write_flags
from musicvae.commands.parsing import RawDescription, command_parser, parse_command

#: A tiny run: 10 synthetic pieces, 32 mels, 5 epochs of 8 steps, a checkpoint after every step.
TINY = [
    "--data.synthetic_pieces", "10", "--data.synthetic_seconds", "3", "--data.mel.n_mels", "32",
    "--data.frames", "32", "--data.batch_size", "8", "--data.val_split", "0.2", "--data.num_workers", "1",
    "--model.channels", "[8, 16]", "--model.latent_dim", "8", "--trainer.max_epochs", "5",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--checkpoint_every_n_steps", "1",
]


#: Two CPU processes (gloo): the same tiny run, each epoch split between them.
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
#: Each mode's exit status of a survivor (a SIGKILL'd process reports -9).
MODES = {"injected": -signal.SIGKILL, "random": -signal.SIGKILL, "ctrl-c": 130, "disk-full": 4, "read-only": 4,
         "dead-rank": 5}
GROUPS = {"both": ["injected", "random"], "faults": ["disk-full", "read-only", "dead-rank"],
          "all": ["injected", "random", "ctrl-c", "disk-full", "read-only", "dead-rank"]}
#: Size of the small filesystem the disk modes mount as the checkpoint folder (checkpoints: ~0.6 MB).
DISK = "8m"


def train(root: Path, extra: list[str] = (), env: dict | None = None, resume: bool = False) -> subprocess.Popen:
    """Start `musicvae fit` in its own process group (so a kill reaches its loader workers)."""
    if resume:
        args = ["fit", "--ckpt_path", str(root / "ckpt" / "last.ckpt")]
    else:
        args = ["fit", *TINY, "--data.cache_dir", str(root.parent / "cache"), "--checkpoint_dir", str(root / "ckpt"),
                "--trainer.logger.init_args.save_dir", str(root / "logs"), *extra]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))}
    root.mkdir(parents=True, exist_ok=True)  # the run's working directory: nothing lands in the checkout
    # SIGINT at its default in the child, as in a terminal, whatever this process inherited.
    return subprocess.Popen([sys.executable, "-m", "musicvae", *args], cwd=root, env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def checkpoint_ok(path: Path) -> tuple[bool, int | None, str]:
    """(loads with weights_only=True, its global step, why not)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return True, int(ckpt["global_step"]), ""
    except Exception as err:  # noqa: BLE001 - any failure to load is the finding
        return False, None, f"{type(err).__name__}: {str(err)[:200]}"


def wait_for_first_checkpoint(root: Path, process: subprocess.Popen) -> float:
    """Seconds from now until `last.ckpt` appears (or the process ends)."""
    started = time.monotonic()
    while not (root / "ckpt" / "last.ckpt").exists() and process.poll() is None:
        time.sleep(0.01)
    return time.monotonic() - started


@contextmanager
def small_disk(folder: Path) -> Iterator[None]:
    """A DISK-sized tmpfs mounted at `folder` (root only); RuntimeError saying why where mounting fails."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs at {folder} ({done.stderr.strip() or 'mount failed'}): the disk modes "
                           "need root in a machine or container that allows mounts")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> None:
    """Write zeros into `folder/filler.bin` until its disk refuses."""
    with open(folder / "filler.bin", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 16))
                handle.flush()
        except OSError:
            pass


def rank_one(process: subprocess.Popen) -> Optional[int]:
    """The pid of rank 1, a child of the launching process (Lightning marks it LOCAL_RANK=1)."""
    try:
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        for pid in children:
            if b"LOCAL_RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes():
                return int(pid)
    except OSError:
        pass
    return None


def group_ended(pgid: int, wait_s: float = 30.0) -> bool:
    """Whether every process of the group has ended within `wait_s` (leftovers are then killed)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.killpg(pgid, signal.SIGKILL)
    return False


def strike(mode: str, root: Path, process: subprocess.Popen) -> None:
    """Do the mode's fault to a running trial."""
    if mode == "ctrl-c":
        os.killpg(process.pid, signal.SIGINT)
    elif mode == "random":
        os.killpg(process.pid, signal.SIGKILL)
    elif mode == "disk-full":
        fill(root / "ckpt")
    elif mode == "read-only":
        # A remount is refused (EBUSY) while a file there is open for writing: it lands as soon as the
        # checkpoint being written is closed.
        deadline = time.monotonic() + 10
        while subprocess.run(["mount", "-o", "remount,ro", str(root / "ckpt")], capture_output=True).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                return
            time.sleep(0.005)
    elif mode == "dead-rank":
        pid = rank_one(process)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


def undo(mode: str, root: Path) -> None:
    """Give the resume what the fault took: room, or a writable folder."""
    if mode == "disk-full":
        (root / "ckpt" / "filler.bin").unlink(missing_ok=True)
    elif mode == "read-only":
        subprocess.run(["mount", "-o", "remount,rw", str(root / "ckpt")], check=True)


def trial(root: Path, mode: str, rng: random.Random, window_s: float, total_steps: int) -> dict:
    """One fault and its check; returns a record of what happened."""
    # Writes: one per step plus best/last after each validation; skip the first (nothing to fall back on).
    hook = rng.randint(2, total_steps) if mode == "injected" else None
    extra = DDP if mode == "dead-rank" else kill_in_write_flags(hook) if hook else []
    with (small_disk(root / "ckpt") if mode in ("disk-full", "read-only") else nullcontext()):
        process = train(root, extra=extra)
        delay = None
        if mode != "injected":
            wait_for_first_checkpoint(root, process)
            # Uniform over the clean run's time between its first checkpoint and its end.
            delay = rng.uniform(0, window_s)
            time.sleep(delay)
            if process.poll() is None:
                strike(mode, root, process)
        _, err = process.communicate()
        record = {"mode": mode, "returncode": process.returncode, "hook": hook, "delay_s": delay}
        record["all_ended"] = group_ended(process.pid)
        record["mid_write"] = any(p.name.endswith(".tmp") for p in (root / "ckpt").glob(".*"))
        lines = [line for line in err.splitlines() if line.startswith("musicvae: error:")]
        record["message"] = lines[0][:300] if lines else ""
        # The fault landed (a run that ended by itself first is drawn again).
        record["killed"] = process.returncode != 0
        expected = MODES[mode]
        ok, step, why = checkpoint_ok(root / "ckpt" / "last.ckpt")
        # A Ctrl-C after training ended (its handler restored) kills the process as SIGINT does any
        # program: a shell reports 130 as well, and the run is complete.
        finished = mode == "ctrl-c" and process.returncode == -signal.SIGINT and step == total_steps
        ended_right = (process.returncode == expected or finished) and record["all_ended"]
        if expected in (4, 5):  # one line and no traceback
            ended_right = ended_right and len(lines) == 1 and "Traceback" not in err
        if expected == 4:  # and the refused write's temporary file removed (a dead rank's may stay: next start's)
            ended_right = ended_right and not record["mid_write"]
        record["ended_right"] = ended_right
        record.update(loads=ok, step_at_kill=step, error=why or ("" if ended_right else f"ended with {process.returncode}: "
                                                                  f"{record['message'] or err.strip()[-300:]}"))
        if ok:
            undo(mode, root)
            resumed = train(root, resume=True)
            _, err = resumed.communicate()
            final_ok, final_step, why = checkpoint_ok(root / "ckpt" / "last.ckpt")
            record.update(resumed=resumed.returncode == 0 and final_ok and final_step == total_steps, final_step=final_step)
            if resumed.returncode != 0:
                record["error"] = err.strip().splitlines()[-1][:300] if err.strip() else f"exit {resumed.returncode}"
        else:
            record["resumed"] = False
    record["survived"] = bool(record["loads"] and record["resumed"] and record["ended_right"])
    return record


TWO = "two processes"


def setup_of(mode: str) -> str:
    """Which clean run a mode's trials are timed against."""
    return TWO if mode == "dead-rank" else "one process"


def clean_run(work: Path, name: str, extra: list[str]) -> tuple[float, int] | None:
    """(seconds from the first to the last checkpoint, steps) of an unfaulted run; None if it failed."""
    base = work / name
    process = train(base, extra=extra)
    wait_for_first_checkpoint(base, process)
    started = time.time()
    _, err = process.communicate()
    if process.returncode != 0:
        sys.stderr.write(f"reliability: the clean run failed:\n{err}\n")
        return None
    # Faults are drawn over training itself, first to last checkpoint (not the exit's teardown).
    window_s = (base / "ckpt" / "last.ckpt").stat().st_mtime - started
    return window_s, checkpoint_ok(base / "ckpt" / "last.ckpt")[1]


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("reliability", __doc__.split("\n\n")[0], formatter_class=RawDescription)
    parser.add_argument("--kills", type=int, default=20, help="trials per kind (default 20)")
    parser.add_argument("--mode", choices=(*MODES, *GROUPS), default="both",
                        help="one kind, or both (injected and random kills), faults (disk-full, read-only, dead-rank) "
                        "or all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where runs go (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print every trial as JSON too")
    args = parse_command(parser, argv)
    if args.kills < 1:
        parser.error("--kills must be at least 1")
    rng = random.Random(args.seed)
    modes = GROUPS.get(args.mode, [args.mode])
    with tempfile.TemporaryDirectory(prefix="musicvae-reliability-") as tmp:
        work = args.workdir or Path(tmp)
        clean = {}
        for name in dict.fromkeys(setup_of(mode) for mode in modes):  # the clean runs the modes need, once each
            measured = clean_run(work, "baseline_ddp" if name == TWO else "baseline", DDP if name == TWO else [])
            if measured is None:
                return 1
            clean[name] = measured
            print(f"clean run ({name}): {measured[1]} steps, {measured[0]:.1f} s from its first to its last checkpoint")
        records = []
        for mode in modes:
            window_s, total_steps = clean[setup_of(mode)]
            for i in range(args.kills):
                for attempt in range(5):  # a random moment can fall after the run's own end: draw again
                    try:
                        record = trial(work / f"{mode}_{i:03d}_{attempt}", mode, rng, window_s, total_steps)
                    except RuntimeError as err:  # the disk modes without the right to mount
                        print(f"{mode}: skipped: {err}", flush=True)
                        record = None
                        break
                    if record["killed"]:
                        break
                if record is None:
                    break
                records.append(record)
                status = "survived" if record["survived"] else f"LOST ({record['error']})"
                where = f"write {record['hook']}" if mode == "injected" else f"{record['delay_s']:.2f} s after first ckpt"
                print(f"{mode:9s} {i + 1:3d}: at {where}, exit {record['returncode']}, mid-write={record['mid_write']}, "
                      f"last.ckpt step {record['step_at_kill']} -> {status}", flush=True)
        print()
        for mode in modes:
            mine = [r for r in records if r["mode"] == mode]
            if not mine:
                continue
            total_steps = clean[setup_of(mode)][1]
            survived = sum(r["survived"] for r in mine)
            during = sum(r["killed"] and (r["step_at_kill"] or 0) < total_steps for r in mine)
            mid = sum(r["mid_write"] for r in mine)
            print(f"{mode}: {survived}/{len(mine)} survived ({during} landed while training was still going, "
                  f"{mid} left a half-written checkpoint behind)")
        if args.json:
            print(json.dumps(records, indent=1))
        return 0 if records and all(r["survived"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
