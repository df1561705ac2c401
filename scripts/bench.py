"""Benchmark training: Lightning's overhead, arithmetic efficiency, the data path, memory.

`python scripts/bench.py [--device cpu|cuda] [--quick] [--out bench.json] [--data_dir DIR]`

On the default model (MusicVAEModule(): 128 mels x 128 frames, channels 32-256, latent 64,
spectral loss, batch 32, gradient clipping 1.0) and data, in one process on one machine:
  * overhead: examples/s of `Trainer.fit` (bare, and with the project's callbacks
    NonFiniteGuard and ResumableRandomState as scripts/train.py adds them) against a plain
    PyTorch loop doing the same work on the same in-memory batches, alternating, medians of
    repeats after a warm-up; goal: at most 3% slower. A SimpleProfiler run shows where
    Lightning's time goes (ms per step per hook, `self.log`, each callback);
  * efficiency: FLOPs per example of a training step (FlopCounterMode) x examples/s over the
    machine's float32 peak measured here, torch.mm's and a 1x1 convolution's (oneDNN's GEMM,
    which on AMD CPUs outruns MKL's); per-shape convolution times (torch.profiler);
    channels_last and thread-count variants;
  * data: examples/s the real training loader (MelDataModule.train_dataloader()) delivers
    alone with 0 and 2 workers, over the training throughput; goal: 10x;
  * memory: private memory (USS) of the main process plus its loader workers while iterating
    and training on 25%, 50% and 100% of a collection of at least 2 hours of audio, each in a
    fresh process, to show it does not grow with the collection; beside it the tree's
    anonymous memory (summed Pss_Anon, which USS undercounts for forked workers) and the
    memory-mapped cache pages (musicvae/memory.py explains each).
A benchmark, not a test: timings depend on what else runs (the load average is recorded).
Without --data_dir the built-in synthetic music is used, rendered long enough (2 h).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from musicvae import arithmetic as A  # noqa: E402
from musicvae import benchmark as B  # noqa: E402
from musicvae import memory as M  # noqa: E402

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
    from musicvae.module import MusicVAEModule

    torch.manual_seed(0)
    return MusicVAEModule(n_mels=sizes.n_mels, frames=sizes.frames, latent_dim=sizes.latent_dim,
                          channels=list(sizes.channels))


def make_datamodule(args: argparse.Namespace, sizes: Sizes, num_workers: int = 0, data_dir: Optional[str] = None) -> Any:
    from musicvae.audio import MelSettings
    from musicvae.data import MelDataModule

    folder = data_dir or args.data_dir
    mel = MelSettings(n_mels=sizes.n_mels) if not (folder and (Path(folder) / "mel.json").exists()) else None
    return MelDataModule(data_dir=folder, cache_dir=args.cache_dir, frames=sizes.frames, batch_size=sizes.batch_size,
                         num_workers=num_workers, mel=mel, synthetic_pieces=sizes.synthetic_pieces,
                         synthetic_seconds=sizes.synthetic_seconds, prepare_workers=None)


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
    """The per-run callbacks scripts/train.py adds (musicvae/cli.py), minus the checkpoint ones."""
    from musicvae.callbacks import ApplyResumedLearningRate
    from musicvae.guards import NonFiniteGuard, Preemption
    from musicvae.rng import ResumableRandomState

    return [ApplyResumedLearningRate(None), ResumableRandomState(), NonFiniteGuard(0), Preemption(checkpoint_dir)]


# ----------------------------------------------------------------------------- sections

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


def loader_rate(loader: Any, max_batches: int) -> dict[str, Any]:
    """Examples/s of `loader` alone after its first batch (worker start-up, reported apart)."""
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    examples, batches = 0, 0
    start = time.perf_counter()
    for batch in iterator:
        examples += len(batch)
        batches += 1
        if batches >= max_batches:
            break
    seconds = time.perf_counter() - start
    del iterator
    return {"examples_per_s": examples / seconds, "batches": batches, "seconds": seconds, "first_batch_s": first}


def bench_data(args: argparse.Namespace, sizes: Sizes, train_rate: float) -> dict[str, Any]:
    result: dict[str, Any] = {"training_examples_per_s": train_rate, "goal_ratio": GOAL_DATA_RATIO}
    for workers in (0, 2):
        dm = make_datamodule(args, sizes, num_workers=workers)
        dm.setup("fit")
        loader = dm.train_dataloader()
        rate = loader_rate(loader, sizes.loader_batches)
        rate.update(ratio=rate["examples_per_s"] / train_rate, persistent_workers=workers > 0,
                    loader=type(loader).__name__, batches_per_epoch=len(loader))
        result[f"num_workers_{workers}"] = rate
        del loader, dm
    return result


def collection_folders(args: argparse.Namespace, sizes: Sizes, scratch: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Folders of links to the first 25/50/100% of the collection's log-mel arrays (the cache)."""
    from musicvae.audio import write_mel_sidecar

    dm = make_datamodule(args, sizes)
    start = time.perf_counter()
    dm.prepare_data()
    prepare_s = time.perf_counter() - start
    dm.setup("fit")
    sources = sorted(dm.sources, key=lambda s: s.rel)
    frame_s = dm.mel.hop_length / dm.mel.sample_rate
    total_h = sum(s.n_frames for s in sources) * frame_s / 3600
    folders = []
    for fraction in sizes.fractions:
        chosen = sources[: max(1, math.ceil(fraction * len(sources)))]
        folder = scratch / f"collection_{int(round(fraction * 100))}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, source in enumerate(chosen):
            link = folder / f"{i:04d}_{source.rel.replace('/', '_')}"
            link = link.with_suffix(Path(source.path).suffix)
            if not link.exists():
                link.symlink_to(source.path)
        write_mel_sidecar(folder, dm.mel)
        folders.append({
            "fraction": fraction, "folder": str(folder), "files": len(chosen),
            "hours": sum(s.n_frames for s in chosen) * frame_s / 3600,
            "cache_bytes": sum(os.path.getsize(s.path) for s in chosen),
        })
    return folders, {"files": len(sources), "hours": total_h, "prepare_s": prepare_s, "folder": str(dm.folder)}


