"""The training benchmark's run and its table (scripts/bench.py): which sections run in which
order, the machine's load around each, and the printed summary of the JSON report."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from musicvae.benchmarks import timing as B
from musicvae.benchmarks.speed_data import bench_data
from musicvae.benchmarks.speed_memory import bench_memory
from musicvae.benchmarks.speed_setup import (
    GOAL_CONV_FRACTION,
    GOAL_DATA_RATIO,
    GOAL_OVERHEAD,
    MB,
    QUICK,
    Sizes,
    machine,
    make_datamodule,
    make_module,
    quiet,
    take_batches,
)
from musicvae.benchmarks.speed_throughput import bench_efficiency, bench_overhead, step_rate


def run(args: argparse.Namespace, command: str) -> int:
    """Run the sections `args` asks for (scripts/bench.py's options), print the table, write the
    JSON; returns the exit status (2 for unusable options, with one line on stderr)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write(f"bench: error: --device cuda: CUDA is not available on this machine "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu\n")
        return 2
    if args.data_dir and not Path(args.data_dir).is_dir():
        sys.stderr.write(f"bench: error: --data_dir {args.data_dir}: no such folder\n")
        return 2
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"overhead", "efficiency", "data", "memory"}
    if unknown:
        sys.stderr.write(f"bench: error: --sections: unknown {', '.join(sorted(unknown))}\n")
        return 2
    quiet()
    sizes = QUICK if args.quick else Sizes()
    device = torch.device(args.device)
    if device.type == "cuda":
        # A GPU step takes milliseconds: more of them per repeat, and a matmul big enough to fill it.
        sizes = replace(sizes, steps=sizes.steps * 10, matmul_n=sizes.matmul_n * 4)
    sizes = replace(sizes, **{k: v for k, v in (("repeats", args.repeats), ("steps", args.steps)) if v})
    scratch = Path(tempfile.mkdtemp(prefix="musicvae-bench-"))
    args.cache_dir = args.cache_dir or os.environ.get("MUSICVAE_CACHE") or str(scratch / "cache")
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine(device), "sizes": asdict(sizes), "command": command}
    report["config"] = {"data_dir": args.data_dir, "cache_dir": args.cache_dir, "quick": args.quick,
                        "model": {"n_mels": sizes.n_mels, "frames": sizes.frames, "channels": list(sizes.channels),
                                  "latent_dim": sizes.latent_dim, "loss": "spectral", "clip": B.CLIP}}
    try:
        module = make_module(sizes)
        dm = make_datamodule(args, sizes)
        start = time.perf_counter()
        dm.prepare_data()  # decodes audio into the cache with every core, or renders the synthetic music
        report["config"]["prepare_s"] = time.perf_counter() - start
        dm.setup("fit")
        report["config"]["data_hours"] = sum(s.n_frames for s in dm.sources) * dm.mel.hop_length / dm.mel.sample_rate / 3600
        batches = take_batches(dm.train_dataloader(), sizes.steps)
        train_rate = None
        loads = report["machine"]["load_by_section"] = {}
        if "overhead" in sections:
            loads["overhead"] = os.getloadavg()[0]
            report["overhead"] = bench_overhead(module, batches, device, sizes, scratch)
            train_rate = report["overhead"]["lightning_full"]["examples_per_s"]
        if "efficiency" in sections:
            loads["efficiency"] = os.getloadavg()[0]
            plain = report["overhead"]["plain"]["examples_per_s"] if "overhead" in report else None
            report["efficiency"] = bench_efficiency(module, batches, device, sizes, plain)
            train_rate = train_rate or report["efficiency"]["examples_per_s"]
        if "data" in sections:
            loads["data"] = os.getloadavg()[0]
            if train_rate is None:
                step_rate(module, batches[:1], device)
                train_rate = step_rate(module, batches, device)
            report["data"] = bench_data(args, sizes, train_rate, device)
        if "memory" in sections:
            loads["memory"] = os.getloadavg()[0]
            report["memory"] = bench_memory(args, sizes, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the links, and the cache unless one was named
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["seconds"] = time.perf_counter() - started
    lines = table(report)
    print("\n".join(lines))
    print(f"load average {report['machine']['load_average_start'][0]:.2f} at start, "
          f"{report['machine']['load_average_end'][0]:.2f} at end; {report['seconds']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def table(report: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, str, str, str]] = []

    def add(name: str, value: float, unit: str, note: str = "", fmt: str = "{:.3g}") -> None:
        rows.append((name, fmt.format(value), unit, note))

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    o = report.get("overhead")
    if o:
        for key, label in (("plain", "plain PyTorch loop"), ("lightning_bare", "Lightning, bare Trainer"),
                           ("lightning_full", "Lightning + NonFiniteGuard, ResumableRandomState")):
            add(f"train throughput, {label}", o[key]["examples_per_s"], "ex/s",
                f"median of {o['repeats']} x {o['steps_per_repeat']} steps, spread {o[key]['spread']:.1%}")
        for key, label in (("overhead_bare", "bare Trainer"), ("overhead_full", "with callbacks")):
            add(f"Lightning overhead, {label}", 100 * o[key], "%",
                f"goal <= 3%: {verdict(o[key] <= GOAL_OVERHEAD)} (ratio of medians; fastest repeats "
                f"{o[key + '_min']:+.2%}, median of paired rounds {o[key + '_paired']['median']:+.2%})", "{:+.2f}")
        step = o["plain"]["ms_per_step"]
        p = o["profile"]
        for name, ms in sorted(p["callbacks_ms_per_step"].items(), key=lambda kv: -kv[1]):
            if name != "EpochTimer":  # the bench's own clock, in every Lightning variant
                add(f"  cost of callback {name}", ms, "ms/step", f"{ms / step:.3%} of a step", "{:.3f}")
        add("  cost of self.log / log_dict (7 values)", p["log_ms_per_step"], "ms/step",
            f"{p['log_ms_per_step'] / step:.3%} of a step", "{:.3f}")
        to = p["python_hotspots"]["watched"].get("_ResultMetric.to")
        if to:
            add("    of which _ResultMetric.to (cProfile)", to["cumulative_ms_per_step"], "ms/step",
                f"{to['calls_per_step']:.0f} calls/step (profiled: slower than unprofiled)", "{:.3f}")
    e = report.get("efficiency")
    if e:
        f, peak = e["flops"], e["matmul_peak"]
        add("FLOPs per example (training step)", f["per_example"] / 1e9, "GFLOP", f"conv share {f['conv_share']:.1%}")
        add(f"matmul peak, torch.mm ({peak['n']}^2 {peak['dtype']}, {report['machine']['torch_threads']} threads)",
            peak["best"] / 1e9, "GFLOP/s", "the reference peak")
        cp = e["conv1x1_peak"]
        add(f"GEMM peak as 1x1 conv ({cp['channels']} ch, {cp['size']}^2)", cp["best"] / 1e9, "GFLOP/s",
            f"x{cp['best'] / peak['best']:.2f} torch.mm")
        if "matmul_peak_bf16" in e:
            add("matmul peak bf16", e["matmul_peak_bf16"]["best"] / 1e9, "GFLOP/s")
        add("achieved in training (plain loop)", e["achieved_flops_per_s"] / 1e9, "GFLOP/s",
            f"{e['fraction_of_peak']:.1%} of matmul peak, {e['fraction_of_best_peak']:.1%} of the best peak")
        c = e["conv"]
        ok = c["conv_fraction_of_peak"] > GOAL_CONV_FRACTION
        add("convolutions (fwd+bwd)", c["conv_flops_per_s"] / 1e9, "GFLOP/s",
            f"{c['conv_fraction_of_matmul_peak']:.1%} of matmul peak, {c['conv_fraction_of_peak']:.1%} of the best "
            f"(goal > 30%: {verdict(ok)}); {c['conv_time_share']:.0%} of step time")
        for row in sorted(c["layers"], key=lambda r: r["fraction_of_peak"])[:3]:
            add(f"  slow conv {row['input']} * {row['weight']}", row["fraction_of_peak"] * 100, "% best",
                f"fwd {row['forward_fraction_of_peak']:.0%} bwd {row['backward_fraction_of_peak']:.0%}, "
                f"{1e3 * (row['forward_s'] + row['backward_s']):.1f} ms/step", "{:.1f}")
        for name, entry in e["experiments"].items():
            extra = f", conv {entry['conv']['conv_fraction_of_peak']:.1%} of best peak" if "conv" in entry else ""
            extra += f", matmul peak {entry['matmul_peak'] / 1e9:.0f} GFLOP/s" if "matmul_peak" in entry else ""
            add(f"  variant {name}", entry["examples_per_s"], "ex/s",
                f"x{entry['speedup']:.2f} (best runs x{entry['speedup_best']:.2f}){extra}")
    d = report.get("data")
    if d:
        for workers in (0, 2):
            entry = d[f"num_workers_{workers}"]
            add(f"train loader alone, num_workers={workers}", entry["examples_per_s"], "ex/s",
                f"{entry['ratio']:.1f}x training (goal >= 10x: {verdict(entry['ratio'] >= GOAL_DATA_RATIO)})")
        dp = d.get("device_path")
        if dp and "refused" in dp:
            add("device path (data.device_cache): refused", dp["cache_bytes"] / MB, "MiB", "does not fit", "{:.0f}")
        elif dp:
            add(f"device path alone (data.device_cache), on {dp['device']}", dp["examples_per_s"], "ex/s",
                f"{dp['ratio']:.1f}x training (goal >= 10x: {verdict(dp['ratio'] >= GOAL_DATA_RATIO)}); "
                f"first batch {dp['first_batch_s']:.2f} s (copies {dp['cache_bytes'] / MB:.0f} MiB there)")
    m = report.get("memory")
    if m:
        for r in m["fractions"]:
            for phase in ("loader", "training"):
                steady = r[phase]["steady"]
                add(f"USS main+workers, {phase}, {r['fraction']:.0%} ({r['files']} files, {r['hours']:.2f} h)",
                    steady["uss"] / MB, "MiB",
                    f"workers {steady['workers_uss'] / MB:.0f} ({r[phase]['max_workers']}); tree anon {steady['anon'] / MB:.0f}, "
                    f"cache mapped {steady['mapped'] / MB:.0f} of {r['cache_bytes'] / MB:.0f} MiB", "{:.0f}")
        g = m["growth"]
        for phase in ("loader", "training"):
            add(f"growth with hours of audio, {phase}: USS", g[f"{phase}_uss_bytes_per_hour"] / MB, "MiB/h",
                f"tree anon {g[f'{phase}_anon_bytes_per_hour'] / MB:+.0f}, cache mapped {g[f'{phase}_mapped_bytes_per_hour'] / MB:+.0f} MiB/h; "
                f"the cache grows {m['cache_bytes_per_hour'] / MB:.0f} MiB/h", "{:+.0f}")
    if o and "gpu_max_allocated_bytes" in o:
        add("GPU memory, max allocated (training)", o["gpu_max_allocated_bytes"] / MB, "MiB", "", "{:.0f}")
    width = max(len(r[0]) for r in rows) if rows else 0
    return [f"{name:<{width}}  {value:>9} {unit:<8} {note}".rstrip() for name, value, unit, note in rows]
