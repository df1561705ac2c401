"""Export a checkpoint: `musicvae export --ckpt_path checkpoints/RUN/best.ckpt --out model.pt`.

Writes one TorchScript file that needs only torch to run: `encode(log_mel) -> mu`,
`decode(z) -> log_mel`, with the normalisation inside and the mel settings stored in it
(musicvae/inference/export.py). `--format pt2 --out DIR` writes torch.export programs instead
(`encode.pt2`, `decode.pt2`, loaded with `torch.export.load`), `--format onnx` ONNX models (the
onnx extra); musicvae/inference/programs.py, docs/api.md. TorchScript stays the default for one
release, for existing `torch.jit.load` scripts; torch 2.15 deprecates it, and the default moves to pt2.
"""

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

from musicvae.commands.parsing import command_parser, parse_command, report_error
from musicvae.errors import MusicVAEError
from musicvae.io.outputs import add_force_flag

FORMATS = ("torchscript", "pt2", "onnx")


class _DropTorchvisionNotices(logging.Filter):
    """torch.onnx's exporter logs one warning per torchvision operator it cannot register when torchvision
    is absent; musicvae's networks use none of them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Exactly the notices the exporters print on every run, not any other warning: torch 2.15's
    deprecation of torch.jit.script / torch.jit.save (FutureWarning; DeprecationWarning before),
    which the TorchScript format exists in spite of, and torch.onnx's torchvision notices."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    notices = _DropTorchvisionNotices()
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.(script|save)` is deprecated", category=category)
        logger.addFilter(notices)
        try:
            yield
        finally:
            logger.removeFilter(notices)


def main(argv=None) -> int:
    parser = command_parser("export", __doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", type=str, required=True, help="checkpoint to export (best.ckpt or last.ckpt)")
    parser.add_argument("--out", type=str, required=True,
                        help="file to write (torchscript, e.g. model.pt), or folder (pt2, onnx)")
    parser.add_argument("--format", type=str, default="torchscript", choices=FORMATS,
                        help="torchscript (default for one release; moves to pt2), pt2 (torch.export), onnx")
    parser.add_argument("--encode_input", type=str, default="audio", choices=("audio", "log_mel"),
                        help="pt2/onnx: what encode takes, audio at the model's rate ((frames - 1) * hop + n_fft "
                             "samples, no centring) or a log-mel window")
    add_force_flag(parser, "replace --out (or its files) if it exists (never the checkpoint)")
    parser.add_argument("--alpha", type=str, default="0",
                        help="variance compensation built into decode: a strength in [0, 1] or 'perceptual' "
                             "(the checkpoint's fitted point); 0: the plain decoder output")
    try:
        args = parse_command(parser, argv)
        with _quiet_exporters():
            if args.format == "torchscript":
                from musicvae.inference.export import export_checkpoint

                result = export_checkpoint(args.ckpt_path, args.out, args.alpha, force=args.force)
            else:
                from musicvae.inference.programs import export_programs

                result = export_programs(args.ckpt_path, args.out, args.format, args.encode_input, args.alpha,
                                         force=args.force)
    except MusicVAEError as err:
        return report_error(parser.prog, err)
    differences = result["max_difference"]
    difference = max(differences.values()) if isinstance(differences, dict) else differences
    print(f"exported {result['n_mels']} mels x {result['frames']} frames -> {result['latent_dim']} latents to "
          f"{result['path']} (max |difference| to the checkpoint: {difference:.2g})")
    if args.format == "torchscript":
        print("load it with torch alone: torch.jit.load(path, _extra_files={'mel_settings.json': ''}); "
              "--format pt2 writes torch.export programs, the format that replaces TorchScript")
    elif args.format == "pt2":
        print(f"load them with torch alone: torch.export.load('{args.out}/encode.pt2').module() (docs/api.md)")
    else:
        print(f"run them with onnxruntime: onnxruntime.InferenceSession('{args.out}/encode.onnx') (docs/api.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
