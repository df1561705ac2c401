"""Export a checkpoint: `musicvae export --ckpt_path checkpoints/RUN/best.ckpt --out model.pt`.

Writes one TorchScript file that needs only torch to run: `encode(log_mel) -> mu`,
`decode(z) -> log_mel`, with the normalisation inside and the mel settings stored in it
(see musicvae/inference/export.py for how to load it).
"""

import sys

from musicvae.commands.parsing import command_parser, parse_command, report_error
from musicvae.errors import MusicVAEError
from musicvae.io.outputs import add_force_flag
from musicvae.inference.export import export_checkpoint


def main(argv=None) -> int:
    parser = command_parser("export", __doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", type=str, required=True, help="checkpoint to export (best.ckpt or last.ckpt)")
    parser.add_argument("--out", type=str, required=True, help="file to write, e.g. model.pt")
    add_force_flag(parser, "replace --out if it exists (never the checkpoint)")
    parser.add_argument("--alpha", type=str, default="0",
                        help="variance compensation built into decode: a strength in [0, 1] or 'perceptual' "
                             "(the checkpoint's fitted point); 0: the plain decoder output")
    try:
        args = parse_command(parser, argv)
        result = export_checkpoint(args.ckpt_path, args.out, args.alpha, force=args.force)
    except MusicVAEError as err:
        return report_error(parser.prog, err)
    print(f"exported {result['n_mels']} mels x {result['frames']} frames -> {result['latent_dim']} latents to "
          f"{result['path']} (max |difference| to the checkpoint: {result['max_difference']:.2g})")
    print("load it with torch alone: torch.jit.load(path, _extra_files={'mel_settings.json': ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
