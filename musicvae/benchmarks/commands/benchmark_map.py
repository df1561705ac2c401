"""The map a user chooses from: what each latent size and each training budget buys, on one held-out folder.

`musicvae benchmark-map --train_dir DIR --test_dir DIR --out DIR [--sizes 32,64,128,256,512]
[--ckpt LABEL=PATH ...] [--two_sample_seeds 3] [--reference_size 128] [--frames 128] [--seed 0]
[--cache_dir DIR] [--data.mel.* ...]`, or `musicvae benchmark-map --merge DIR DIR ... --out DIR`: one
map from earlier runs on the same data (the linear codes once, checkpoints as their training ends).

Prepares both folders as `linear-codes` does (the training folder's training split by --seed, z-scored
with its statistics; every window of the test folder) and scores, at alpha 0 on the same held-out
windows: the frozen 2-D DCT code and PCA (fitted on the training windows) at each of --sizes, and each
--ckpt (a trained checkpoint: its latent size and global step read from it, its posterior mean decoded).
Per row: MSE and its ratio to PCA-{reference} and to PCA of the same size, both Fréchet realism
distances over their floor, and the classifier two-sample accuracy with its moment-matched-noise
control (musicvae.benchmarks.latent_map). Writes results.json, results.md and map.png into --out.
"""

import json
import math
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from musicvae.benchmarks.commands.benchmark_quality import check_folders
from musicvae.benchmarks.commands.linear_codes import data_modules, prepared
from musicvae.benchmarks.latent_map import (Decoder, add_ratios, checkpoint_decoder, map_figure, markdown_lines,
                                            merge_results, score_decoder, summary, two_sample_row)
from musicvae.evaluation.two_sample_report import TwoSampleWindows
from musicvae.commands.parsing import add_mel_arguments, command_parser, mel_settings, parse_command, report_error
from musicvae.data.segments import Normalizer
from musicvae.errors import CheckpointError, ConfigError, DataError, MusicVAEError
from musicvae.evaluation.report import write_json
from musicvae.models.linear_codes import fit_pca, fit_separable_code

DEFAULT_SIZES = "32,64,128,256,512"
#: A label names a row in tables, figures and JSON: plain characters only (it is printed as given).
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,39}")


def parse_sizes(text: str) -> list[int]:
    """``"32,128"`` -> ``[32, 128]`` (sorted, unique); ConfigError naming --sizes otherwise."""
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"--sizes {text!r}: give comma-separated code sizes of at least 1, e.g. {DEFAULT_SIZES}")
    return sizes


def parse_checkpoints(values: list[str]) -> list[tuple[str, Path]]:
    """``["a=x.ckpt", "b=y.ckpt,c=z.ckpt"]`` -> ``[(label, path), ...]``; ConfigError naming the bad entry."""
    found: list[tuple[str, Path]] = []
    for entry in (part.strip() for value in values for part in value.split(",") if part.strip()):
        label, sep, path = entry.partition("=")
        if not sep or not path or not LABEL.fullmatch(label):
            raise ConfigError(f"--ckpt {entry!r}: give LABEL=PATH, the label of letters, digits and _.+- "
                             "(at most 40), e.g. --ckpt latent128=runs/l128/ckpt/best.ckpt")
        if label in (seen for seen, _ in found):
            raise ConfigError(f"--ckpt {label}: two checkpoints share this label; give each its own")
        found.append((label, Path(path)))
    return found


