"""Training-speed measurements for `scripts/bench.py`: pure functions and small runners.

- Lightning against plain PyTorch: `plain_epoch` does by hand what Lightning's automatic
  optimization does for `MusicVAEModule` (forward, `compute_loss`, the logged values' epoch
  means, zero_grad, backward, clipping the global gradient norm, the optimizer step), and
  `lightning_epoch` runs the same module under `Trainer.fit`; both read the same in-memory
  batches (`fixed_loader`) and time one epoch.
- Where Lightning's extra time goes: `lightning_profile` (SimpleProfiler, `self.log`, each
  callback) and `python_hotspots` (cProfile).
- Helpers: `median`, `overhead`, `spread`, `alternate`.
FLOPs and convolution times are in `musicvae/benchmarks/arithmetic.py`, memory in `musicvae/benchmarks/memory.py`; the
benchmark's sections, run and table in `musicvae/bench_*.py`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.profilers import SimpleProfiler
from torch.utils.data import DataLoader, Dataset

#: Gradient clipping of the recipes (configs/improved.yaml: gradient_clip_val 1.0, norm).
CLIP = 1.0


# ----------------------------------------------------------------------------- statistics

def median(values: Sequence[float]) -> float:
    """The median; raises ValueError on an empty sequence."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def overhead(slow_s: float, fast_s: float) -> float:
    """Relative extra time: `slow_s / fast_s - 1` (0.03 is 3% slower)."""
    if fast_s <= 0:
        raise ValueError(f"reference time must be positive, got {fast_s}")
    return slow_s / fast_s - 1.0


def spread(values: Sequence[float]) -> float:
    """Interquartile range over the median: how noisy repeated timings are (0 for < 2 values)."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return float((q3 - q1) / statistics.median(values))


def alternate(runners: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Call the runners round-robin (A, B, C, A, B, C, ...), `warmup + repeats` rounds.

    Interleaving spreads a machine's drifts (other jobs, clocks) over every variant alike.
    Returns each runner's results after the discarded warm-up rounds.
    """
    results: dict[str, list[float]] = {name: [] for name in runners}
    for round_ in range(warmup + repeats):
        for name, run in runners.items():
            value = run()
            if round_ >= warmup:
                results[name].append(value)
    return results


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a clock read after it covers the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- batches

class _Batches(Dataset):
    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.batches[index]


def fixed_loader(batches: list[torch.Tensor]) -> DataLoader:
    """A DataLoader that hands out ready-made batches in order, in this process (no workers)."""
    return DataLoader(_Batches(batches), batch_size=None, shuffle=False, num_workers=0)


# ----------------------------------------------------------------------------- the two loops

class _Clock:
    """Accumulates seconds per named phase (synchronising the GPU at each boundary)."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device, self.enabled = device, enabled
        self.seconds: dict[str, float] = {}
        self._last = 0.0

    def start(self) -> None:
        if self.enabled:
            sync(self.device)
            self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.enabled:
            sync(self.device)
            now = time.perf_counter()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
            self._last = now


def plain_epoch(
    module: Any,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    clip: float = CLIP,
    log: bool = True,
    phases: Optional[dict[str, float]] = None,
) -> float:
    """One epoch of `module` (a MusicVAEModule) in plain PyTorch; returns its wall seconds.

    The work of Lightning's automatic optimization with `gradient_clip_val=clip`: a fresh
    optimizer from `module.build_optimizers()` (Lightning makes one per fit; no schedule), and per batch
    the forward pass, `compute_loss`, the loss NonFiniteGuard keeps, zero_grad,
    backward, `clip_grad_norm_` over the optimizer's parameters and the step. With `log`, the
    logged values' batch-weighted epoch means are accumulated as `self.log(on_epoch=True)` does.
    With a `phases` dict, seconds per phase are added to it (timing each phase syncs the GPU).
    """
    module.to(device)
    module.train()
    [optimizer] = module.build_optimizers()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sums: dict[str, torch.Tensor] = {}
    count = 0
    clock = _Clock(device, phases is not None)
    sync(device)
    start = time.perf_counter()
    clock.start()
    for batch in batches:
        batch = batch.to(device, non_blocking=device.type == "cuda")
        clock.lap("data")
        x_hat, mu, logvar = module(batch)  # as training_step: forward() applies channels_last
        parts = module.compute_loss(x_hat, batch, mu, logvar)
        guarded = parts["loss"].detach()  # noqa: F841 - NonFiniteGuard's per-step copy of the loss
        clock.lap("forward+loss")
        if log:
            for key, value in parts.items():
                weighted = value.detach() * len(batch)
                sums[key] = sums[key] + weighted if key in sums else weighted
            count += len(batch)
            clock.lap("log")
        optimizer.zero_grad()
        clock.lap("zero_grad")
        parts["loss"].backward()
        clock.lap("backward")
        torch.nn.utils.clip_grad_norm_(params, clip)
        clock.lap("clip")
        optimizer.step()
        clock.lap("optimizer.step")
    if log and count:
        module.plain_epoch_means = {k: float(v / count) for k, v in sums.items()}
    sync(device)
    seconds = time.perf_counter() - start
    if phases is not None:
        for phase, value in clock.seconds.items():
            phases[phase] = phases.get(phase, 0.0) + value
    return seconds


class EpochTimer(Callback):
    """Wall seconds of the training epoch (first hook at its start to its end), GPU synced."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: Optional[float] = None
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._start


