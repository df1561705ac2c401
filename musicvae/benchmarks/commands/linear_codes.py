"""Linear codes (PCA, separable, 2-D DCT) fitted on one folder and scored on a held-out one, without training.

`python scripts/linear_codes.py --train_dir DIR --test_dir DIR [--k 128] [--frames 128] [--seed 0]
[--cache_dir DIR] [--out FILE.json] [--knn 1,5,20] [--switched 2,32 [--switched_blocks 1 1,2,4]] [--switched_pca 2]`.

Prepares both folders as training does (default mel settings, z-scored with the training folder's
statistics, every window of --frames frames), fits on the training windows PCA with k, 2k and 4k
components, the separable basis (mel eigenvectors x time DCT) and the 2-D DCT with as many, plus
PCA-k on the test windows themselves (an oracle), and prints each one's test MSE and its ratio to
PCA-k's: where a linear path can start (`--model.linear_path_basis`), and how far the quality goal
of 0.8 x PCA-k is in linear components. Seconds to minutes; the log-mel cache is reused.

`--knn K,...` also asks how much a nonlinear decoder from the frozen 2-D DCT code (dct-k) could
still win: each test window's residual predicted by its K nearest training windows in code space
(musicvae.benchmarks.knn_residual; at most 8192 training windows, evenly spaced).

`--switched K,...` adds switched codes (musicvae.models.switched_codes): K modes that each keep
their own k-1 coefficients of the 2-D DCT (or, with `--switched_blocks`, of the DCTs of 2, 4, ...
time blocks), the mode sent as the k-th number; `--switched_pca K,...` a mean and k-1 principal
components per mode. Each is scored on the training windows, the training folder's validation
recordings and the held-out folder, beside dct-k and PCA-k.
"""

import sys
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from musicvae.audio.mel_settings import MelSettings
from musicvae.data.datamodule import MelDataModule
from musicvae.errors import DataError, MusicVAEError
from musicvae.evaluation.report import write_json
from musicvae.benchmarks.quality import linear_references
from musicvae.benchmarks.knn_residual import knn_residual_mse
from musicvae.benchmarks.switched_codes import switched_rows
from musicvae.models.linear_codes import fit_separable_code, stack_segments
from musicvae.commands.parsing import command_parser, parse_command


#: Training windows whose residuals the kNN probe holds (8192 x 128 x 128 float32: 512 MiB).
KNN_MAX_TRAIN = 8192


def data_modules(train_dir: str, test_dir: str, frames: int, seed: int, cache_dir,
                 mel: Optional[MelSettings] = None) -> tuple[MelDataModule, MelDataModule]:
    """Both folders' data modules, built (folders and mel settings checked) but not yet prepared."""
    # Both built first, so a bad test folder is named before the training folder is prepared; batch
    # size 1: no loader is used here, and a small folder must not be refused for its batch count.
    train_dm = MelDataModule(data_dir=train_dir, cache_dir=cache_dir, frames=frames, seed=seed, batch_size=1, mel=mel)
    test_dm = MelDataModule(data_dir=test_dir, cache_dir=cache_dir, frames=frames, batch_size=1, mel=mel)
    return train_dm, test_dm


def prepared(train_dm: MelDataModule, test_dm: MelDataModule) -> tuple[torch.Tensor, Dataset]:
    """Flattened normalised training windows (all of the training split) and the test windows (every
    recording, normalised with the training split's statistics, as a trained model would see them)."""
    train_dm.prepare_data()
    train_dm.setup("fit")
    train_x = stack_segments(train_dm.train_set.fixed_windows())
    test_dm.load_state_dict(train_dm.state_dict())
    test_dm.prepare_data()
    return train_x, test_dm.evaluation_set("all")


def windows(train_dir: str, test_dir: str, frames: int, seed: int, cache_dir
            ) -> tuple[torch.Tensor, torch.Tensor, int, MelDataModule]:
    """Flattened normalised training windows (all of the training split) and test windows (every recording),
    the mel bins, and the training folder's data module (its validation windows on demand)."""
    train_dm, test_dm = data_modules(train_dir, test_dir, frames, seed, cache_dir)
    train_x, test = prepared(train_dm, test_dm)
    return train_x, stack_segments(test), train_dm.n_mels, train_dm