def load_checkpoint_decoder(label: str, path: Path, train_dm, frames: int, log) -> Decoder:
    """A checkpoint as a row of the map, checked against the data (frames, mel settings), through the
    project's weights-only loader (musicvae.inference.loading.load_module). Its decoder is bound to the
    training folder's normaliser, which holds the statistics once the data are prepared."""
    from musicvae.audio.mel_settings import MelSettings
    from musicvae.inference.loading import load_module
    from musicvae.training.checkpoints import DATA_STATE_KEY

    if not path.is_file():
        raise CheckpointError(f"--ckpt {label}={path}: no such checkpoint file")
    module, ckpt = load_module(path)
    state = ckpt.get(DATA_STATE_KEY) or {}
    where = f"--ckpt {label}={path}"
    if int(module.hparams.frames) != frames:
        raise ConfigError(f"{where}: trained on windows of {int(module.hparams.frames)} frames; pass --frames "
                          f"{int(module.hparams.frames)} (every row is scored on the same windows)")
    try:
        mel = MelSettings.from_dict(dict(state.get("mel") or {}), source=where)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: unreadable mel settings ({err})") from None
    differ = mel.differences(train_dm.mel)
    if differ:
        flags = " ".join(f"--data.mel.{key} {mine}" for key, (mine, _) in differ.items())
        raise ConfigError(f"{where}: trained on other mel settings than the data's; pass {flags}")
    try:
        theirs = Normalizer(float(state["mean"]), float(state["std"]))
    except (KeyError, TypeError, ValueError):
        theirs = Normalizer(math.nan, math.nan)
    if not (math.isfinite(theirs.mean) and math.isfinite(theirs.std) and theirs.std > 0):
        raise CheckpointError(f"{where}: no usable normalisation statistics (mean, std) in its data state")
    step = ckpt.get("global_step")
    step = step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None
    size = int(module.hparams.latent_dim)
    if state.get("seed") != train_dm.seed:
        log(f"{label}: its training split used seed {state.get('seed')}, the linear codes' --seed "
            f"{train_dm.seed}: their training windows differ")
    log(f"{label}: latent size {size}, global step {step}")
    return Decoder("vae", label, size, checkpoint_decoder(module, train_dm.normalizer, theirs), step,
                   str(path.resolve()), {"normalization": {"mean": theirs.mean, "std": theirs.std}})


def linear_decoder(kind: str, train_x: torch.Tensor, shape: tuple[int, int], size: int) -> Decoder:
    """The frozen 2-D DCT code (``dct``) or PCA (``pca``) with `size` components, fitted on `train_x`."""
    code = fit_separable_code(train_x, shape, size, "dct") if kind == "dct" else fit_pca(train_x, size)
    return Decoder(kind, f"{kind}-{size}", size, code.reconstruct, extra={"method": code.method})


def benchmark(args: Any, checkpoints: list[tuple[str, Path]], sizes: list[int], log) -> dict[str, Any]:
    started = time.monotonic()
    check_folders(args.train_dir, args.test_dir)
    train_dm, test_dm = data_modules(args.train_dir, args.test_dir, args.frames, args.seed, args.cache_dir,
                                     mel_settings(args))
    vaes = [load_checkpoint_decoder(label, path, train_dm, args.frames, log) for label, path in checkpoints]
    train_x, test = prepared(train_dm, test_dm)
    n_mels, n_train, dim = train_dm.n_mels, len(train_x), train_x.shape[1]
    log(f"{n_train} training windows, {len(test)} test windows of {n_mels}x{args.frames} "
        f"({time.monotonic() - started:.0f} s)")
    pca_sizes = sorted({*sizes, args.reference_size, *(d.size for d in vaes)})
    if max(pca_sizes) > min(n_train, dim):
        raise DataError(f"--train_dir {args.train_dir}: {n_train} training windows of {n_mels}x{args.frames} cannot "
                        f"give PCA-{max(pca_sizes)} (--sizes, --reference_size and the checkpoints' latent sizes); "
                        "lower them, or add music")
    seeds = list(range(args.two_sample_seeds))
    two = TwoSampleWindows(test, seeds) if seeds else None
    floors: dict[str, Any] = {"two_sample": summary(two.floor()) if two else None}
    if two:
        log(f"two-sample floor {floors['two_sample']['accuracy']:.3f} ({time.monotonic() - started:.0f} s)")

    def scored(decoder: Decoder, with_two_sample: bool = True) -> dict[str, Any]:
        t0 = time.monotonic()
        found = score_decoder(decoder.decode, test, n_mels)
        floors["realism"], floors["realism_per_half"] = found.pop("floor"), found.pop("windows_per_half")
        row = {"kind": decoder.kind, "label": decoder.label, "latent_size": decoder.size,
               "global_step": decoder.global_step, "path": decoder.path, **decoder.extra, **found}
        if two and with_two_sample:
            row["two_sample"] = two_sample_row(two, decoder.decode)
        test_text = f", two-sample {row['two_sample']['accuracy']:.3f}" if "two_sample" in row else ""
        log(f"{decoder.label}: MSE {row['mse']:.4g}, realism {row['realism']['frames']:.4g} / "
            f"{row['realism']['differences']:.4g}{test_text} ({time.monotonic() - t0:.0f} s)")
        return row

    rows, references = [], []
    for size in sizes:
        rows.append(scored(linear_decoder("dct", train_x, (n_mels, args.frames), size)))
    for size in pca_sizes:  # every PCA a ratio needs; the ones off --sizes without a two-sample test
        row = scored(linear_decoder("pca", train_x, (n_mels, args.frames), size), size in sizes)
        (rows if size in sizes else references).append(row)
    rows += [scored(decoder) for decoder in vaes]
    pca_mse = {r["latent_size"]: r["mse"] for r in [*rows, *references] if r["kind"] == "pca"}
    add_ratios(rows, pca_mse, args.reference_size, floors["realism"])
    add_ratios(references, pca_mse, args.reference_size, floors["realism"])
    log(f"done in {time.monotonic() - started:.0f} s")
    return {"command": "musicvae benchmark-map " + shlex.join(args.argv), "reference_size": args.reference_size,
            "sizes": sizes, "two_sample_seeds": seeds,
            "data": {"train_dir": str(train_dm.folder), "test_dir": str(test_dm.folder), "frames": args.frames,
                     "seed": args.seed, "mel": train_dm.mel.to_dict(),
                     "normalization": {"mean": train_dm.normalizer.mean, "std": train_dm.normalizer.std}},
            "windows": {"train": n_train, "test": len(test), "realism_per_half": floors.pop("realism_per_half"),
                        "two_sample_per_side": len(two.real) if two else None},
            "floors": floors, "rows": rows, "pca_references": references, "seconds": time.monotonic() - started}


