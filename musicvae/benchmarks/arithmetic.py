"""Arithmetic efficiency of a training step: FLOPs counted by torch, the machine's matmul peak,
and per-shape convolution times from torch.profiler (for `scripts/bench.py`).

FLOPs are torch's FlopCounterMode counts (2 per multiply-add of matmuls and convolutions);
norms, activations and the FFT of the spectral loss move memory but add no counted FLOPs.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from musicvae.benchmarks.timing import median, sync


def conv2d_flops(batch: int, in_ch: int, out_ch: int, kernel: tuple[int, int], out_hw: tuple[int, int], groups: int = 1) -> int:
    """Multiply-adds x 2 of a 2-D convolution's forward pass (bias not counted, as FlopCounterMode)."""
    return 2 * batch * out_ch * out_hw[0] * out_hw[1] * (in_ch // groups) * kernel[0] * kernel[1]


def training_step_loss(module: Any, batch: torch.Tensor) -> torch.Tensor:
    """Forward and `compute_loss` of one batch: the loss to call backward on."""
    x_hat, mu, logvar = module(batch)  # as training_step: forward() applies channels_last
    return module.compute_loss(x_hat, batch, mu, logvar)["loss"]


def training_flops(module: Any, batch: torch.Tensor) -> dict[str, Any]:
    """FLOPs of one training step (forward, loss, backward; the optimizer is elementwise, uncounted).

    Returns {"total", "conv" (convolution forward + backward), "per_example", "conv_share",
    "by_op": {aten op: FLOPs}}. FlopCounterMode counts matmuls and convolutions only: norms,
    activations and the FFT of the spectral loss add memory traffic but no counted FLOPs.
    """
    module.train()
    counter = FlopCounterMode(display=False)
    with counter:
        training_step_loss(module, batch).backward()
    module.zero_grad(set_to_none=True)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    total = int(counter.get_total_flops())
    conv = sum(n for op, n in by_op.items() if "convolution" in op)
    return {"total": total, "conv": conv, "per_example": total / len(batch),
            "conv_share": conv / total if total else 0.0, "by_op": by_op}


def matmul_peak(device: torch.device, n: int = 2048, reps: int = 8, rounds: int = 5,
                dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """FLOP/s of `reps` back-to-back n x n matmuls, `rounds` times after a warm-up.

    `best` (the fastest round) is the peak a kernel can reach here; `median` shows the noise.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    rates = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        sync(device)
        rates.append(2 * n**3 * reps / (time.perf_counter() - start))
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "best": max(rates), "median": median(rates), "rounds": rates}



def conv1x1_peak(device: torch.device, channels: int = 1024, size: int = 64, reps: int = 4, rounds: int = 5) -> dict[str, Any]:
    """FLOP/s of a 1x1 convolution, a (size^2 x channels) @ (channels x channels) GEMM run by the
    convolution library (oneDNN on a CPU, cuDNN on a GPU) rather than the BLAS behind torch.mm.

    On AMD CPUs MKL's sgemm (torch.mm) takes a slower code path than oneDNN's AVX-512 kernels,
    so the convolutions of a training step can outrun the torch.mm "peak"; this is the peak
    those kernels reach on a convolution that is all GEMM.
    """
    conv = torch.nn.Conv2d(channels, channels, 1, bias=False).to(device)
    x = torch.randn(1, channels, size, size, device=device)
    flops = 2 * channels * channels * size * size * reps
    rates = []
    with torch.no_grad():
        conv(x)
        for _ in range(rounds):
            sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                conv(x)
            sync(device)
            rates.append(flops / (time.perf_counter() - start))
    return {"channels": channels, "size": size, "best": max(rates), "median": median(rates), "rounds": rates}


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_layer_names(module: torch.nn.Module, batch: torch.Tensor) -> dict[tuple, list[str]]:
    """(input shape, weight shape) -> names of the Conv2d layers that see it, from one forward pass."""
    names: dict[tuple, list[str]] = {}
    handles = []
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Conv2d):
            def hook(mod: torch.nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
                names.setdefault((tuple(args[0].shape), tuple(mod.weight.shape)), []).append(name)
            handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module.vae(batch)
    finally:
        for handle in handles:
            handle.remove()
    return names


def conv_profile(module: Any, batch: torch.Tensor, device: torch.device, peak: float, steps: int = 2) -> dict[str, Any]:
    """Per-shape convolution times of training steps (torch.profiler) against the matmul peak.

    Layers with the same input and weight shapes are one row. Times are per step, of
    `aten::convolution` (forward) and `aten::convolution_backward`, including their children;
    on a GPU, kernel time. FLOPs are computed from the recorded shapes and arguments.
    """
    from torch.profiler import ProfilerActivity, profile

    module.to(device).train()
    batch = batch.to(device)
    names = conv_layer_names(module, batch)
    training_step_loss(module, batch).backward()  # warm-up: first-call kernel selection
    module.zero_grad(set_to_none=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities, record_shapes=True, acc_events=True) as prof:
        for _ in range(steps):
            training_step_loss(module, batch).backward()
            module.zero_grad(set_to_none=True)
        sync(device)
    step_s = (time.perf_counter() - start) / steps
    rows: dict[tuple, dict[str, Any]] = {}
    for event in prof.events():
        if event.name not in ("aten::convolution", "aten::convolution_backward"):
            continue
        shapes, args = event.input_shapes, list(event.concrete_inputs or [])
        seconds = (event.device_time_total if device.type == "cuda" else event.cpu_time_total) * 1e-6
        if event.name == "aten::convolution":
            x, w = shapes[0], shapes[1]
            stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
            out_hw = tuple(_out_size(x[2 + i], w[2 + i], stride[i], padding[i], dilation[i]) for i in range(2))
            flops = conv2d_flops(x[0], x[1], w[0], (w[2], w[3]), out_hw, groups)
            kind = "forward"
        else:
            g, x, w = shapes[0], shapes[1], shapes[2]
            groups, mask = args[9], args[10]
            one = conv2d_flops(x[0], x[1], w[0], (w[2], w[3]), (g[2], g[3]), groups)
            flops = one * (int(bool(mask[0])) + int(bool(mask[1])))  # grad input, grad weight
            kind = "backward"
        key = (tuple(x), tuple(w))
        row = rows.setdefault(key, {"layers": names.get(key, []), "input": list(x), "weight": list(w),
                                    "forward_s": 0.0, "backward_s": 0.0, "forward_flops": 0, "backward_flops": 0})
        row[f"{kind}_s"] += seconds / steps
        row[f"{kind}_flops"] += flops // steps
    table = []
    for row in rows.values():
        total_s = row["forward_s"] + row["backward_s"]
        total_flops = row["forward_flops"] + row["backward_flops"]
        row["flops_per_s"] = total_flops / total_s if total_s else 0.0
        row["forward_fraction_of_peak"] = row["forward_flops"] / row["forward_s"] / peak if row["forward_s"] else 0.0
        row["backward_fraction_of_peak"] = row["backward_flops"] / row["backward_s"] / peak if row["backward_s"] else 0.0
        row["fraction_of_peak"] = row["flops_per_s"] / peak
        table.append(row)
    table.sort(key=lambda r: -(r["forward_s"] + r["backward_s"]))
    conv_s = sum(r["forward_s"] + r["backward_s"] for r in table)
    conv_flops = sum(r["forward_flops"] + r["backward_flops"] for r in table)
    return {
        "step_s": step_s,
        "conv_s": conv_s,
        "conv_time_share": conv_s / step_s if step_s else 0.0,
        "conv_flops": conv_flops,
        "conv_flops_per_s": conv_flops / conv_s if conv_s else 0.0,
        "conv_fraction_of_peak": conv_flops / conv_s / peak if conv_s else 0.0,
        "layers": table,
    }


def channels_last(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The batches in NHWC memory order (same values and shapes)."""
    return [b.contiguous(memory_format=torch.channels_last) for b in batches]


