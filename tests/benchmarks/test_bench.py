"""scripts/bench.py and its pieces: musicvae/benchmarks/timing.py, bench_*.py, arithmetic.py, memory.py.

Timings are never asserted on; only that measurements run, count what they claim, and are
positive where a rate or a size must be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from musicvae.benchmarks import arithmetic as A
from musicvae.benchmarks import timing as B
from musicvae.benchmarks import memory as M
from musicvae.training.module import MusicVAEModule
from conftest import REPO
from helpers import run_command

BENCH = REPO / "scripts" / "bench.py"
CPU = torch.device("cpu")


def tiny_module() -> MusicVAEModule:
    torch.manual_seed(0)
    return MusicVAEModule(n_mels=16, frames=16, latent_dim=4, channels=[4, 8], lr=1e-3)


def tiny_batches(n: int = 2, batch: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 1, 16, 16, generator=generator) for _ in range(n)]


# ----------------------------------------------------------------------------- helpers

def test_median_overhead_spread():
    assert B.median([3.0, 1.0, 2.0]) == 2.0
    assert B.median([1.0, 2.0]) == 1.5
    with pytest.raises(ValueError):
        B.median([])
    assert B.overhead(1.03, 1.0) == pytest.approx(0.03)
    assert B.overhead(0.5, 1.0) == pytest.approx(-0.5)
    with pytest.raises(ValueError):
        B.overhead(1.0, 0.0)
    assert B.spread([2.0, 2.0, 2.0]) == 0.0
    assert B.spread([1.0]) == 0.0
    assert B.spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4.0 - 2.0) / 3.0)
    assert B.examples_per_s(32, 5, 2.0) == 80.0
    assert B.per_step_ms([0.001, 0.001, 0.5], steps=3) == pytest.approx(1.0)  # the slow call counts as typical
    assert B.per_step_ms([], steps=3) == 0.0
    with pytest.raises(ValueError):
        B.examples_per_s(32, 5, 0.0)


def test_alternate_interleaves_and_drops_the_warmup():
    calls = []

    def runner(name: str):
        def run() -> float:
            calls.append(name)
            return float(len(calls))
        return run

    results = B.alternate({"a": runner("a"), "b": runner("b")}, repeats=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert results == {"a": [3.0, 5.0], "b": [4.0, 6.0]}  # the first round (1.0, 2.0) discarded


def test_growth_per_hour_is_the_least_squares_slope():
    assert M.growth_per_hour([0.5, 1.0, 2.0], [10.0, 20.0, 40.0]) == pytest.approx(20.0)
    assert M.growth_per_hour([1.0, 2.0], [5.0, 5.0]) == 0.0
    assert M.growth_per_hour([1.0], [5.0]) == 0.0


# ----------------------------------------------------------------------------- FLOPs

def test_conv_flops_formula_matches_torch_count():
    conv = torch.nn.Conv2d(3, 5, kernel_size=(3, 5), stride=2, padding=1)
    x = torch.randn(2, 3, 17, 20)
    with FlopCounterMode(display=False) as counter:
        out = conv(x)
    assert A.conv2d_flops(2, 3, 5, (3, 5), tuple(out.shape[2:])) == counter.get_total_flops()
    # 2 FLOPs per multiply-add: one output pixel of one channel costs 2 * C_in * kh * kw.
    assert A.conv2d_flops(1, 3, 1, (3, 5), (1, 1)) == 2 * 3 * 3 * 5
    assert A.conv2d_flops(1, 4, 4, (3, 3), (1, 1), groups=4) == 2 * 4 * 1 * 9


def test_training_flops_are_mostly_convolutions():
    module = tiny_module()
    batch = tiny_batches(1)[0]
    flops = A.training_flops(module, batch)
    assert flops["total"] > 0 and flops["per_example"] == flops["total"] / len(batch)
    assert 0.5 < flops["conv_share"] <= 1.0
    assert "aten.convolution_backward" in flops["by_op"]
    assert all(p.grad is None for p in module.parameters())  # leaves no gradients behind


def test_conv_profile_counts_the_same_flops_as_torch():
    module = tiny_module()
    batch = tiny_batches(1)[0]
    expected = A.training_flops(module, batch)["conv"]
    profile = A.conv_profile(module, batch, CPU, peak=1e11, steps=1)
    assert profile["conv_flops"] == expected
    assert profile["conv_s"] > 0 and profile["step_s"] > 0
    names = [name for row in profile["layers"] for name in row["layers"]]
    convs = [name for name, layer in module.named_modules() if isinstance(layer, torch.nn.Conv2d)]
    assert sorted(names) == sorted(convs)  # every conv layer in exactly one row
    first = next(row for row in profile["layers"] if row["weight"][1] == 1)
    # The input needs no gradient: the first layer's backward computes the weight gradient only.
    assert first["backward_flops"] == first["forward_flops"]


def test_matmul_and_conv_peaks_are_positive():
    peak = A.matmul_peak(CPU, n=64, reps=2, rounds=2)
    assert peak["best"] >= peak["median"] > 0 and len(peak["rounds"]) == 2
    peak = A.conv1x1_peak(CPU, channels=32, size=8, reps=2, rounds=2)
    assert peak["best"] >= peak["median"] > 0


# ----------------------------------------------------------------------------- memory

def test_uss_of_this_process_is_positive():
    assert M.uss(os.getpid()) > 0
    rollup = M.smaps_rollup(os.getpid())
    assert rollup["Rss"] >= rollup["Private_Clean"] + rollup["Private_Dirty"] > 0
    reading = M.tree_memory()
    assert reading.main_uss > 0 and reading.pss >= reading.anon > 0


def test_mapped_pss_counts_a_memory_mapped_array(tmp_path):
    import numpy as np

    path = tmp_path / "mel.npy"
    np.save(path, np.ones((64, 4096), dtype=np.float32))  # 1 MiB
    array = np.load(path, mmap_mode="r")
    assert float(array.sum()) == 64 * 4096  # every page touched
    mapped = M.mapped_pss(os.getpid(), (str(tmp_path.resolve()),))
    assert 0 < mapped <= 2 * path.stat().st_size
    assert M.tree_memory(prefixes=(str(tmp_path.resolve()),)).mapped == mapped
    assert M.mapped_pss(os.getpid(), ("/no/such/folder",)) == 0
    del array


def test_gone_process_reads_as_none():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert M.uss(child.pid) is None


def test_tree_memory_counts_child_processes():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while M.uss(child.pid) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in M.descendants(os.getpid())
        reading = M.tree_memory()
        assert reading.workers >= 1 and reading.workers_uss > 0
        assert reading.uss == reading.main_uss + reading.workers_uss
    finally:
        child.kill()
        child.wait()


def test_memory_sampler_keeps_peak_and_last():
    summary = M.timed_sampling(lambda: time.sleep(0.1), interval=0.02)
    assert summary["samples"] >= 2
    assert summary["peak"]["uss"] >= summary["last"]["uss"] > 0
    assert summary["peak"]["uss"] >= summary["steady"]["uss"] > 0
    assert summary["seconds"] > 0


# ----------------------------------------------------------------------------- the loops

def test_plain_epoch_trains_and_times_its_phases():
    module = tiny_module()
    before = [p.detach().clone() for p in module.parameters()]
    phases: dict[str, float] = {}
    seconds = B.plain_epoch(module, B.fixed_loader(tiny_batches()), CPU, phases=phases)
    assert seconds > 0
    assert {"forward+loss", "backward", "clip", "optimizer.step", "log"} <= set(phases)
    assert any(not torch.equal(a, p) for a, p in zip(before, module.parameters()))
    batch = next(iter(B.fixed_loader(tiny_batches())))
    assert set(module.plain_epoch_means) == set(module.loss_parts(batch))  # the logged values' epoch means


def test_python_hotspots_ranks_python_functions():
    def busy() -> None:
        sum(i * i for i in range(20000))

    hot = B.python_hotspots(busy, steps=1)
    assert hot["top_self"] and all(r["self_ms_per_step"] >= 0 for r in hot["top_self"])


@pytest.mark.slow
def test_lightning_epoch_and_profile_run_the_module():
    module = tiny_module()
    loader = B.fixed_loader(tiny_batches())
    assert B.lightning_epoch(module, loader, CPU, []) > 0
    profile = B.lightning_profile(module, loader, CPU, list, epochs=2)
    assert profile["steps"] == 4 and profile["log_ms_per_step"] > 0
    assert any("training_step" in name for name in profile["actions"])
    assert "log" not in module.__dict__  # the timing wrapper is removed again


# ----------------------------------------------------------------------------- the script

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line():
    done = run_command("bench", ["--device", "cuda", "--quick"])
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "CUDA is not available" in done.stderr


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.slow
def test_quick_bench_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env.pop("MUSICVAE_CACHE", None)
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"machine", "overhead", "efficiency", "data", "memory"} <= set(report)
    assert report["machine"]["cpu"] and _positive(report["machine"]["cores"])
    o = report["overhead"]
    for variant in ("plain", "lightning_bare", "lightning_full"):
        assert _positive(o[variant]["examples_per_s"]) and len(o[variant]["seconds"]) == o["repeats"]
    assert "NonFiniteGuard" in o["profile"]["callbacks_ms_per_step"]
    e = report["efficiency"]
    for value in (e["flops"]["per_example"], e["matmul_peak"]["best"], e["conv1x1_peak"]["best"], e["achieved_flops_per_s"],
                  e["conv"]["conv_flops_per_s"], e["experiments"]["channels_last"]["examples_per_s"]):
        assert _positive(value)
    for workers in (0, 2):
        assert _positive(report["data"][f"num_workers_{workers}"]["examples_per_s"])
        assert _positive(report["data"][f"num_workers_{workers}"]["ratio"])
    device_path = report["data"]["device_path"]  # --data.device_cache's crops, cut on the bench device
    assert device_path["device"] == "cpu" and _positive(device_path["examples_per_s"]) and _positive(device_path["cache_bytes"])
    fractions = report["memory"]["fractions"]
    assert [f["fraction"] for f in fractions] == [0.25, 0.5, 1.0]
    for entry in fractions:
        assert _positive(entry["hours"]) and _positive(entry["cache_bytes"])
        for phase in ("loader", "training"):
            peak = entry[phase]["peak"]
            assert _positive(peak["uss"]) and _positive(peak["anon"]) and entry[phase]["max_workers"] >= 1
            assert _positive(peak["mapped"])  # the workers read the cache through memory maps
    assert "Lightning overhead" in done.stdout and "ex/s" in done.stdout and "device path alone" in done.stdout
    assert not (tmp_path / "xdg" / "musicvae").exists()  # the bench's cache was temporary