def read_results(folder: Path) -> dict[str, Any]:
    """An earlier run's results.json, as data: a missing or foreign file is refused in one line."""
    path = folder / "results.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"--merge {folder}: cannot read {path} ({err}); give a folder benchmark-map wrote") from None
    keys = ("command", "data", "windows", "floors", "rows", "pca_references", "sizes", "two_sample_seeds",
            "reference_size", "seconds")
    if not isinstance(result, dict) or any(key not in result for key in keys):
        raise DataError(f"--merge {folder}: {path} is not a benchmark-map result (it lacks "
                        f"{', '.join(k for k in keys if not isinstance(result, dict) or k not in result)})")
    return result


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = command_parser("benchmark-map", __doc__.splitlines()[0])
    parser.add_argument("--train_dir", help="folder the linear codes are fitted on (its training split)")
    parser.add_argument("--test_dir", help="held-out folder: every recording is scored")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                        help="instead of scoring: one map from these earlier --out folders (same data and --seed)")
    parser.add_argument("--out", required=True, help="results folder (created): results.json, results.md, map.png")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="latent sizes of the linear codes (default: %(default)s)")
    parser.add_argument("--ckpt", action="append", default=[], metavar="LABEL=PATH",
                        help="a trained checkpoint to place on the map (repeatable, or comma-separated); its latent "
                             "size and global step are read from it")
    parser.add_argument("--two_sample_seeds", type=int, default=3,
                        help="classifier seeds per two-sample test (0: no two-sample test; default: %(default)s)")
    parser.add_argument("--reference_size", type=int, default=128,
                        help="every MSE is also divided by PCA's at this size (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=128, help="window length in frames (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the recording split's seed, as linear-codes': a training run's seed_everything "
                             "(configs/recommended.yaml: 123) fits the codes on that run's windows (default: %(default)s)")
    parser.add_argument("--cache_dir", default=None, help="log-mel cache folder for both data folders")
    add_mel_arguments(parser)
    args = parse_command(parser, argv)
    args.argv = argv

    def log(message: str) -> None:
        print(f"benchmark-map: {message}", file=sys.stderr, flush=True)

    try:
        sizes, checkpoints = parse_sizes(args.sizes), parse_checkpoints(args.ckpt)
        if min(args.reference_size, args.frames) < 1 or args.two_sample_seeds < 0:
            raise ConfigError(f"--reference_size {args.reference_size}, --frames {args.frames}, --two_sample_seeds "
                              f"{args.two_sample_seeds}: sizes and frames must be positive, seeds 0 (off) or more")
        if args.merge:
            result = merge_results([read_results(Path(folder)) for folder in args.merge], args.merge)
        elif not (args.train_dir and args.test_dir):
            raise ConfigError("--train_dir and --test_dir are required (or --merge DIR ... to combine earlier runs)")
        else:
            with torch.no_grad():  # scoped: tests call main() in-process; the two-sample classifiers enable it
                result = benchmark(args, checkpoints, sizes, log)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        lines = markdown_lines(result)
        (out / "results.md").write_text("\n".join([*lines, "![map](map.png)", ""]))
        map_figure(result).savefig(out / "map.png", dpi=90)
        write_json(out / "results.json", result)  # last: its presence means the map finished
    except MusicVAEError as err:
        return report_error(parser.prog, err)
    print("\n".join(lines))
    print(f"results: {out / 'results.md'}, {out / 'results.json'}, {out / 'map.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
