"""Training that survives: kills (injected and random), exact resume, SIGTERM, NaN/Inf.

The end-to-end tests run the training command in a forked child (tests/helpers.py, Child), kill or
signal it at chosen steps (tests/probes.py), resume with --ckpt_path in the test's process, and
compare the final weights bit for bit with an uninterrupted run. Ctrl-C comes from outside, to a
`python scripts/train.py` of its own process group, as a terminal sends it. The many-kill loop
lives in scripts/reliability.py; here it runs once per kind.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from musicvae.io.atomic import HOST, remove_abandoned
from musicvae.benchmarks.faults import kill_in_write_flags
from musicvae.training.checkpoint_io import AtomicCheckpointIO, nonfinite_entries
from musicvae.training.cli import cli_main, main
from musicvae.errors import NonFiniteError
from musicvae.training.guards import all_finite, nonfinite_gradients, nonfinite_parts
from musicvae.training.random_state import capture, restore
from musicvae.data.sampling import CropSampler
from conftest import load_script, tiny_fit_args
from helpers import (assert_same_weights, fit_args, sigint_ignored, signal_probe, start_like_a_terminal, step_of,
                     train, train_in_child, wait_for, weights)

# ---- exact resume -------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kill_at, saved_at", [
    (7, 4),    # mid-epoch 0, from a step checkpoint
    (9, 8),    # first step of epoch 1: last.ckpt is epoch 0's end (after validation)
    (14, 12),  # mid-epoch 1
])
def test_resume_after_kill_is_bitwise_exact(tmp_path, straight, kill_at, saved_at):
    result = train_in_child(fit_args(tmp_path, straight["cache"], *signal_probe(kill_at, "SIGKILL")))
    assert result.returncode == -signal.SIGKILL
    last = tmp_path / "ckpt" / "last.ckpt"
    assert step_of(last) == saved_at
    resumed = train(["fit", "--ckpt_path", str(last), "--trainer.callbacks", "[]"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert step_of(last) == step_of(straight["last"]) == 16
    assert_same_weights(last, straight["last"])


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_exits_143_and_resumes_exactly(tmp_path, straight):
    result = train_in_child(fit_args(tmp_path, straight["cache"], *signal_probe(10, "SIGTERM")))
    assert result.returncode == 143, result.stderr[-2000:]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert step_of(last) == 11  # the step running when the signal came was finished, then saved
    assert "SIGTERM: saved" in result.stderr and "--ckpt_path" in result.stderr
    resumed = train(["fit", "--ckpt_path", str(last), "--trainer.callbacks", "[]"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_weights(last, straight["last"])


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_exits_130_and_resumes_exactly(tmp_path, straight):
    marker = tmp_path / "at_step"
    args = fit_args(tmp_path, straight["cache"], "--trainer.callbacks+=probes.WaitAtStep", "--trainer.callbacks.step",
                    "10", "--trainer.callbacks.marker", str(marker))
    proc = start_like_a_terminal(args)
    pid = wait_for(marker, proc)
    assert not sigint_ignored(pid)
    workers = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    assert len(workers) >= 2  # the two loader workers get the signal too, as from a terminal
    os.killpg(pid, signal.SIGINT)
    marker.with_suffix(".go").touch()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert step_of(last) == 11  # the step running at Ctrl-C was finished, then saved
    assert "Ctrl-C: finishing this step" in err and "Ctrl-C: saved" in err
    # The printed command is the user's own, with --ckpt_path: run as printed, it resumes exactly.
    command = err.split("Continue with:\n")[1].splitlines()[0].strip()
    assert command.startswith("python scripts/train.py fit ") and command.endswith(f"--ckpt_path {last}")
    resumed = train(shlex.split(command)[2:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_weights(last, straight["last"])


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path, straight):
    marker = tmp_path / "at_step"
    proc = start_like_a_terminal(fit_args(tmp_path, straight["cache"], "--trainer.callbacks+=probes.WaitAtStep",
                                          "--trainer.callbacks.step", "10", "--trainer.callbacks.marker", str(marker)))
    pid = wait_for(marker, proc)
    os.killpg(pid, signal.SIGINT)
    time.sleep(1)
    os.killpg(pid, signal.SIGINT)  # during the same step: no save
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert "Ctrl-C twice: stopped at once at step 10" in err
    assert step_of(tmp_path / "ckpt" / "last.ckpt") == 8  # the checkpoint of epoch 0's end, untouched


@pytest.mark.slow
def test_sigterm_with_nan_weights_writes_nothing(tmp_path, straight):
    # SIGTERM arrives as step 6 starts; a NaN lands in the weights as that step ends (global step 7).
    poison = ["--trainer.callbacks+=probes.PoisonAtStep", "--trainer.callbacks.step", "7",
              "--trainer.callbacks.what", "weights"]
    result = train_in_child(fit_args(tmp_path, straight["cache"], *poison, *signal_probe(6, "SIGTERM")))
    assert result.returncode == 143, result.stderr[-2000:]
    assert "no checkpoint written" in result.stderr
    last = tmp_path / "ckpt" / "last.ckpt"
    assert step_of(last) == 4 and not nonfinite_entries({"state_dict": weights(last)})


# ---- kills during checkpoint writes -------------------------------------------------------------

@pytest.mark.slow
def test_kill_inside_a_checkpoint_write_keeps_the_previous_one(tmp_path, straight):
    # Writes: step 4 (1), step 8 (2), then best and last after validation (3, 4): die in the 3rd.
    result = train_in_child([*fit_args(tmp_path, straight["cache"]), *kill_in_write_flags(3)])
    assert result.returncode == -signal.SIGKILL
    ckpt_dir = tmp_path / "ckpt"
    leftovers = [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the half-written file
    assert step_of(ckpt_dir / "last.ckpt") == 8
    resumed = train(["fit", "--ckpt_path", str(ckpt_dir / "last.ckpt")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"removed {leftovers[0].name}" in resumed.stderr
    assert not leftovers[0].exists()
    assert step_of(ckpt_dir / "last.ckpt") == 16


@pytest.mark.slow
def test_reliability_script_survives_an_injected_and_a_random_kill(tmp_path, capsys, monkeypatch):
    reliability = load_script("reliability")
    # Its tiny run with 2 epochs instead of 5 (16 steps, a checkpoint after each): room enough for
    # a kill at a random moment; each trial is a `musicvae fit` process the script starts and kills.
    epochs = reliability.TINY.index("--trainer.max_epochs") + 1
    monkeypatch.setattr(reliability, "TINY", [*reliability.TINY[:epochs], "2", *reliability.TINY[epochs + 1:]])
    assert reliability.main(["--kills", "1", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "injected: 1/1 survived" in out and "random: 1/1 survived" in out


# ---- NaN / Inf ----------------------------------------------------------------------------------

def poisoned_fit(root: Path, what: str, times: int = 1, *extra: str):
    # Step 10 is in the second epoch (8 steps each), after best.ckpt and last.ckpt exist.
    poison = [{"class_path": "probes.PoisonAtStep", "init_args": {"step": 10, "what": what, "times": times}}]
    return cli_main(tiny_fit_args(root, "--checkpoint_every_n_steps", "2", "--trainer.callbacks", str(poison), *extra))


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_part_and_keeps_finite_checkpoints(tmp_path):
    with pytest.raises(NonFiniteError, match=r"step 10 .*loss part\(s\) .*recon"):
        poisoned_fit(tmp_path, "input")
    for name in ("last.ckpt", "best.ckpt"):
        path = tmp_path / "ckpt" / name
        assert not nonfinite_entries({"state_dict": weights(path)})
    assert step_of(tmp_path / "ckpt" / "last.ckpt") == 10  # nothing written at or after the bad step
    assert step_of(tmp_path / "ckpt" / "best.ckpt") == 8


@pytest.mark.slow
def test_inf_gradient_with_finite_loss_is_caught_too(tmp_path):
    with pytest.raises(NonFiniteError, match="gradient of"):
        poisoned_fit(tmp_path, "gradient")


@pytest.mark.slow
def test_skip_nonfinite_skips_up_to_n_batches(tmp_path, recwarn):
    cli = poisoned_fit(tmp_path / "ok", "input", 2, "--skip_nonfinite", "2")
    assert cli.trainer.current_epoch == 2  # ran to the end
    assert not nonfinite_entries({"state_dict": weights(tmp_path / "ok" / "ckpt" / "last.ckpt")})
    assert sum("batch skipped" in str(w.message) for w in recwarn) == 2
    with pytest.raises(NonFiniteError, match="after skipping 2 batch"):
        poisoned_fit(tmp_path / "over", "input", 3, "--skip_nonfinite", "2")


def test_main_exits_3_on_nonfinite_and_143_on_sigterm(monkeypatch, capsys):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def stop(exc):
        def raiser(*args, **kwargs):
            raise exc
        return raiser

    monkeypatch.setattr("musicvae.training.cli.cli_main", stop(NonFiniteError("training stopped at step 7")))
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 3 and "step 7" in capsys.readouterr().err
    monkeypatch.setattr("musicvae.training.cli.cli_main", stop(SIGTERMException()))
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 143


def test_nonfinite_parts_and_gradients_are_named():
    parts = {"loss": torch.tensor(float("nan")), "kl": torch.tensor(1.0), "recon": torch.tensor(float("inf"))}
    assert nonfinite_parts(parts) == ["loss", "recon"]
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    module(torch.ones(1, 2)).sum().backward()
    assert nonfinite_gradients(module) == []
    finite_parts = {"loss": torch.tensor(1.0), "kl": torch.tensor(2.0)}
    assert all_finite(finite_parts, module) and not all_finite(parts, module)
    module[1].bias.grad[0] = float("nan")
    assert nonfinite_gradients(module) == ["1.bias"]
    assert not all_finite(finite_parts, module) and all_finite(finite_parts, None)  # None: gradients not checked


# ---- units: the writer, the sampler, the random states ------------------------------------------

def test_atomic_io_refuses_nan_weights_and_keeps_the_previous_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    before = path.read_bytes()
    with pytest.raises(NonFiniteError, match="step 2 .*w"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan"), 0.0])}, "global_step": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_atomic_io_loads_only_weights_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, path)
    with pytest.raises(Exception, match="refused"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)  # asking for unsafe loading changes nothing


def test_remove_abandoned_removes_only_dead_writers_files(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".last.ckpt.{dead.pid}@{HOST}.tmp").write_bytes(b"half")
    (tmp_path / f".best.ckpt.{os.getpid()}@{HOST}.tmp").write_bytes(b"in progress")  # a live writer
    (tmp_path / ".last.ckpt.1@otherhost.tmp").write_bytes(b"maybe alive elsewhere")
    old = tmp_path / ".last.ckpt.2@otherhost.tmp"
    old.write_bytes(b"old")
    os.utime(old, (0, 0))
    removed = {p.name for p in remove_abandoned(tmp_path, recursive=False)}
    assert removed == {f".last.ckpt.{dead.pid}@{HOST}.tmp", old.name}
    assert len(list(tmp_path.iterdir())) == 2


def test_crop_sampler_is_a_function_of_seed_and_epoch():
    data = list(range(37))
    a, b = CropSampler(data, seed=3), CropSampler(data, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(i for i, _ in a) == data
    assert list(CropSampler(data, seed=4)) != first


def test_crop_sampler_shards_cover_the_epoch_without_overlap():
    data = list(range(37))
    shards = [list(CropSampler(data, seed=0, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # every rank takes as many steps
    indices = [i for shard in shards for i, _ in shard]
    assert set(indices) == set(data) and len(indices) == 39  # 2 padded repeats, like DistributedSampler


def test_crop_sampler_resumes_mid_epoch_and_rolls_over_at_the_end():
    data = list(range(20))
    sampler = CropSampler(data, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    resumed = CropSampler(data, seed=1)
    resumed.load_state_dict({"epoch": 2, "yielded": 7})
    assert list(resumed) == full[7:]
    assert list(resumed) == full  # the skip applies once
    done = CropSampler(data, seed=1)
    done.load_state_dict({"epoch": 2, "yielded": 20})  # saved at the epoch's last step
    following = CropSampler(data, seed=1)
    following.set_epoch(3)
    assert list(done) == list(following)


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    state = capture()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    restore(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_no_flag_means_no_mid_epoch_checkpoints(tmp_path):
    cli = cli_main(tiny_fit_args(tmp_path)[1:], run=False)
    assert cli.config.checkpoint_every_n_steps == 0 and cli.config.skip_nonfinite == 0


def test_huge_finite_gradients_are_not_called_nonfinite():
    # Their 2-norm overflows to Inf; the exact check must clear them.
    module = torch.nn.Linear(4, 1)
    module(torch.ones(1, 4)).sum().backward()
    module.weight.grad.fill_(3e38)
    assert all_finite({"loss": torch.tensor(1.0)}, module)
    assert nonfinite_gradients(module) == []
