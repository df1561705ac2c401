"""The `musicvae` command: one entry point, subcommands imported only when chosen.

`musicvae fit ...` is LightningCLI (today's `python scripts/train.py`); the other subcommands are
jsonargparse parsers of their own. The table names each by a dotted path, so `musicvae --help`
imports none of them, and the product never imports the benchmark commands.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple, Optional


class Command(NamedTuple):
    target: str  # "module:function"; the function takes argv and returns an exit status
    summary: str
    group: str


_TRAIN = "musicvae.training.cli:subcommand_main"
COMMANDS: dict[str, Command] = {
    "fit": Command(_TRAIN, "train (no flags: the quickstart recipe); --ckpt_path resumes", "train"),
    "validate": Command(_TRAIN, "score a checkpoint on the validation split (val/*)", "train"),
    "test": Command(_TRAIN, "score a checkpoint on the validation split or --data.data_dir (test/*)", "train"),
    "predict": Command(_TRAIN, "write each recording's latent codes (one file per recording)", "train"),
    "prepare": Command("musicvae.commands.prepare:main", "build the log-mel cache of a music folder", "use"),
    "evaluate": Command("musicvae.commands.evaluate:main", "report the three problems on held-out music", "use"),
    "generate": Command("musicvae.commands.generate:main", "reconstruct, sample or interpolate: WAVs and PNGs", "use"),
    "export": Command("musicvae.commands.export:main",
                      "a TorchScript, torch.export (pt2) or ONNX program that runs without musicvae", "use"),
    "fit-prior": Command("musicvae.commands.fit_prior:main",
                         "fit a prior over a checkpoint's codes; generate samples from it", "use"),
    "checkpoints": Command("musicvae.commands.checkpoints:main", "list a run's checkpoints", "use"),
    "bench": Command("musicvae.benchmarks.commands.bench:main", "training speed and memory", "measure"),
    "bench-prepare": Command("musicvae.benchmarks.commands.bench_prepare:main",
                             "preparation speed against librosa", "measure"),
    "benchmark-quality": Command("musicvae.benchmarks.commands.benchmark_quality:main",
                                 "train, then compare with linear codes on a held-out folder", "measure"),
    "benchmark-map": Command("musicvae.benchmarks.commands.benchmark_map:main",
                             "what each latent size and training budget buys, on a held-out folder", "measure"),
    "compare": Command("musicvae.benchmarks.commands.compare:main", "standard vs improved recipe over seeds", "measure"),
    "linear-codes": Command("musicvae.benchmarks.commands.linear_codes:main",
                            "score linear codes on a held-out folder, no training", "measure"),
    "reliability": Command("musicvae.benchmarks.commands.reliability:main",
                           "kill training N times; survived / tried", "measure"),
}
GROUPS = {"train": "training (LightningCLI: --config, --print_config, every Trainer flag)",
          "use": "using a trained model", "measure": "measuring (tooling)"}


def usage() -> str:
    lines = ["usage: musicvae COMMAND [flags]   (musicvae COMMAND --help for its flags)", ""]
    for group, title in GROUPS.items():
        lines.append(f"{title}:")
        lines += [f"  {name:<18} {cmd.summary}" for name, cmd in COMMANDS.items() if cmd.group == group]
        lines.append("")
    return "\n".join(lines)


def run(name: str, argv: Sequence[str], program: str = "musicvae") -> int:
    """Import and run one subcommand with its own flags; returns its exit status. `program` is how the
    user started it, for the commands the training subcommands print (`musicvae fit --ckpt_path ...`)."""
    module_name, function = COMMANDS[name].target.split(":")
    entry = getattr(importlib.import_module(module_name), function)
    status = entry([name, *argv], program=program) if COMMANDS[name].target == _TRAIN else entry(list(argv))
    return status if isinstance(status, int) else 0  # bench-prepare returns its results


def main(argv: Optional[Sequence[str]] = None, program: str = "musicvae") -> int:
    """`musicvae` console entry point (`program`: how it was started, `python -m musicvae` by __main__)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from musicvae import __version__

        print(f"musicvae {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        sys.stderr.write(f"musicvae: unknown command '{name}'{hint} (musicvae --help lists them)\n")
        return 2
    return run(name, rest, program)
