"""Training throughput sections of scripts/bench.py: Lightning's overhead over a plain loop, and
arithmetic efficiency (FLOPs per example over the machine's measured peak, per-shape convolution
times, memory-format and thread-count variants)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from musicvae.benchmarks import arithmetic as A
from musicvae.benchmarks import timing as B
from musicvae.benchmarks.speed_setup import GOAL_CONV_FRACTION, GOAL_OVERHEAD, Sizes, project_callbacks


def bench_overhead(module: Any, batches: list[torch.Tensor], device: torch.device, sizes: Sizes, scratch: Path) -> dict[str, Any]:
    loader = B.fixed_loader(batches)
    n = len(batches) * sizes.batch_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runners = {
        "lightning_full": lambda: B.lightning_epoch(module, loader, device, project_callbacks(scratch)),
        "plain": lambda: B.plain_epoch(module, loader, device),
        "lightning_bare": lambda: B.lightning_epoch(module, loader, device, []),
    }
    times = B.alternate(runners, sizes.repeats, warmup=1)
    result: dict[str, Any] = {"steps_per_repeat": len(batches), "repeats": sizes.repeats, "batch_size": sizes.batch_size,
                              "order": list(runners), "goal": GOAL_OVERHEAD}
    for name, values in times.items():
        med = B.median(values)
        result[name] = {"seconds": values, "median_s": med, "examples_per_s": n / med,
                        "ms_per_step": 1e3 * med / len(batches), "spread": B.spread(values)}
    plain = result["plain"]["median_s"]
    result["overhead_bare"] = B.overhead(result["lightning_bare"]["median_s"], plain)
    result["overhead_full"] = B.overhead(result["lightning_full"]["median_s"], plain)
    result["overhead_callbacks"] = B.overhead(result["lightning_full"]["median_s"], result["lightning_bare"]["median_s"])
    # Two estimates that resist repeats slowed by other jobs: the fastest repeats (what the code
    # costs undisturbed) and the median of each round's own ratio (neighbours in time share conditions).
    for variant in ("bare", "full"):
        ours = times[f"lightning_{variant}"]
        result[f"overhead_{variant}_min"] = B.overhead(min(ours), min(times["plain"]))
        paired = [B.overhead(a, b) for a, b in zip(ours, times["plain"])]
        result[f"overhead_{variant}_paired"] = {"median": B.median(paired), "rounds": paired}
    if device.type == "cuda":
        result["gpu_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    # Where the time goes: three profiled Lightning epochs, a plain one timed phase by phase, and
    # a cProfiled Lightning epoch for the Python functions behind it.
    profile = B.lightning_profile(module, loader, device, lambda: project_callbacks(scratch), epochs=3)
    phases: dict[str, float] = {}
    B.plain_epoch(module, loader, device, phases=phases)
    profile["plain_phases_ms_per_step"] = {k: 1e3 * v / len(batches) for k, v in phases.items()}
    step_ms = result["plain"]["ms_per_step"]
    extra_ms = result["lightning_full"]["ms_per_step"] - step_ms
    callbacks_ms = sum(ms for name, ms in profile["callbacks_ms_per_step"].items() if name != "EpochTimer")
    profile["overhead_ms_per_step"] = {
        "total": extra_ms,
        "self.log": profile["log_ms_per_step"],
        "project callbacks": callbacks_ms,
        "bench timer (EpochTimer)": profile["callbacks_ms_per_step"].get("EpochTimer", 0.0),
        "rest (Lightning loop, hook dispatch, timing noise)": extra_ms - profile["log_ms_per_step"] - callbacks_ms,
    }
    profile["python_hotspots"] = B.python_hotspots(
        lambda: B.lightning_epoch(module, loader, device, project_callbacks(scratch)), len(batches))
    result["profile"] = profile
    return result


def step_rate(module: Any, batches: list[torch.Tensor], device: torch.device) -> float:
    seconds = B.plain_epoch(module, batches, device)
    return B.examples_per_s(len(batches[0]), len(batches), seconds)


def bench_efficiency(module: Any, batches: list[torch.Tensor], device: torch.device, sizes: Sizes,
                     train_rate: Optional[float]) -> dict[str, Any]:
    flops = A.training_flops(module.to(device), batches[0].to(device))
    peak = A.matmul_peak(device, sizes.matmul_n, sizes.matmul_reps)
    conv_peak = A.conv1x1_peak(device, sizes.matmul_n // 2, 64)
    # The reference peak is torch.mm's; the larger of the two is what this machine can do.
    best = max(peak["best"], conv_peak["best"])
    result: dict[str, Any] = {"flops": flops, "matmul_peak": peak, "conv1x1_peak": conv_peak, "best_peak": best,
                              "goal_conv_fraction": GOAL_CONV_FRACTION}
    if device.type == "cuda":
        result["matmul_peak_bf16"] = A.matmul_peak(device, sizes.matmul_n, sizes.matmul_reps, dtype=torch.bfloat16)
    if train_rate is None:
        step_rate(module, batches[:1], device)  # warm-up
        train_rate = step_rate(module, batches, device)
    achieved = flops["per_example"] * train_rate
    result.update(examples_per_s=train_rate, achieved_flops_per_s=achieved, fraction_of_peak=achieved / peak["best"],
                  fraction_of_best_peak=achieved / best)
    # Fractions of peak in the convolution profiles are of the best peak; of torch.mm's beside.
    result["conv"] = A.conv_profile(module, batches[0], device, best)
    result["conv"]["conv_fraction_of_matmul_peak"] = result["conv"]["conv_flops_per_s"] / peak["best"]
    # Variants: memory format (and, on a CPU, thread counts), alternating, same batches.
    batches = batches[: sizes.experiment_steps]
    cl_batches = A.channels_last(batches)

    def in_channels_last() -> float:
        module.to(memory_format=torch.channels_last)
        try:
            return step_rate(module, cl_batches, device)
        finally:
            module.to(memory_format=torch.contiguous_format)

    threads = torch.get_num_threads()

    def with_threads(count: int):
        def run() -> float:
            torch.set_num_threads(count)
            try:
                return step_rate(module, batches, device)
            finally:
                torch.set_num_threads(threads)
        return run

    runners = {"contiguous": lambda: step_rate(module, batches, device), "channels_last": in_channels_last}
    if device.type == "cpu":
        for count in sorted({1, threads, os.cpu_count() or 1} - {threads}):
            runners[f"threads_{count}"] = with_threads(count)
    rates = B.alternate(runners, sizes.experiment_repeats, warmup=1)
    # Best and median: the best run is the one least disturbed by other jobs.
    experiments = {name: {"examples_per_s": B.median(v), "best_examples_per_s": max(v), "runs": v}
                   for name, v in rates.items()}
    for entry in experiments.values():
        entry["speedup"] = entry["examples_per_s"] / experiments["contiguous"]["examples_per_s"]
        entry["speedup_best"] = entry["best_examples_per_s"] / experiments["contiguous"]["best_examples_per_s"]
    module.to(memory_format=torch.channels_last)
    try:
        experiments["channels_last"]["conv"] = A.conv_profile(module, cl_batches[0], device, best)
    finally:
        module.to(memory_format=torch.contiguous_format)
    if device.type == "cpu":
        for name in list(experiments):
            if name.startswith("threads_"):
                count = int(name.split("_")[1])
                torch.set_num_threads(count)
                try:
                    experiments[name]["matmul_peak"] = A.matmul_peak(device, sizes.matmul_n, sizes.matmul_reps)["best"]
                finally:
                    torch.set_num_threads(threads)
    result["experiments"] = experiments
    return result