def bench_trainer(device: torch.device, callbacks: list[Callback], clip: float = CLIP, **kwargs: Any) -> L.Trainer:
    """The Trainer scripts/train.py builds (atomic checkpoint IO, clipping of the recipes) minus
    checkpoint writing, logging, progress bar and model summary, for one epoch without validation."""
    from musicvae.training.run_callbacks import with_atomic_checkpoints  # the CLI's own plugin list

    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=clip,
        gradient_clip_algorithm="norm",
        num_sanity_val_steps=0,
        limit_val_batches=0,
        plugins=with_atomic_checkpoints(None),
        callbacks=callbacks,
        **kwargs,
    )


def lightning_epoch(module: Any, loader: DataLoader, device: torch.device, callbacks: list[Callback], **kwargs: Any) -> float:
    """Seconds of one training epoch of `module` under `Trainer.fit` (start-up excluded)."""
    timer = EpochTimer(device)
    trainer = bench_trainer(device, [timer, *callbacks], **kwargs)
    trainer.fit(module, train_dataloaders=loader)
    if timer.seconds is None:
        raise RuntimeError("the training epoch did not run")
    return timer.seconds


def per_step_ms(durations: Sequence[float], steps: int) -> float:
    """Milliseconds per step of calls that took `durations` seconds over `steps` steps, counting
    each call at the median duration: a call slowed down by another job counts as a typical one."""
    if not durations:
        return 0.0
    return 1e3 * median(durations) * len(durations) / steps


def lightning_profile(module: Any, loader: DataLoader, device: torch.device, callbacks: Callable[[], list[Callback]],
                      epochs: int = 1) -> dict[str, Any]:
    """Milliseconds per step of each Lightning action (SimpleProfiler) and of `self.log` calls,
    over `epochs` fits (a fresh Trainer and `callbacks()` each), each call at its median (`per_step_ms`).

    Returns {"steps", "epoch_ms_per_step", "actions": {name: ms/step}, "log_ms_per_step",
    "callbacks_ms_per_step": {callback class: ms/step over all its hooks}}.
    """
    durations: dict[str, list[float]] = {}
    log_calls: list[float] = []

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                log_calls.append(time.perf_counter() - start)
        return wrapper

    epoch_seconds = []
    module.log, module.log_dict = timed(module.log), timed(module.log_dict)
    try:
        for _ in range(epochs):
            profiler = SimpleProfiler()
            epoch_seconds.append(lightning_epoch(module, loader, device, callbacks(), profiler=profiler))
            for name, values in profiler.recorded_durations.items():
                durations.setdefault(name, []).extend(values)
    finally:
        del module.log, module.log_dict  # back to the class's methods
    steps = len(loader) * epochs
    actions = {name: per_step_ms(d, steps) for name, d in durations.items()}
    per_callback: dict[str, float] = {}
    for name, ms in actions.items():
        if name.startswith("[Callback]"):
            owner = name[len("[Callback]"):].split(".", 1)[0]
            per_callback[owner] = per_callback.get(owner, 0.0) + ms
    return {
        "steps": steps,
        "epoch_ms_per_step": 1e3 * median(epoch_seconds) / len(loader),
        "log_ms_per_step": per_step_ms(log_calls, steps),
        "callbacks_ms_per_step": per_callback,
        "actions": dict(sorted(actions.items(), key=lambda kv: -kv[1])),
    }


#: Lightning functions whose cumulative time `python_hotspots` reports by name: the path of a
#: `self.log` call (Lightning 2.6: module.log -> _ResultCollection.log -> _ResultMetric.to/forward).
WATCHED = {
    "LightningModule.log": ("lightning/pytorch/core/module.py", "log"),
    "_ResultCollection.log": ("logger_connector/result.py", "log"),
    "_ResultMetric.to": ("logger_connector/result.py", "to"),
    "_ResultMetric.forward": ("logger_connector/result.py", "forward"),
}


def _short(path: str) -> str:
    for marker in ("site-packages/", "/musicvae/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def python_hotspots(fn: Callable[[], Any], steps: int, top: int = 12) -> dict[str, Any]:
    """The Python functions with the most time of their own during `fn()` (cProfile), per step.

    cProfile adds a cost to every Python call, so these figures overstate Python's share of
    a step; they rank where the interpreter spends its time. Built-ins (torch kernels,
    isinstance) are left out of the ranking. `watched` gives the cumulative time of WATCHED.
    """
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        fn()
    finally:
        profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (primitive calls, calls, own s, cumulative s, callers)}
    rows, watched = [], {}
    for (path, line, name), (_, calls, own, cumulative, _) in stats.items():
        for label, (suffix, function) in WATCHED.items():
            # Several methods may share a name in one file: the most called one is the per-step path.
            if name == function and path.endswith(suffix) and calls / steps > watched.get(label, {}).get("calls_per_step", -1):
                watched[label] = {"calls_per_step": calls / steps, "cumulative_ms_per_step": 1e3 * cumulative / steps}
        if path.startswith(("~", "<")):
            continue
        rows.append({"function": f"{_short(path)}:{line}({name})", "calls_per_step": calls / steps,
                     "self_ms_per_step": 1e3 * own / steps, "cumulative_ms_per_step": 1e3 * cumulative / steps})
    rows.sort(key=lambda r: -r["self_ms_per_step"])
    return {"top_self": rows[:top], "watched": watched}


def examples_per_s(batch_size: int, steps: int, seconds: float) -> float:
    """Throughput of `steps` batches of `batch_size` in `seconds`."""
    if seconds <= 0 or not math.isfinite(seconds):
        raise ValueError(f"seconds must be positive and finite, got {seconds}")
    return batch_size * steps / seconds
