"""Evaluate a checkpoint: `python scripts/evaluate.py --ckpt_path checkpoints/RUN/best.ckpt --out reports/NAME`.

Without --data_dir the run's own validation split is rebuilt from the checkpoint; with it, every
recording of that folder is evaluated, seen through the checkpoint's mel settings and normalisation.
Writes metrics.json, report.md and PNG figures into --out (see musicvae/evaluation/evaluate.py).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from musicvae.errors import MusicVAEError  # noqa: E402
from musicvae.evaluation.evaluate import evaluate_checkpoint  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="evaluate", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--ckpt_path", required=True, help="checkpoint to evaluate (best.ckpt or last.ckpt)")
    parser.add_argument("--data_dir", default=None, help="folder to evaluate on (default: the run's validation split)")
    parser.add_argument("--out", required=True, help="report folder (created)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--batch_size", type=int, default=None, help="examples per forward pass (default: the run's)")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch_size {args.batch_size}: must be positive")
    try:
        result = evaluate_checkpoint(args.ckpt_path, args.out, args.data_dir, args.device, args.batch_size)
    except MusicVAEError as err:
        sys.stderr.write(f"evaluate: error: {err}\n")
        return 2
    print(f"evaluated {result['metrics']['n_examples']} examples ({result['data']['split']}) from {result['data']['folder']}")
    for verdict in result["verdicts"]:
        print(f"  {verdict['problem']}: {verdict['status']} ({verdict['detail']})")
    print(f"  mse {result['metrics']['mse']:.4g}, kl {result['metrics']['kl_nats']:.3g} nats, "
          f"{result['metrics']['active_units']}/{result['metrics']['latent_dim']} active units")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
