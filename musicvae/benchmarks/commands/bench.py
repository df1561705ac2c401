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
    alone with 0 and 2 workers, and the device path (`--data.device_cache true`: crops cut on
    the bench device from the training log-mels kept there), over the training throughput;
    goal: 10x;
  * memory: private memory (USS) of the main process plus its loader workers while iterating
    and training on 25%, 50% and 100% of a collection of at least 2 hours of audio, each in a
    fresh process, to show it does not grow with the collection; beside it the tree's
    anonymous memory (summed Pss_Anon, which USS undercounts for forked workers) and the
    memory-mapped cache pages (musicvae/benchmarks/memory.py explains each).
A benchmark, not a test: timings depend on what else runs (the load average is recorded).
Without --data_dir the built-in synthetic music is used, rendered long enough (2 h).
The sections are in musicvae/bench_*.py; this script parses the options.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional


from musicvae.benchmarks.speed_memory import memory_probe
from musicvae.benchmarks.speed_report import run
from musicvae.commands.parsing import command_parser, parse_command


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = command_parser("bench", __doc__.split("\n\n")[0])
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
    return parse_command(parser, argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.memory_probe:  # kept for old callers; the bench itself runs `python -m musicvae.benchmarks.speed_memory`
        print(json.dumps(memory_probe(json.loads(args.memory_probe))))
        return 0
    return run(args, " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())
