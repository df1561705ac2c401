"""Export a checkpoint: `python scripts/export.py --ckpt_path checkpoints/RUN/best.ckpt --out model.pt`.

Writes one TorchScript file that needs only torch to run: `encode(log_mel) -> mu`,
`decode(z) -> log_mel`, with the normalisation inside and the mel settings stored in it
(see musicvae/inference/export.py for how to load it).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from musicvae.errors import MusicVAEError  # noqa: E402
from musicvae.inference.export import export_checkpoint  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="export", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--ckpt_path", required=True, help="checkpoint to export (best.ckpt or last.ckpt)")
    parser.add_argument("--out", required=True, help="file to write, e.g. model.pt")
    args = parser.parse_args(argv)
    try:
        result = export_checkpoint(args.ckpt_path, args.out)
    except MusicVAEError as err:
        sys.stderr.write(f"export: error: {err}\n")
        return 2
    print(f"exported {result['n_mels']} mels x {result['frames']} frames -> {result['latent_dim']} latents to "
          f"{result['path']} (max |difference| to the checkpoint: {result['max_difference']:.2g})")
    print("load it with torch alone: torch.jit.load(path, _extra_files={'mel_settings.json': ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
