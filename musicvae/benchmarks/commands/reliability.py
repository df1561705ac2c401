"""Kill training many times and check that every kill leaves a checkpoint that loads and resumes.

Each trial trains a tiny model on synthetic music in a subprocess (checkpointing every step)
and SIGKILLs its whole process group, either
- injected: halfway through a chosen checkpoint write (the test-only hook of
  musicvae/training/checkpoint_io.py), the worst moment there is; or
- random: at a uniformly random moment after the first checkpoint, timed from a clean run;
or, with `--mode ctrl-c`, sends the group SIGINT at such a moment, as a terminal's Ctrl-C does
(the run must save, exit 130 and resume).
A trial survives when `last.ckpt` loads with `torch.load(weights_only=True)` and `--ckpt_path`
on it trains to the end of the run.

    python scripts/reliability.py --kills 20             # 20 injected + 20 random
    python scripts/reliability.py --kills 5 --mode random --json
    python scripts/reliability.py --kills 10 --mode all  # and 10 Ctrl-C

Prints survived/tried per kind (the README's Reliability figures come from this).
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
from pathlib import Path

import torch

#: The folder holding the musicvae package (a checkout or site-packages): children import it from there.
PACKAGE_PARENT = Path(__file__).resolve().parents[3]

from musicvae.training.checkpoint_io import KILL_HOOK_ENV
from musicvae.commands.parsing import RawDescription, command_parser, parse_command

#: A tiny run: 10 synthetic pieces, 32 mels, 5 epochs of 8 steps, a checkpoint after every step.
TINY = [
    "--data.synthetic_pieces", "10", "--data.synthetic_seconds", "3", "--data.mel.n_mels", "32",
    "--data.frames", "32", "--data.batch_size", "8", "--data.val_split", "0.2", "--data.num_workers", "1",
    "--model.channels", "[8, 16]", "--model.latent_dim", "8", "--trainer.max_epochs", "5",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--checkpoint_every_n_steps", "1",
]


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


def trial(root: Path, mode: str, rng: random.Random, window_s: float, total_steps: int) -> dict:
    """One kill and its check; returns a record of what happened."""
    env = {}
    if mode == "injected":
        # Writes: one per step plus best/last after each validation; skip the first (nothing to fall back on).
        env[KILL_HOOK_ENV] = str(rng.randint(2, total_steps))
    process = train(root, env=env)
    delay = None
    if mode in ("random", "ctrl-c"):
        wait_for_first_checkpoint(root, process)
        # Uniform over the clean run's time between its first checkpoint and its end.
        delay = rng.uniform(0, window_s)
        time.sleep(delay)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT if mode == "ctrl-c" else signal.SIGKILL)
    process.wait()
    record = {"mode": mode, "returncode": process.returncode, "hook": env.get(KILL_HOOK_ENV), "delay_s": delay}
    record["mid_write"] = any(p.name.endswith(".tmp") for p in (root / "ckpt").glob(".*"))
    # A signal that landed (a run that ended by itself is drawn again); Ctrl-C must end with status 130.
    record["killed"] = process.returncode != 0 if mode == "ctrl-c" else process.returncode == -signal.SIGKILL
    ok, step, why = checkpoint_ok(root / "ckpt" / "last.ckpt")
    record.update(loads=ok, step_at_kill=step, error=why)
    if ok:
        resumed = train(root, resume=True)
        _, err = resumed.communicate()
        final_ok, final_step, why = checkpoint_ok(root / "ckpt" / "last.ckpt")
        record.update(resumed=resumed.returncode == 0 and final_ok and final_step == total_steps, final_step=final_step)
        if resumed.returncode != 0:
            record["error"] = err.strip().splitlines()[-1][:300] if err.strip() else f"exit {resumed.returncode}"
    else:
        record["resumed"] = False
    record["survived"] = bool(record["loads"] and record["resumed"]
                              and (mode != "ctrl-c" or record["returncode"] == 130))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("reliability", __doc__.split("\n\n")[0], formatter_class=RawDescription)
    parser.add_argument("--kills", type=int, default=20, help="kills per kind (default 20)")
    parser.add_argument("--mode", choices=("injected", "random", "ctrl-c", "both", "all"), default="both",
                        help="both: injected and random kills; all: those and Ctrl-C")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where runs go (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print every trial as JSON too")
    args = parse_command(parser, argv)
    if args.kills < 1:
        parser.error("--kills must be at least 1")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="musicvae-reliability-") as tmp:
        work = args.workdir or Path(tmp)
        base = work / "baseline"
        process = train(base)
        wait_for_first_checkpoint(base, process)
        started = time.time()
        _, err = process.communicate()
        if process.returncode != 0:
            sys.stderr.write(f"reliability: the clean run failed:\n{err}\n")
            return 1
        # Kills are drawn over training itself, first to last checkpoint (not the exit's teardown).
        window_s = (base / "ckpt" / "last.ckpt").stat().st_mtime - started
        ok, total_steps, _ = checkpoint_ok(base / "ckpt" / "last.ckpt")
        print(f"clean run: {total_steps} steps, {window_s:.1f} s from its first to its last checkpoint")
        modes = {"both": ["injected", "random"], "all": ["injected", "random", "ctrl-c"]}.get(args.mode, [args.mode])
        records = []
        for mode in modes:
            for i in range(args.kills):
                for attempt in range(5):  # a random moment can fall after the run's own end: draw again
                    record = trial(work / f"{mode}_{i:03d}_{attempt}", mode, rng, window_s, total_steps)
                    if record["killed"]:
                        break
                records.append(record)
                status = "survived" if record["survived"] else f"LOST ({record['error']})"
                where = f"write {record['hook']}" if mode == "injected" else f"{record['delay_s']:.2f} s after first ckpt"
                print(f"{mode:8s} {i + 1:3d}: {'SIGINT' if mode == 'ctrl-c' else 'kill'} at {where}, mid-write={record['mid_write']}, "
                      f"last.ckpt step {record['step_at_kill']} -> {status}", flush=True)
        print()
        for mode in modes:
            mine = [r for r in records if r["mode"] == mode]
            survived = sum(r["survived"] for r in mine)
            during = sum(r["killed"] and (r["step_at_kill"] or 0) < total_steps for r in mine)
            mid = sum(r["mid_write"] for r in mine)
            print(f"{mode}: {survived}/{len(mine)} kills survived ({during} landed while training was still going, "
                  f"{mid} during a checkpoint write)")
        if args.json:
            print(json.dumps(records, indent=1))
        return 0 if all(r["survived"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