def neighbour_counts(text: str) -> list[int]:
    """``"1,5,20"`` -> ``[1, 5, 20]``; ``[]`` where `text` is not a list of positive counts (neighbours, modes, blocks)."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        return []
    return counts if min(counts) >= 1 else []


def switched_settings(parser, args) -> tuple[list[int], list[int], list[tuple[int, ...]]]:
    """The switched codes' modes, clustered PCA's modes and the time-block layout sets, checked (parser.error)."""
    switched = pca_modes = []
    if args.switched is not None:
        switched = neighbour_counts(args.switched) or parser.error(
            f"--switched {args.switched!r} is not a comma-separated list of positive mode counts, e.g. 2,32")
    if args.switched_pca is not None:
        pca_modes = neighbour_counts(args.switched_pca) or parser.error(
            f"--switched_pca {args.switched_pca!r} is not a comma-separated list of positive mode counts, e.g. 2,4")
    if (switched or pca_modes) and args.k < 2:
        parser.error(f"--k {args.k}: a switched code needs k >= 2 (k-1 coefficients and the mode index)")
    layouts = []
    for text in args.switched_blocks:
        blocks = neighbour_counts(text)
        if not blocks or any(args.frames % b for b in blocks):
            parser.error(f"--switched_blocks {text!r}: each is a comma-separated list of time-block counts that "
                         f"divide --frames {args.frames}, e.g. 1,2,4")
        bad = [k for k in switched if k % len(blocks)]
        if bad:
            parser.error(f"--switched {bad[0]} modes do not split evenly over the {len(blocks)} layouts {text}")
        layouts.append(tuple(blocks))
    return switched, pca_modes, layouts


def print_switched(rows: list[dict], table: list[dict], k: int, n_val: int) -> None:
    """The switched codes beside dct-k and PCA-k: MSE on the training, validation and held-out windows."""
    ref = {r["basis"]: r for r in rows if r["fitted_on"] == "train" and r["components"] == k and r["basis"] in ("pca", "dct")}
    print(f"\nSwitched codes: k-1 = {k - 1} coefficients + the mode index = {k} numbers a window "
          f"({n_val} validation windows)\n")
    print(f"| code | modes | val MSE | val / dct-{k} | test MSE | test / dct-{k} | test / PCA-{k} | train MSE | fit s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in ((f"PCA-{k}", ref["pca"]), (f"dct-{k}", ref["dct"])):
        print(f"| {name} | - | {r['val_mse']:.5f} | {r['val_mse'] / ref['dct']['val_mse']:.4f} | {r['mse']:.5f} | "
              f"{r['mse'] / ref['dct']['mse']:.4f} | {r['mse'] / ref['pca']['mse']:.4f} | {r['train_mse']:.5f} | - |")
    for r in table:
        print(f"| {r['name']} | {r['modes']} | {r['val_mse']:.5f} | {r['val_mse'] / ref['dct']['val_mse']:.4f} | "
              f"{r['mse']:.5f} | {r['mse'] / ref['dct']['mse']:.4f} | {r['mse'] / ref['pca']['mse']:.4f} | "
              f"{r['train_mse']:.5f} | {r['fit_seconds']:.0f} |")


def main(argv=None) -> int:
    parser = command_parser("linear-codes", __doc__.splitlines()[0])
    parser.add_argument("--train_dir", required=True, help="folder the codes are fitted on (its training split)")
    parser.add_argument("--test_dir", required=True, help="held-out folder: every recording is scored")
    parser.add_argument("--k", type=int, default=128, help="code size, e.g. the VAE's latent_dim (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=128, help="window length in frames (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the recording split's seed: a training run's seed_everything (configs/recommended.yaml: 123), "
                             "so the training windows are that run's (default: %(default)s)")
    parser.add_argument("--cache_dir", default=None, help="log-mel cache folder for both data folders")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--knn", default=None, metavar="K,...",
                        help="also predict the dct-k code's residual from the K nearest training windows' codes, "
                             "for each K (e.g. 1,5,20; default: off)")
    parser.add_argument("--switched", default=None, metavar="K,...",
                        help="also fit switched codes of K modes, each keeping its own k-1 coefficients of the 2-D DCT "
                             "(the mode index is the k-th number), for each K (e.g. 2,32; default: off)")
    parser.add_argument("--switched_blocks", nargs="+", default=["1"], metavar="B,...",
                        help="time-block layouts the --switched modes choose from, one set per argument "
                             "(e.g. 1 1,2,4: the whole-window DCT alone, then with 2 and 4 time blocks; default: 1)")
    parser.add_argument("--switched_pca", default=None, metavar="K,...",
                        help="also fit K clusters with a mean and k-1 principal components each (default: off)")
    parser.add_argument("--switched_seed", type=int, default=0, help="seed of the switched codes' k-means++ start")
    args = parse_command(parser, argv)
    if args.k < 1 or args.frames < 1:
        parser.error("--k and --frames must be positive")
    if args.knn is not None:
        args.knn = neighbour_counts(args.knn) or parser.error(
            f"--knn {args.knn!r} is not a comma-separated list of positive neighbour counts, e.g. 1,5,20")
    switched, pca_modes, layouts = switched_settings(parser, args)
    try:
        with torch.no_grad():  # scoped: tests call main() in-process
            train_x, test_x, n_mels, train_dm = windows(args.train_dir, args.test_dir, args.frames, args.seed, args.cache_dir)
            if len(train_x) < args.k:
                raise DataError(f"--train_dir {args.train_dir}: {len(train_x)} training windows of {args.frames} frames "
                                f"cannot give PCA-{args.k}; lower --k or --frames, or add music")
            if args.knn and max(args.knn) > min(len(train_x), KNN_MAX_TRAIN):
                raise DataError(f"--knn {max(args.knn)}: only {min(len(train_x), KNN_MAX_TRAIN)} training windows to "
                                f"take neighbours from; lower --knn")
            val_x = stack_segments(train_dm.evaluation_set("val")) if switched or pca_modes else None
            if pca_modes and len(train_x) < max(pca_modes) * args.k:
                raise DataError(f"--switched_pca {max(pca_modes)}: {len(train_x)} training windows cannot give "
                                f"{max(pca_modes)} clusters of at least {args.k} windows ({args.k - 1} components each); lower it")
            rows = linear_references(train_x, test_x, args.k, multiples=(1, 2, 4), shape=(n_mels, args.frames), val_x=val_x)
            switched_table = switched_rows(train_x, val_x, test_x, (n_mels, args.frames), args.k, switched, layouts,
                                           pca_modes, args.switched_seed) if val_x is not None else []
            knn = knn_residual_mse(fit_separable_code(train_x, (n_mels, args.frames), args.k, "dct"), train_x, test_x,
                                   args.knn, KNN_MAX_TRAIN) if args.knn else None
    except MusicVAEError as err:
        sys.stderr.write(f"linear_codes: error: {err}\n")
        return 2
    base = next(r["mse"] for r in rows if r["basis"] == "pca" and r["fitted_on"] == "train" and r["components"] == args.k)
    print(f"{len(train_x)} training windows, {len(test_x)} test windows of {n_mels}x{args.frames}\n")
    print(f"| code | test MSE | / PCA-{args.k} |\n|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['mse']:.5f} | {row['mse'] / base:.4f} |")
    if knn:
        print(f"\nResidual of dct-{args.k} predicted from the K nearest of {knn['n_train']} training windows in code space\n")
        print(f"| decoder | test MSE | / dct-{args.k} | / PCA-{args.k} |\n|---|---|---|---|")
        print(f"| dct-{args.k} alone | {knn['code_mse']:.5f} | 1.0000 | {knn['code_mse'] / base:.4f} |")
        for row in knn["knn"]:
            print(f"| + mean residual of {row['k']} nearest | {row['mse']:.5f} | {row['ratio']:.4f} | {row['mse'] / base:.4f} |")
    if switched_table:
        print_switched(rows, switched_table, args.k, len(val_x))
    if args.out:
        write_json(Path(args.out), {"train_dir": args.train_dir, "test_dir": args.test_dir, "k": args.k, "seed": args.seed,
                                    "n_train": len(train_x), "n_test": len(test_x), "rows": rows, "knn": knn,
                                    "switched": switched_table or None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
