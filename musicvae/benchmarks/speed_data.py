"""Data section of scripts/bench.py: examples/s the training data path delivers alone, against training.

Two paths (keep the cache on the GPU and crop there, or stream from pinned memory, whichever
the measurement says is faster):
  * the loader path: MelDataModule.train_dataloader() with 0 and 2 workers, its batches left
    in host memory as the loader yields them;
  * the device path (`--data.device_cache true`, musicvae/data/device_crops.py): the crop plans from
    the same loader, moved to the bench device and cut there, i.e. batches ready on the device.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from musicvae.benchmarks import timing as B
from musicvae.benchmarks.speed_setup import GOAL_DATA_RATIO, Sizes, make_datamodule
from musicvae.data.device_crops import cache_bytes, check_fits
from musicvae.errors import ConfigError


def loader_rate(loader: Any, max_batches: int, deliver: Optional[Callable[[Any], torch.Tensor]] = None,
                device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """Examples/s of `loader` alone after its first batch (worker start-up, reported apart).

    With `deliver`, each batch is passed through it (the device path: plan -> crops on `device`)
    and the clock is read after `device` has finished the work.
    """
    deliver = deliver or (lambda batch: batch)
    start = time.perf_counter()
    iterator = iter(loader)
    deliver(next(iterator))
    B.sync(device)
    first = time.perf_counter() - start
    examples, batches = 0, 0
    start = time.perf_counter()
    for batch in iterator:
        examples += len(deliver(batch))
        batches += 1
        if batches >= max_batches:
            break
    B.sync(device)
    seconds = time.perf_counter() - start
    del iterator
    return {"examples_per_s": examples / seconds, "batches": batches, "seconds": seconds, "first_batch_s": first}


def device_path_rate(args: argparse.Namespace, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Examples/s of the device path on `device`: plans from a 0-worker loader, moved there, cut there.

    The first batch, reported apart, includes copying the training log-mels to the device.
    """
    dm = make_datamodule(args, sizes, device_cache=True)
    dm.setup("validate")  # the split and statistics, without the cache yet
    nbytes = cache_bytes(dm.train_set)
    try:
        check_fits(nbytes, device)  # what training on this device would refuse
    except ConfigError as err:
        return {"refused": str(err), "cache_bytes": nbytes}
    loader = dm.train_dataloader()  # builds the cache in host memory
    non_blocking = device.type == "cuda"

    def deliver(plan: dict[str, torch.Tensor]) -> torch.Tensor:
        on_device = {key: value.to(device, non_blocking=non_blocking) for key, value in plan.items()}
        return dm.on_after_batch_transfer(on_device, 0)

    rate = loader_rate(loader, sizes.loader_batches, deliver, device)
    rate.update(device=str(device), cache_bytes=nbytes, num_workers=0, batches_per_epoch=len(loader))
    return rate


def bench_data(args: argparse.Namespace, sizes: Sizes, train_rate: float,
               device: torch.device = torch.device("cpu")) -> dict[str, Any]:
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
    rate = device_path_rate(args, sizes, device)
    if "examples_per_s" in rate:
        rate["ratio"] = rate["examples_per_s"] / train_rate
    result["device_path"] = rate
    return result
