"""Fit a prior over a checkpoint's codes: `musicvae fit-prior --ckpt_path checkpoints/RUN/best.ckpt`.

Encodes the run's training and validation windows (posterior means, fixed crops), fits N(0, I), one
full-covariance Gaussian and Gaussian mixtures (--components, --covariances) on the training codes,
keeps the one of highest mean log-likelihood per validation code, and writes the checkpoint with it
(by default checkpoints/RUN/best.prior.ckpt; musicvae/inference/prior_fitting.py). `generate sample`
and `musicvae.load(...).sample` then draw from it (--prior auto, the default); docs/listening.md.
"""

import sys
from typing import Optional

from musicvae.commands.parsing import command_parser, parse_command, report_error
from musicvae.errors import MusicVAEError
from musicvae.io.outputs import add_force_flag
from musicvae.io.tables import markdown_table
from musicvae.models.prior import COVARIANCES, DEFAULT_COMPONENTS


def main(argv=None) -> int:
    parser = command_parser("fit-prior", __doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", type=str, required=True, help="checkpoint whose codes to fit (best.ckpt)")
    parser.add_argument("--data.data_dir", type=Optional[str], default=None,
                        help="folder to take the windows from, split by the run's rule (default: the run's own)")
    parser.add_argument("--data.cache_dir", type=Optional[str], default=None,
                        help="where its log-mel cache is (default: ~/.cache/musicvae; never taken from the checkpoint)")
    parser.add_argument("--out", type=Optional[str], default=None,
                        help="checkpoint to write (default: NAME.prior.ckpt beside NAME.ckpt; never the input)")
    add_force_flag(parser, "replace --out if it exists (never the input checkpoint)")
    parser.add_argument("--seed", type=int, default=0, help="seed of EM's k-means++ start")
    parser.add_argument("--components", type=list[int], default=list(DEFAULT_COMPONENTS),
                        help="mixture sizes to try (each needs 2 training codes per component)")
    parser.add_argument("--covariances", type=list[str], default=list(COVARIANCES),
                        help="mixture covariances to try: full, diag")
    parser.add_argument("--device", type=str, default="cpu", help="where the encoder runs: cpu or cuda[:i]")
    try:
        args = parse_command(parser, argv)
        from musicvae.inference.prior_fitting import fit_checkpoint_prior

        result = fit_checkpoint_prior(args.ckpt_path, args.out, args.data.data_dir, args.seed, args.components,
                                      args.covariances, args.device, force=args.force, cache_dir=args.data.cache_dir)
    except MusicVAEError as err:
        return report_error(parser.prog, err)
    best = max(result["table"], key=lambda row: row["val_log_likelihood"])
    print(f"fitted on {result['train_codes']} training codes, chosen on {result['val_codes']} validation codes "
          "(mean log-likelihood per code, nats; higher is better):")
    print("\n".join(markdown_table(
        ("kind", "K", "covariance", "parameters", "train", "validation", ""),
        [(r["kind"], r["components"], r["covariance"], r["parameters"], f"{r['train_log_likelihood']:.2f}",
          f"{r['val_log_likelihood']:.2f}", "chosen" if r is best else "") for r in result["table"]])))
    prior = result["prior"]
    print(f"wrote {result['path']} with the {prior['kind']} prior ({prior['components']} component(s), "
          f"{prior['covariance']} covariance); generate sample draws from it (--prior auto)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
