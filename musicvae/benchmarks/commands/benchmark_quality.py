"""VAE vs PCA quality benchmark: `python scripts/benchmark_quality.py --train_dir DIR --test_dir DIR
--config CFG (--minutes M | --steps N) --out DIR [--checkpoint best|last] [--ckpt_path CKPT] [--cache_dir DIR]
[--references] [-- EXTRA TRAINING FLAGS]`.

Trains the model through the real CLI on --train_dir for a time or step budget (or loads --ckpt_path),
fits PCA with exactly latent_dim components on the same normalised training segments, and scores both
on every recording of --test_dir, plus prior samples of the VAE, against the quality goals (docs/quality.md).
Writes results.json and results.md into --out and prints the table. Everything after `--` is passed
to training (e.g. `-- --model.latent_dim 128 --trainer.precision bf16-mixed`).
"""

import math
import sys
import time
from pathlib import Path


import torch

from musicvae.errors import ConfigError, DataError, MusicVAEError
from musicvae.evaluation.report import write_json
from musicvae.benchmarks.quality import (PathShares, data_range, fit_compensation, fit_pca, goal_rows,
                                         linear_references, markdown_report, markdown_table, prior_diagnostics,
                                         reference_statistics, score_decoder)
from musicvae.benchmarks.prior_quality import markdown_lines, two_sample_results
from musicvae.benchmarks.decodings_figure import decodings_figure, decodings_panels
from musicvae.benchmarks.detail_plane import detail_lines, detail_plane, parse_strengths, plane_figure
from musicvae.models.detail import SOURCES
from musicvae.inference.detail import fit_detail
from musicvae.compensation import compensate
from musicvae.evaluation.realism import prior_realism
from musicvae.metrics import band_edges
from musicvae.plots import mel_grid_figure, trade_off_figure
from musicvae.models.linear_codes import stack_segments
from musicvae.commands.parsing import command_parser, parse_command

#: Flags the benchmark sets itself for a training run.
OWNED_FLAGS = ("--data.data_dir", "--checkpoint_dir", "--trainer.logger.init_args.save_dir", "--trainer.max_time",
               "--trainer.max_steps", "--trainer.max_epochs", "--ckpt_path", "--data.cache_dir")
DEFAULT_PRIOR_SAMPLES = 256


