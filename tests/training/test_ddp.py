"""Multi-process training (DDP) through the real command line, on CPU with gloo.

One module-scoped fixture trains a tiny model from a folder of WAV files with
`--trainer.accelerator cpu --trainer.devices 2 --trainer.strategy ddp` for 2 epochs, then resumes
that run from its `last.ckpt` for a third epoch, also on 2 processes. Two instruments watch both
runs (tests/ddp_probes.py):

- `DataProbe`, a callback, records per rank the (index, crop draw) items the training loader
  fetched in each epoch, the validation items, and the logged `val/*` metrics;
- a Python audit hook, installed from a generated `sitecustomize.py` in every Python process of
  the run from interpreter start (rank 1 is a fresh `python scripts/train.py` that Lightning
  launches with the same environment), logs every file-system change each process attempts.

Everything the training processes may write lives under one folder (their working directory:
data, cache, checkpoints, logs); the instruments write outside it.

A separate test sends SIGTERM to both ranks of a 2-process run (Lightning's own handler deadlocked them;
musicvae.training.guards.Preemption replaces it).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import soundfile as sf
import torch

from conftest import REPO, tiny_fit_args
from helpers import stage_args
from ddp_probes import AUDIT_ENV, read_audit
from musicvae.audio.synth import render_piece

pytestmark = pytest.mark.slow

#: Six recordings (the file split needs 5 or more): 35 training segments of 32 frames (odd, so
#: DistributedSampler pads with one repeated item) and 6 validation segments.
SECONDS = [3.0, 2.5, 3.0, 2.0, 3.0, 2.5]
RATE = 22050
BATCH = 8  # TINY_FLAGS' data.batch_size: per process
DEVICES = 2
#: EMA of the weights and a warmed-up cosine schedule on, in both runs: the resume re-plans the
#: cosine for 3 epochs and continues both weight sets.
EMA_AND_SCHEDULE = ["--model.ema_decay", "0.9", "--model.lr_schedule", "cosine", "--model.warmup_steps", "2"]
SITECUSTOMIZE = f"""\
import os
if os.environ.get({AUDIT_ENV!r}):
    import ddp_probes
    ddp_probes.install_write_audit(os.environ[{AUDIT_ENV!r}])
