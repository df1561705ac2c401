"""Memory section of scripts/bench.py: private memory (USS) of the main process and its loader
workers while iterating and training on 25%, 50% and 100% of a collection, each in a fresh
process (`python -m musicvae.benchmarks.speed_memory SPEC`), to show it does not grow with the collection."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from musicvae.benchmarks import timing as B
from musicvae.benchmarks import memory as M
from musicvae.benchmarks.speed_setup import Sizes, make_datamodule, make_module, project_callbacks, quiet


def collection_folders(args: argparse.Namespace, sizes: Sizes, scratch: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Folders of links to the first 25/50/100% of the collection's log-mel arrays (the cache)."""
    from musicvae.audio.mel_settings import write_mel_sidecar

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
        done = subprocess.run([sys.executable, "-m", "musicvae.benchmarks.speed_memory", json.dumps(probe)],
                              capture_output=True, text=True, env=_importable())
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


def _importable() -> dict[str, str]:
    """The environment with this checkout first on PYTHONPATH: the probe imports it, installed or not."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


if __name__ == "__main__":
    print(json.dumps(memory_probe(json.loads(sys.argv[1]))))