def bench_memory(args: argparse.Namespace, sizes: Sizes, scratch: Path) -> dict[str, Any]:
    folders, collection = collection_folders(args, sizes, scratch)
    results = []
    for entry in folders:
        probe = {"folder": entry["folder"], "cache_dir": args.cache_dir, "device": args.device, "sizes": asdict(sizes),
                 "scratch": str(scratch)}
        done = subprocess.run([sys.executable, __file__, "--memory_probe", json.dumps(probe)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe on {entry['folder']} failed:\n{done.stderr[-3000:]}")
        results.append({**entry, **json.loads(done.stdout.strip().splitlines()[-1])})
    hours = [r["hours"] for r in results]
    growth = {}
    for phase in ("loader", "training"):
        for kind in ("uss", "anon", "pss", "file", "mapped"):
            growth[f"{phase}_{kind}_bytes_per_hour"] = M.growth_per_hour(hours, [r[phase]["steady"][kind] for r in results])
    cache_per_hour = M.growth_per_hour(hours, [r["cache_bytes"] for r in results])
    return {"collection": collection, "fractions": results, "growth": growth, "cache_bytes_per_hour": cache_per_hour}


class SampleEachStep(Callback):
    """Takes a memory sample after every training step (workers running), besides the timer's."""

    def __init__(self, sampler: M.MemorySampler) -> None:
        self.sampler = sampler

    def on_train_batch_end(self, *args: Any) -> None:
        self.sampler.sample()


def memory_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: memory while iterating the loader over a folder, then while training.

    Memory is sampled every 0.1 s by a thread, and besides after every 20th loader batch and
    every training step, so that short runs are caught with their workers running.
    """
    quiet()
    sizes = Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["sizes"].items()})
    args = argparse.Namespace(data_dir=spec["folder"], cache_dir=spec["cache_dir"])
    device = torch.device(spec["device"])
    module = make_module(sizes)
    baseline = M.tree_memory().as_dict()
    dm = make_datamodule(args, sizes, num_workers=2)
    dm.setup("fit")
    after_setup = M.tree_memory().as_dict()
    # The arrays the links point to: their mapped pages are the cache's share of the memory.
    prefixes = tuple(sorted({str(Path(os.path.realpath(p)).parent) + os.sep for p in Path(spec["folder"]).glob("*.npy")}))
    loader = dm.train_dataloader()
    loading = M.MemorySampler(interval=0.1, prefixes=prefixes)
    start = time.perf_counter()
    with loading:
        done = 0
        while done < sizes.memory_loader_batches:  # whole epochs, again and again
            for _ in loader:
                done += 1
                if done % 20 == 0:
                    loading.sample()
                if done >= sizes.memory_loader_batches:
                    break
            loading.sample()
    loading_s = time.perf_counter() - start
    loader._iterator = None  # persistent workers end with their iterator
    loader = None
    training = M.MemorySampler(interval=0.1, prefixes=prefixes)
    trainer = B.bench_trainer(device, [*project_callbacks(Path(spec["scratch"])), SampleEachStep(training)],
                              limit_train_batches=sizes.memory_steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with training:
        trainer.fit(module, datamodule=dm)
    result = {"baseline": baseline, "after_setup": after_setup, "loader": loading.summary(loading_s),
              "training": training.summary(time.perf_counter() - start), "train_segments": len(dm.train_set),
              "loader_batches": sizes.memory_loader_batches, "training_steps": sizes.memory_steps}
    if device.type == "cuda":
        result["gpu_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


# ----------------------------------------------------------------------------- report

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


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model and data, few repeats (tests)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--data_dir", help="music or mel folder (default: built-in synthetic music, 2 h)")
    parser.add_argument("--cache_dir", help="log-mel cache (default: $MUSICVAE_CACHE, else a temporary folder)")
    parser.add_argument("--sections", default="overhead,efficiency,data,memory",
                        help="comma-separated subset of overhead,efficiency,data,memory")
    parser.add_argument("--repeats", type=int, help="timed repeats per variant (overrides the size preset)")
    parser.add_argument("--steps", type=int, help="training steps per repeat (overrides the size preset)")
    parser.add_argument("--memory_probe", help=argparse.SUPPRESS)  # internal: one memory measurement
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(json.loads(args.memory_probe))))
        return 0
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
    report: dict[str, Any] = {"machine": machine(device), "sizes": asdict(sizes), "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}
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
            report["data"] = bench_data(args, sizes, train_rate)
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


if __name__ == "__main__":
    sys.exit(main())
