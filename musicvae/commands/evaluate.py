"""Evaluate a checkpoint: `musicvae evaluate --ckpt_path checkpoints/RUN/best.ckpt --out reports/NAME`.

Without --data.data_dir the run's own validation split is rebuilt from the checkpoint; with it, every
recording of that folder is evaluated, seen through the checkpoint's mel settings and normalisation.
Writes metrics.json, report.md and PNG figures into --out (see musicvae/evaluation/report.py).
"""

import sys
from pathlib import Path
from typing import Optional

from musicvae.commands.parsing import command_parser, parse_command, report_error
from musicvae.errors import MusicVAEError
from musicvae.io.outputs import add_force_flag
from musicvae.evaluation.report import evaluate_checkpoint
from musicvae.evaluation.waveform import DEFAULT_CLIPS, waveform_summary


#: The former scripts/evaluate.py flags, spelled as training spells them now.
RENAMES = {"--data_dir": "--data.data_dir", "--batch_size": "--data.batch_size"}


def main(argv=None) -> int:
    parser = command_parser("evaluate", __doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", type=str, required=True, help="checkpoint to evaluate (best.ckpt or last.ckpt)")
    parser.add_argument("--data.data_dir", type=Optional[str], default=None,
                        help="folder to evaluate on (default: the run's validation split)")
    parser.add_argument("--out", type=str, required=True, help="report folder (created)")
    add_force_flag(parser, "replace the report files --out already holds (metrics.json, report.md, figures)")
    parser.add_argument("--device", type=str, default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--data.batch_size", type=Optional[int], default=None,
                        help="examples per forward pass (default: the run's)")
    parser.add_argument("--alpha", type=Optional[str], default=None,
                        help="variance-compensation strength scored beside the plain output: a number in [0, 1] or "
                             "'perceptual' (default: the checkpoint's perceptual point when it has a curve, else 0)")
    parser.add_argument("--weights", type=str, default="average",
                        help="'average': the checkpoint's state_dict (with --model.ema_decay the EMA average); 'raw': "
                             "the training weights an EMA checkpoint keeps beside it, to see what the average changes")
    parser.add_argument("--two_sample_seeds", type=int, default=0,
                        help="also run the classifier two-sample test with this many seeds (e.g. 3; about 15 s per "
                             "comparison on a CPU core; 0: off)")
    parser.add_argument("--waveform_clips", type=int, default=DEFAULT_CLIPS,
                        help="windows vocoded by Griffin-Lim and scored against the original audio (SI-SDR, "
                             "multi-resolution STFT) beside the vocoder alone on their own log-mels; needs a folder "
                             "of audio files; 0 turns it off")
    try:
        args = parse_command(parser, argv, RENAMES)
        batch_size = args.data.batch_size
        if batch_size is not None and batch_size < 1:
            parser.error(f"--data.batch_size {batch_size}: must be positive")
        if args.two_sample_seeds < 0:
            parser.error(f"--two_sample_seeds {args.two_sample_seeds}: must be 0 (off) or positive")
        if args.waveform_clips < 0:
            parser.error(f"--waveform_clips {args.waveform_clips}: must be 0 (off) or more")
        result = evaluate_checkpoint(args.ckpt_path, args.out, args.data.data_dir, args.device, batch_size,
                                     alpha=args.alpha, weights=args.weights, force=args.force,
                                     two_sample_seeds=args.two_sample_seeds, waveform_clips=args.waveform_clips)
    except MusicVAEError as err:
        return report_error(parser.prog, err)
    print(f"evaluated {result['metrics']['n_examples']} examples ({result['data']['split']}) from {result['data']['folder']}")
    for verdict in result["verdicts"]:
        print(f"  {verdict['problem']}: {verdict['status']} ({verdict['detail']})")
    print(f"  mse {result['metrics']['mse']:.4g}, kl {result['metrics']['kl_nats']:.3g} nats, "
          f"{result['metrics']['active_units']}/{result['metrics']['latent_dim']} active units")
    comp, realism = result["metrics"]["compensation"], result["metrics"]["realism"]
    if comp["alpha"] > 0:
        print(f"  variance compensation alpha {comp['alpha']:g}: mse {comp['mse']:.4g}, lowest band ratio "
              f"{min(v for k, v in comp.items() if k.startswith('band_ratio/')):.3g}")
    if realism is not None:
        print("  realism (Fréchet, lower is more real): " + ", ".join(
            f"{view} {realism['alpha_0'][view]:.4g} at alpha 0, {realism['alpha'][view]:.4g} at alpha {comp['alpha']:g} "
            f"(floor {realism['floor'][view]:.4g})" for view in realism["floor"]))
    two = result["metrics"].get("two_sample")
    if two:
        print(f"  two-sample accuracy (0.5: indistinguishable): alpha 0 {two['reconstructions']['alpha_0']['accuracy']:.3f}, "
              f"floor {two['floor']['accuracy']:.3f}, control {two['control']['accuracy']:.3f}"
              + (" (too weak: the control failed)" if two["too_weak"] else ""))
    print(f"  {waveform_summary(result['metrics']['waveform'])}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