def check_folders(train_dir, test_dir, train_label: str = "--train_dir") -> None:
    """Refuse missing folders and a test folder that shares recordings with the training folder."""
    for flag, folder in (("--train_dir", train_dir), ("--test_dir", test_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise DataError(f"{flag} {folder}: no such folder")
    if train_dir is None:
        return
    a, b = Path(train_dir).resolve(), Path(test_dir).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise DataError(f"{train_label} {train_dir} and --test_dir {test_dir} overlap: the test folder must hold "
                        "recordings the model never trained on")
    shared = ({p.resolve() for p in a.rglob("*") if p.is_file()} & {p.resolve() for p in b.rglob("*") if p.is_file()})
    if shared:
        raise DataError(f"{train_label} and --test_dir share {len(shared)} file(s), e.g. {sorted(shared)[0]} "
                        "(through links): the test folder must hold recordings the model never trained on")


def train(args, extra: list[str]) -> Path:
    """Train through musicvae.training.cli.cli_main; returns the checkpoint --checkpoint names (best or last)."""
    from musicvae.training.cli import cli_main

    clash = [f for f in extra if f.split("=", 1)[0] in OWNED_FLAGS]
    if clash:
        raise ConfigError(f"{clash[0]}: set by benchmark_quality itself (use --train_dir, --out, --minutes/--steps, "
                          "--cache_dir or --ckpt_path)")
    out = Path(args.out)
    budget = (["--trainer.max_time", f"00:00:{args.minutes:02d}:00", "--trainer.max_steps", "-1"] if args.minutes
              else ["--trainer.max_steps", str(args.steps)])
    cli_args = ["fit", "--config", args.config, *extra, "--data.data_dir", args.train_dir,
                "--checkpoint_dir", str(out / "ckpt"), "--trainer.logger.init_args.save_dir", str(out / "logs"),
                *budget, "--trainer.max_epochs", "-1"]
    if args.cache_dir:
        cli_args += ["--data.cache_dir", args.cache_dir]
    print("training: musicvae.training.cli " + " ".join(cli_args), flush=True)
    cli_main(cli_args)
    # best: lowest val/loss on the training folder's held-out recordings (early stopping, and the
    # checkpoint evaluate/generate are shown with); last: the model after exactly the budget.
    names = ("best.ckpt", "last.ckpt") if args.checkpoint == "best" else ("last.ckpt", "best.ckpt")
    for name in names:
        if (out / "ckpt" / name).is_file():
            if name != names[0]:
                print(f"benchmark_quality: no {names[0]} was written; scoring {name}", file=sys.stderr)
            print(f"scoring {out / 'ckpt' / name}", flush=True)
            return out / "ckpt" / name
    raise MusicVAEError(f"training wrote no checkpoint into {out / 'ckpt'}")


def other_decoder(path: str, test_dm, validation, common: dict, log=print) -> dict:
    """A further checkpoint (e.g. the adversarial stage's) on the same plane: its scores at strength 0 and at
    its own perceptual point. It must see the data as the benchmarked checkpoint does (same normalisation)."""
    from musicvae.inference.loading import load_module, resolve_alpha
    from musicvae.training.checkpoints import DATA_STATE_KEY

    module, ckpt = load_module(path)
    state = ckpt.get(DATA_STATE_KEY) or {}
    norm = test_dm.normalizer
    if abs(float(state.get("mean", math.nan)) - norm.mean) > 1e-6 or abs(float(state.get("std", math.nan)) - norm.std) > 1e-6:
        raise ConfigError(f"--also {path}: normalised differently from the benchmarked checkpoint (mean/std "
                          f"{state.get('mean')}/{state.get('std')} vs {norm.mean}/{norm.std}); benchmark it on its own")
    if int(module.hparams.n_mels) != common["n_mels"] or int(module.hparams.frames) != int(test_dm.frames):
        raise ConfigError(f"--also {path}: a model of another shape than the benchmarked checkpoint")

    def reconstruct(x):
        mu, logvar = module.vae.encode(x)
        return module.vae.decode(mu), (mu, logvar)

    if bool(module.gain_fitted):
        fit = {"gain": module.output_gain.detach().cpu(), "alpha": resolve_alpha(module, "perceptual")}
    else:
        fit = fit_compensation(lambda x: reconstruct(x)[0], validation, common["n_mels"], common["bands"],
                               common["batch_size"])
    scores = score_decoder(reconstruct, gain=fit["gain"], alpha=fit["alpha"], latent_dim=int(module.hparams.latent_dim),
                           **common)
    label = "/".join(Path(path).resolve().parts[-3:])  # e.g. sharp/ckpt/best.ckpt
    with torch.no_grad():  # the window mels.png shows, for the figure only (not written to results.json)
        window = module.reconstruct(common["dataset"][len(common["dataset"]) // 2][None])
    log(f"--also {label}: step {ckpt.get('global_step')}, MSE {scores['mse']:.4g}, perceptual alpha {fit['alpha']:.2f}")
    return {"label": label, "path": str(Path(path).resolve()), "global_step": ckpt.get("global_step"),
            "mark": fit["alpha"], "rows": scores["plane"]["rows"], "scores": scores, "_window": window}


def benchmark(ckpt_path: Path, train_dir, test_dir: str, out: Path, cache_dir, n_prior: int,
              log=print, references: bool = False, also: tuple[str, ...] = (), two_sample_seeds: int = 0,
              fit_prior: bool = False, detail_strengths: tuple[float, ...] = (), detail_source: str = SOURCES[0]) -> dict:
    from musicvae.inference.loading import datamodule_for, load_module, resolve_alpha

    module, ckpt = load_module(ckpt_path)
    hp = module.hparams
    bands = [tuple(float(v) for v in band) for band in hp.freq_bands]
    overrides = {"cache_dir": cache_dir} if cache_dir else {}
    # The training segments, deterministic (no random crop), normalised with the checkpoint's statistics.
    train_dm = datamodule_for(ckpt, data_dir=train_dir, **overrides)
    if train_dir is None:  # the run's own folder, from the checkpoint: it must not overlap the test folder either
        check_folders(str(train_dm.folder), test_dir, "the checkpoint's training folder")
    train_dm.prepare_data()
    train_dm.setup("validate")
    windows = train_dm.train_set.fixed_windows()
    started = time.monotonic()
    train_x = stack_segments(windows)  # (N, n_mels * frames)
    pca = fit_pca(train_x, int(hp.latent_dim))
    if not references:
        del train_x
    log(f"PCA: {pca.n_components} components ({pca.method}) on {len(windows)} training segments in "
        f"{time.monotonic() - started:.0f} s, {pca.explained_variance_ratio:.1%} of the variance")

    test_dm = datamodule_for(ckpt, data_dir=test_dir, **overrides)
    test_dm.prepare_data()
    test = test_dm.evaluation_set("all")
    std, ssim_range = test_dm.normalizer.std, data_range(test)

    split = PathShares() if hasattr(module.vae, "lin_decoder") else None
    n_mels, edges = int(hp.n_mels), band_edges(int(hp.n_mels), bands)

    def vae_reconstruct(x):
        mu, logvar = module.vae.encode(x)
        x_hat = module.vae.decode(mu)  # the posterior mean, as in evaluate()
        if split is not None:
            split.update(module.vae.lin_decoder(mu).view_as(x_hat), x_hat)
        return x_hat, (mu, logvar)

    # Variance compensation, fitted on the training folder's validation recordings (never the test
    # album): the VAE's curve is the one training stored; PCA's is fitted here the same way.
    validation = train_dm.evaluation_set("val")
    if bool(module.gain_fitted):
        vae_fit = {"gain": module.output_gain.detach().cpu(), "alpha": resolve_alpha(module, "perceptual"),
                   "source": "the checkpoint (fitted on the validation recordings during training)"}
    else:
        vae_fit = fit_compensation(lambda x: vae_reconstruct(x)[0], validation, n_mels, bands, test_dm.batch_size)
        vae_fit["source"] = f"fitted now on the {len(validation)} validation windows of the training folder"
    pca_fit = fit_compensation(pca.reconstruct, validation, n_mels, bands, test_dm.batch_size)
    log(f"perceptual points (validation): VAE alpha {vae_fit['alpha']:.2f}, PCA alpha {pca_fit['alpha']:.2f}")

    common = dict(dataset=test, std=std, n_mels=n_mels, bands=bands, ssim_range=ssim_range,
                  batch_size=test_dm.batch_size)
    vae = score_decoder(vae_reconstruct, gain=vae_fit["gain"], alpha=vae_fit["alpha"],
                        latent_dim=int(hp.latent_dim), **common)
    pca_scores = score_decoder(lambda x: (pca.reconstruct(x), None), gain=pca_fit["gain"], alpha=pca_fit["alpha"],
                               **common)
    reference = reference_statistics(test, n_mels, bands)
    samples = module.sample(n_prior, generator=torch.Generator().manual_seed(0))
    prior = prior_diagnostics(samples, reference, n_mels, bands)
    prior.update(prior_realism_fields(samples, test))
    sharp_samples = compensate(samples, vae_fit["gain"], vae_fit["alpha"], edges)
    prior_sharp = prior_diagnostics(sharp_samples, reference, n_mels, bands)
    prior_sharp.update(alpha=vae_fit["alpha"], **prior_realism_fields(sharp_samples, test))
    result = {
        "checkpoint": {"path": str(Path(ckpt_path).resolve()), "global_step": ckpt.get("global_step"),
                       "epoch": ckpt.get("epoch"), "latent_dim": int(hp.latent_dim)},
        "data": {"train_dir": str(train_dm.folder), "test_dir": str(test_dm.folder),
                 "n_train_examples": len(windows), "n_test_examples": len(test), "ssim_range": ssim_range,
                 "n_validation_examples": len(validation),
                 "normalization": {"mean": train_dm.normalizer.mean, "std": std}},
        "pca": {"n_components": pca.n_components, "method": pca.method, "n_train_examples": len(windows),
                "explained_variance_ratio": pca.explained_variance_ratio},
        "compensation": {"vae": {"alpha": vae_fit["alpha"], "gain": vae_fit["gain"].tolist(),
                                 "source": vae_fit["source"]},
                         "pca": {"alpha": pca_fit["alpha"], "gain": pca_fit["gain"].tolist(),
                                 "reached": pca_fit["reached"]}},
        "vae": vae, "pca_scores": pca_scores, "mse_ratio": vae["mse"] / pca_scores["mse"],
        "prior": prior, "prior_perceptual": prior_sharp, "prior_reference": reference,
        "goals": goal_rows(vae, pca_scores, prior, int(hp.latent_dim), prior_sharp),
    }
    result["extra_points"] = [other_decoder(path, test_dm, validation, common, log) for path in also]
    prior_windows, shown_detail = {"standard": samples[:2]}, (None, 0.0)  # for issue_mels.png
    if two_sample_seeds or fit_prior:
        found = two_sample_results(module, test, validation, windows, vae_fit["gain"], vae_fit["alpha"], edges,
                                   range(two_sample_seeds), fit_prior, log)
        prior_windows = found.pop("prior_windows")
        if "prior_c2st_vs_reconstructions" in found:
            result["prior"]["c2st_vs_reconstructions"] = found.pop("prior_c2st_vs_reconstructions")
        result.update(found)
    if detail_strengths:
        started = time.monotonic()
        result["detail"], shown_detail = detail_results(
            module, pca, windows, test, vae_fit, pca_fit, edges, detail_strengths, range(two_sample_seeds),
            test_dm.batch_size, detail_source)
        log(f"generated detail at strengths {list(detail_strengths)} in {time.monotonic() - started:.0f} s")
    write_figures(out, result, test, samples, sharp_samples, module, edges)
    index = len(test) // 2
    panels, titles = decodings_panels(test[index][None], module.reconstruct, vae_fit["gain"], vae_fit["alpha"], edges,
                                      *shown_detail, prior_windows)
    decodings_figure(panels, titles, f"window {index} of {test_dm.folder}: the VAE's decodings, then prior samples"
                     ).savefig(out / "issue_mels.png", dpi=90)
    if result.get("detail"):
        plane_figure(result["detail"], result["detail"]["floor"],
                     f"held out: {test_dm.folder}; detail strengths beta per decoder and alpha").savefig(
            out / "detail_plane.png", dpi=90)
    if split is not None:
        result["linear_path"] = split.compute()
    if references:
        started = time.monotonic()
        result["linear_references"] = linear_references(train_x, stack_segments(test), int(hp.latent_dim),
                                                        shape=(int(hp.n_mels), int(hp.frames)))
        log(f"linear references in {time.monotonic() - started:.0f} s")
    (out / "results.md").write_text("\n".join([markdown_report(result), *markdown_lines(result),
                                               *detail_lines(result.get("detail"), pca_scores["mse"])]))
    write_json(out / "results.json", result)  # last: its presence means the benchmark finished
    return result


def detail_results(module, pca, windows, test, vae_fit: dict, pca_fit: dict, edges, strengths, seeds,
                   batch_size: int, source: str = SOURCES[0]) -> tuple[dict, tuple]:
    """musicvae.benchmarks.detail_plane for the VAE and PCA, each with a detail generator fitted on the training
    windows' own residuals and codes (musicvae.inference.detail.fit_detail); and, for issue_mels.png, the VAE's
    detail model and the largest strength."""
    n_mels, shape = int(module.hparams.n_mels), (1, int(module.hparams.n_mels), int(module.hparams.frames))
    codecs = {"VAE": (lambda x: module.vae.encode(x.to(module.device))[0], lambda z: module.vae.decode(z).cpu(), vae_fit),
              "PCA": (lambda x: pca.encode(x).float(), lambda c: pca.decode(c.to(pca.mean.dtype), shape).float(),
                      pca_fit)}
    decoders = {name: {"encode": encode, "decode": decode, "gain": fit["gain"], "alpha": fit["alpha"],
                       "detail": fit_detail(encode, decode, windows, n_mels, edges, batch_size, source=source)}
                for name, (encode, decode, fit) in codecs.items()}
    found = {"source": source, **detail_plane(decoders, test, n_mels, edges, strengths, list(seeds), batch_size)}
    return found, (decoders["VAE"]["detail"], max(strengths))


def prior_realism_fields(samples: torch.Tensor, test) -> dict:
    """``realism`` and ``realism_floor`` of prior samples against the test album's recording halves."""
    found = prior_realism(samples, test)
    return {"realism": found["realism"], "realism_floor": found["floor"], "realism_windows": found["windows"]}


def write_figures(out: Path, result: dict, test, samples: torch.Tensor, sharp_samples: torch.Tensor, module,
                  edges) -> None:
    """``trade_off.png`` (the distortion-perception plane: VAE and PCA at each strength, perceptual points
    circled, the floor dashed) and ``mels.png`` (one test window: input, VAE at 0 and at its perceptual point,
    PCA at 0; then prior samples at 0 and at the perceptual point)."""
    vae, pca = result["vae"], result["pca_scores"]
    curves = [{"label": "VAE", "rows": vae["plane"]["rows"], "mark": vae["perceptual"]["alpha"]},
              {"label": "PCA", "rows": pca["plane"]["rows"], "mark": pca["perceptual"]["alpha"]}]
    curves += [{k: extra[k] for k in ("label", "rows", "mark")} for extra in result.get("extra_points", [])]
    fig = trade_off_figure(curves, vae["plane"]["floor"], f"held-out: {result['data']['test_dir']}; "
                           "circles: perceptual points (fitted on validation)")
    fig.savefig(out / "trade_off.png", dpi=90)
    index = len(test) // 2
    x = test[index][None]  # (1, 1, n_mels, frames)
    alpha = vae["perceptual"]["alpha"]
    with torch.no_grad():
        x_hat = module.reconstruct(x)
    gain = torch.tensor(result["compensation"]["vae"]["gain"])
    mels = [x, x_hat, compensate(x_hat, gain, alpha, edges)]
    titles = ["input (test)", "VAE, alpha 0", f"VAE, alpha {alpha:.2f}"]
    for extra in result.get("extra_points", []):
        mels.append(extra.pop("_window"))
        titles.append(f"{extra['label'].split('/')[0]}, alpha 0")
    mels += [samples[:1], sharp_samples[:1], samples[1:2], sharp_samples[1:2]]
    titles += ["prior sample 0, alpha 0", f"prior sample 0, alpha {alpha:.2f}", "prior sample 1, alpha 0",
               f"prior sample 1, alpha {alpha:.2f}"]
    fig = mel_grid_figure(torch.cat(mels)[:, 0], titles, columns=4, label="normalised log-mel",
                          title=f"window {index} of the test album reconstructed, then prior samples")
    fig.savefig(out / "mels.png", dpi=90)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = command_parser("benchmark-quality", __doc__.splitlines()[0], config=False)
    parser.add_argument("--train_dir", default=None, help="training folder (with --ckpt_path: default the run's own)")
    parser.add_argument("--test_dir", required=True, help="held-out folder: every recording is scored")
    parser.add_argument("--config", default=None, help="training config (a recipe in configs/)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=int, default=None, help="training time limit in minutes")
    budget.add_argument("--steps", type=int, default=None, help="training optimizer steps")
    parser.add_argument("--out", required=True, help="results folder (created); training writes ckpt/ and logs/ here")
    parser.add_argument("--ckpt_path", default=None, help="benchmark this checkpoint instead of training")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="after training, score best.ckpt (lowest val/loss on the training folder's validation "
                             "recordings: early stopping, never the test folder) or last.ckpt (after exactly the budget) "
                             "(default: %(default)s)")
    parser.add_argument("--cache_dir", default=None, help="log-mel cache folder for both data folders")
    parser.add_argument("--references", action="store_true",
                        help="also score PCA with 2x and 4x latent_dim components (training segments) and PCA-latent_dim "
                             "fitted on the test segments themselves (an oracle), and the separable bases (mel eigenvectors x "
                             "time DCT; 2-D DCT) with 1x, 2x and 4x latent_dim components, to place the VAE between them")
    parser.add_argument("--also", nargs="*", default=[], metavar="CKPT",
                        help="further checkpoints of the same data and shape (e.g. the adversarial stage's best.ckpt) "
                             "placed on the distortion-perception plane beside the benchmarked one")
    parser.add_argument("--prior_samples", type=int, default=DEFAULT_PRIOR_SAMPLES, help="prior draws (default: %(default)s)")
    parser.add_argument("--two_sample_seeds", type=int, default=0,
                        help="also run the classifier two-sample tests with this many seeds (e.g. 3; a few minutes "
                             "on a CPU; 0: off): held-out and training music, the prior alone")
    parser.add_argument("--fit_prior", action="store_true",
                        help="also fit a learned prior (Gaussian or mixture, chosen on validation likelihood) to the "
                             "training windows' codes and score its samples beside N(0, I)'s")
    parser.add_argument("--detail_strengths", default=None, metavar="B,B,...",
                        help="also put generated detail (musicvae/models/detail.py, fitted on the training windows) on "
                             "the VAE's and PCA's outputs at these strengths, e.g. 0,0.5,1, with alpha 0 and each one's "
                             "perceptual point (two-sample accuracy too with --two_sample_seeds; default: off)")
    parser.add_argument("--detail_source", choices=SOURCES, default=SOURCES[0],
                        help="texture of the generated detail: exemplar (training residuals) or gaussian (noise "
                             "with their covariance) (default: %(default)s)")
    args = parse_command(parser, argv)
    if args.ckpt_path is None:
        if args.train_dir is None or args.config is None:
            parser.error("training needs --train_dir and --config (or pass --ckpt_path)")
        if args.minutes is None and args.steps is None:
            parser.error("training needs a budget: --minutes M or --steps N")
        if (args.minutes is not None and args.minutes < 1) or (args.steps is not None and args.steps < 1):
            parser.error("--minutes and --steps must be positive")
    elif extra or args.minutes or args.steps:
        parser.error("--ckpt_path skips training: drop --minutes/--steps and the training flags after --")
    if args.prior_samples < 1:
        parser.error("--prior_samples must be positive")
    if args.two_sample_seeds < 0:
        parser.error("--two_sample_seeds must be 0 (off) or positive")
    try:
        strengths = parse_strengths(args.detail_strengths) if args.detail_strengths is not None else ()
    except ValueError as err:
        parser.error(str(err))
    torch.set_grad_enabled(False)
    try:
        check_folders(args.train_dir, args.test_dir)
        if args.config is not None and not Path(args.config).is_file():
            raise ConfigError(f"--config {args.config}: no such config file")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.ckpt_path is None:
            torch.set_grad_enabled(True)
            ckpt_path = train(args, extra)
            torch.set_grad_enabled(False)
        else:
            ckpt_path = Path(args.ckpt_path)
        result = benchmark(ckpt_path, args.train_dir, args.test_dir, out, args.cache_dir, args.prior_samples,
                           references=args.references, also=tuple(args.also),
                           two_sample_seeds=args.two_sample_seeds, fit_prior=args.fit_prior,
                           detail_strengths=strengths, detail_source=args.detail_source)
    except MusicVAEError as err:
        sys.stderr.write(f"benchmark_quality: error: {err}\n")
        return 2
    print(markdown_table(result["goals"]))
    print(f"results: {out / 'results.md'}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