"""


def launch(tmp: Path, name: str, *extra: str) -> dict:
    """Run scripts/train.py on DEVICES CPU processes in tmp/run; instruments in tmp/NAME."""
    run, out = tmp / "run", tmp / name
    (out / "audit").mkdir(parents=True)
    callbacks = [{"class_path": "ddp_probes.DataProbe", "init_args": {"out": str(out / "probe")}}]
    args = tiny_fit_args(
        run, "--data.data_dir", str(run / "music"), "--data.prepare_workers", "2",
        "--trainer.accelerator", "cpu", "--trainer.devices", str(DEVICES), "--trainer.strategy", "ddp",
        "--trainer.callbacks", json.dumps(callbacks), *extra,
    )[1:]  # without "fit": the bare form users type
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ writes into the checkout
        "PYTHONPATH": os.pathsep.join([str(tmp / "site"), str(REPO / "tests")]),
        AUDIT_ENV: str(out / "audit"),
    }
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args],
                            cwd=run, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "musicvae: error" not in result.stderr  # no rank took the others' normal end for a death (PeerWatch)
    ranks = {r: json.loads((out / "probe" / f"rank{r}.json").read_text()) for r in range(DEVICES)}
    return {"ranks": ranks, "audit": read_audit(out / "audit"), "probe": out / "probe", "run": run}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (inode, mtime_ns)} of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ddp")
    music = tmp / "run" / "music"
    music.mkdir(parents=True)
    for i, seconds in enumerate(SECONDS):
        sf.write(music / f"song_{i}.wav", render_piece(i, seconds=seconds, sample_rate=RATE), RATE)
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    fit = launch(tmp, "fit", *EMA_AND_SCHEDULE)
    ckpt = tmp / "run" / "ckpt" / "last.ckpt"
    fit["last"] = torch.load(ckpt, weights_only=True)
    fit["files"] = snapshot(tmp / "run")
    resume = launch(tmp, "resume", "--ckpt_path", str(ckpt), "--trainer.max_epochs", "3", *EMA_AND_SCHEDULE)
    resume["last"] = torch.load(ckpt, weights_only=True)
    resume["files"] = snapshot(tmp / "run")
    return {"fit": fit, "resume": resume, "run": tmp / "run"}


def changes(records: list[dict], root: Path) -> list[dict]:
    """The records that change something under `root` (mkdir of an existing folder changes nothing)."""
    return [r for r in records if r["event"] != "start" and not r.get("existed")
            and any(Path(p).is_relative_to(root) for p in r["paths"])]


def written(records: list[dict]) -> list[str]:
    """Files created or overwritten: opened for writing, or the target of a rename."""
    return [r["paths"][-1] for r in records if r["event"] in ("open", "os.rename")]


def by_rank(run: dict) -> dict[int, list[dict]]:
    """Audit records per global rank: a rank's process and every Python process it started
    (helpers such as multiprocessing's resource tracker are fresh interpreters, audited too)."""
    rank_of = {probe["pid"]: rank for rank, probe in run["ranks"].items()}
    assert set(rank_of) <= set(run["audit"]), "a rank's process ran without the audit hook"
    parent = {pid: records[0]["ppid"] for pid, records in run["audit"].items()}
    records = {rank: [] for rank in run["ranks"]}
    for pid, log in run["audit"].items():
        ancestor = pid
        while ancestor not in rank_of:
            assert ancestor in parent, f"audited process {pid} ({log[0]['argv']}) was started by no rank"
            ancestor = parent[ancestor]
        records[rank_of[ancestor]] += log
    return records


@pytest.mark.parametrize("name", ["fit", "resume"])
def test_ranks_train_on_disjoint_shares_that_cover_the_training_set(ddp, name):
    r0, r1 = ddp[name]["ranks"][0], ddp[name]["ranks"][1]
    assert (r0["global_rank"], r1["global_rank"], r0["world_size"]) == (0, 1, DEVICES)
    assert r0["train_items"] == r1["train_items"]  # the same training set on both ranks, in the same order
    n = r0["train_len"]
    assert n % DEVICES == 1, "the data should leave one item of padding"
    padding = DEVICES * math.ceil(n / DEVICES) - n
    epochs = ["0", "1"] if name == "fit" else ["2"]
    assert sorted(r0["train"]) == sorted(r1["train"]) == epochs
    for epoch in epochs:
        shares = [[index for index, _ in r["train"][epoch]] for r in (r0, r1)]
        assert [len(s) for s in shares] == [math.ceil(n / DEVICES)] * DEVICES
        assert all(len(set(s)) == len(s) for s in shares)  # no rank sees an example twice
        counts = Counter(shares[0] + shares[1])
        assert set(counts) == set(range(n))  # together: the whole training set
        assert sorted(counts.values()) == [1] * (n - padding) + [2] * padding  # overlap: the padding only
        assert all(draw is not None for r in (r0, r1) for _, draw in r["train"][epoch])  # CropSampler's pairs
    if name == "fit":
        assert r0["train"]["0"] != r0["train"]["1"]  # set_epoch reshuffles


@pytest.mark.parametrize("name", ["fit", "resume"])
def test_validation_is_split_exactly_and_its_metrics_are_identical_on_both_ranks(ddp, name):
    r0, r1 = ddp[name]["ranks"][0], ddp[name]["ranks"][1]
    epochs = ["0", "1"] if name == "fit" else ["2"]
    for epoch in epochs:
        shares = [sorted(index for index, _ in r["val_items"][epoch]) for r in (r0, r1)]
        assert all(shares), "each rank should validate on some items, else syncing proves nothing"
        assert sorted(shares[0] + shares[1]) == list(range(r0["val_len"]))  # each item once, on one rank
    assert sorted(r0["val_metrics"]) == epochs
    for epoch in epochs:
        assert "val/loss" in r0["val_metrics"][epoch] and len(r0["val_metrics"][epoch]) > 10
        assert r0["val_metrics"][epoch] == r1["val_metrics"][epoch]  # exactly, every key


@pytest.mark.parametrize("name", ["fit", "resume"])
def test_only_rank_zero_writes(ddp, name):
    run, root = ddp[name], ddp["run"]
    ranks = by_rank(run)
    # The hook was live in rank 1's process: it saw the probe write its own record (outside root).
    assert str(run["probe"] / "rank1.json") in written(ranks[1])
    assert changes(ranks[1], root) == []
    # ... and it sees rank 0's writes, forked children's included: the check can fail.
    mine = written(changes(ranks[0], root))
    ckpt, epochs = root / "ckpt", {"fit": 2, "resume": 1}[name]
    assert mine.count(str(ckpt / "last.ckpt")) == epochs  # one atomic write per epoch, by rank 0
    assert str(ckpt / "config.yaml") in mine and any("events.out.tfevents" in p for p in mine)
    if name == "fit":  # a resumed epoch replaces best.ckpt only when it improves val/loss
        assert str(ckpt / "best.ckpt") in mine


def test_every_file_of_the_runs_was_written_by_rank_zero(ddp):
    root = ddp["run"]
    by_zero = {p for name in ("fit", "resume") for p in written(changes(by_rank(ddp[name])[0], root))}
    made = {str(root / rel) for rel in ddp["resume"]["files"] if not rel.startswith("music/")}
    assert made and made <= by_zero  # nothing exists that rank 0 did not write
    assert {p.name for p in root.iterdir()} == {"music", "cache", "ckpt", "logs"}
    assert {p.name for p in (root / "ckpt").iterdir()} == {"best.ckpt", "last.ckpt", "config.yaml"}
    versions = [p for p in (root / "logs").rglob("version_*") if p.is_dir()]
    assert [p.name for p in versions] == ["version_0"]  # the resumed run continued the same version


def test_the_audio_cache_is_prepared_once_by_rank_zero(ddp):
    root, cache = ddp["run"], ddp["run"] / "cache"
    fit = by_rank(ddp["fit"])
    arrays = [r for r in changes(fit[0], cache) if r["event"] == "os.rename" and r["paths"][1].endswith(".wav.npy")]
    assert sorted(Path(r["paths"][1]).name for r in arrays) == [f"song_{i}.wav.npy" for i in range(len(SECONDS))]
    assert any(r["pid"] != ddp["fit"]["ranks"][0]["pid"] for r in arrays)  # decoded in the forked pool
    manifest = json.loads(next(cache.rglob("manifest.json")).read_text())
    assert sorted(manifest["entries"]) == [f"song_{i}.wav" for i in range(len(SECONDS))]
    # The resumed run reuses the cache: nobody changes it, every file is the one written before.
    for records in by_rank(ddp["resume"]).values():
        assert changes(records, cache) == []
    cached = {rel: stamp for rel, stamp in ddp["fit"]["files"].items() if rel.startswith("cache/")}
    assert cached and cached == {rel: s for rel, s in ddp["resume"]["files"].items() if rel.startswith("cache/")}
    assert not any(changes(records, root / "music") for run in ("fit", "resume")
                   for records in by_rank(ddp[run]).values())  # the music folder is only read


def test_the_two_process_run_resumes_from_last_ckpt(ddp):
    n = ddp["fit"]["ranks"][0]["train_len"]
    steps = math.ceil(math.ceil(n / DEVICES) / BATCH)  # per epoch, on every rank
    fit, resume = ddp["fit"]["last"], ddp["resume"]["last"]
    assert (fit["epoch"], fit["global_step"]) == (1, 2 * steps)
    assert (resume["epoch"], resume["global_step"]) == (2, 3 * steps)
    assert sorted(ddp["resume"]["ranks"][0]["train"]) == ["2"]  # continued at the next epoch, not from 0
    for ckpt, steps_run in ((fit, 2 * steps), (resume, 3 * steps)):
        assert int(ckpt["averaging_state"]["n_averaged"]) == steps_run  # the EMA went on, once per step
        [schedule] = ckpt["lr_schedulers"]
        assert schedule["last_epoch"] == steps_run and schedule["lr_lambdas"][0]["total_steps"] == steps_run


def test_the_linear_path_starts_from_rank_zeros_pca_on_every_rank(ddp, tmp_path):
    # Rank 0 alone fits the PCA (musicvae.training.module._init_linear_path) and broadcasts it: without
    # the broadcast, rank 1 would start from the random linear path DDP synchronised at setup.
    probe = tmp_path / "probe"
    callbacks = [{"class_path": "ddp_probes.LinearPathProbe", "init_args": {"out": str(probe)}}]
    args = tiny_fit_args(
        tmp_path, "--data.data_dir", str(ddp["run"] / "music"), "--trainer.accelerator", "cpu",
        "--trainer.devices", str(DEVICES), "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
        "--model.linear_path", "true", "--trainer.callbacks", json.dumps(callbacks),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=True) for r in range(DEVICES)]
    assert all(bool(r["pca_initialised"]) for r in ranks)
    for key in ("lin_encoder", "lin_decoder", "logvar_bias"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # And it is the fitted PCA, not the random start: whitened rows of a (scaled) orthonormal basis.
    rows = ranks[0]["lin_encoder"] / ranks[0]["lin_encoder"].norm(dim=1, keepdim=True)
    torch.testing.assert_close(rows @ rows.T, torch.eye(len(rows)), atol=1e-4, rtol=0)


def run_process_group(command: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int, str, bool]:
    """Run `command` in its own process group: (exit status, stderr, whether every process of the
    group, rank 1 included, ended within 30 s of rank 0). A hang or a leftover is killed."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the run did not end within {timeout} s (a hang between ranks)")
    for _ in range(60):
        try:
            os.killpg(proc.pid, 0)  # raises once no process of the group is left
        except ProcessLookupError:
            return proc.returncode, stderr, True
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, stderr, False


def test_sigterm_on_every_rank_saves_last_ckpt_and_exits_143(tmp_path):
    # Every rank signals itself as step 6 starts, as a scheduler signals every task of a job.
    probe = [{"class_path": "probes.SignalAtStep", "init_args": {"step": 6, "signal": "SIGTERM"}}]
    args = tiny_fit_args(tmp_path, "--trainer.accelerator", "cpu", "--trainer.devices", str(DEVICES),
                         "--trainer.strategy", "ddp", "--trainer.max_epochs", "4",
                         "--trainer.callbacks", json.dumps(probe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(REPO / "tests")}
    status, stderr, all_ended = run_process_group([sys.executable, str(REPO / "scripts" / "train.py"), *args],
                                                  tmp_path, env, timeout=120)
    assert status == 143, stderr[-3000:]
    assert all_ended, "rank 1 outlived rank 0"
    assert "SIGTERM: saved" in stderr
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 7  # step 6 finished


def ddp_fit(tmp_path: Path, *extra: str, timeout: float = 180) -> tuple[int, str, bool, float]:
    """A 2-process tiny run with EMA and a cosine on: (exit status, stderr, all ended, seconds)."""
    args = tiny_fit_args(tmp_path, "--trainer.accelerator", "cpu", "--trainer.devices", str(DEVICES),
                         "--trainer.strategy", "ddp", "--trainer.max_epochs", "4", "--checkpoint_every_n_steps", "4",
                         *EMA_AND_SCHEDULE, *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(REPO / "tests")}
    started = time.monotonic()
    status, stderr, all_ended = run_process_group([sys.executable, str(REPO / "scripts" / "train.py"), *args],
                                                  tmp_path, env, timeout=timeout)
    return status, stderr, all_ended, time.monotonic() - started


def error_lines(stderr: str, rank: int) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"musicvae: error: rank {rank}: another process")]


def test_a_rank_killed_while_rank_zero_works_alone_is_reported_not_silently_killed(tiny_run, tmp_path):
    """Rank 0 sleeps through optimizer step 10 (outside any collective, as while it writes a checkpoint,
    and as an NCCL rank blocks rather than fails) while rank 1 is SIGKILLed. Lightning's observer then
    SIGKILLed rank 0 without a word (exit -9); musicvae's PeerWatch reports and stops within a second
    or so. This run is the adversarial stage with EMA on (two optimizer steps per batch)."""
    probe = [{"class_path": "probes.DieOrStallAtStep", "init_args": {"step": 10, "kill": 1, "stall": 0, "seconds": 120}}]
    args = stage_args(tmp_path, tiny_run["ckpt_dir"] / "best.ckpt", tiny_run["cache_dir"], "--data.num_workers", "1",
                      "--trainer.accelerator", "cpu", "--trainer.devices", str(DEVICES), "--trainer.strategy", "ddp",
                      "--model.adv_start_step", "2", "--model.ema_decay", "0.9", "--trainer.callbacks", json.dumps(probe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(REPO / "tests")}
    started = time.monotonic()
    status, stderr, all_ended = run_process_group([sys.executable, str(REPO / "scripts" / "train.py"), *args[1:]],
                                                  tmp_path, env, timeout=180)
    assert status == 5, stderr[-3000:]
    assert all_ended and time.monotonic() - started < 120
    [line] = error_lines(stderr, 0)
    last = tmp_path / "ckpt" / "last.ckpt"
    kept = torch.load(last, weights_only=True)
    assert kept["global_step"] == 8 and "current_model_state" in kept
    assert "(rank 1, pid " in line and "killed by SIGKILL" in line and f"{last} (epoch {kept['epoch']}, step 8) is intact" in line
    assert stderr.rstrip().endswith(f"--ckpt_path {last}")
    assert not (tmp_path / "ckpt" / ".musicvae.lock").exists()  # released, though the process ended with os._exit


def test_collective_timeout_bounds_the_wait_and_a_launched_rank_notices_its_launcher_is_gone(tmp_path):
    """Rank 1 hangs at step 6: rank 0 gives up after --collective_timeout seconds (the setting reaches
    the process group, as it must for NCCL, where a collective blocks rather than fails) and stops with
    one line; rank 1, whose launcher is then gone, stops with its own line instead of hanging on. (30 s:
    the same timeout bounds the start, where rank 1 imports torch and Lightning before it joins.)"""
    probe = [{"class_path": "probes.DieOrStallAtStep", "init_args": {"step": 6, "stall": 1, "seconds": 150}}]
    status, stderr, all_ended, seconds = ddp_fit(tmp_path, "--collective_timeout", "30",
                                                 "--trainer.callbacks", json.dumps(probe))
    assert status == 5, stderr[-3000:]
    assert all_ended and seconds < 150
    [zero] = error_lines(stderr, 0)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert "it did not answer within 30 s, --collective_timeout: it died or hangs" in zero
    assert f"{last} (epoch 0, step 4) is intact" in zero
    [one] = error_lines(stderr, 1)
    assert "which started this process (rank 0 or its launcher), is gone" in one
