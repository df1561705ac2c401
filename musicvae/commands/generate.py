"""Hear a trained model: `musicvae generate {reconstruct,sample,interpolate,ceiling} ...`.

  reconstruct --ckpt_path C IN --out OUT.wav     a whole recording (audio or .npy log-mel) through the model
  sample --ckpt_path C -n 8 --out DIR            draws from the prior (--prior auto|standard|learned)
  interpolate --ckpt_path C A B --out DIR        a morph from a segment of A to one of B through the latent space
  ceiling AUDIO                                  how close the vocoder gets to a recording from its own log-mel

Audio is written as 16-bit WAV at the model's sample rate, with a PNG of the mels beside it
(see musicvae/inference/generation.py and musicvae/audio/vocoder.py). Files that exist already are
not replaced without --force, and never an input (musicvae/io/outputs.py). `--vocoder DIR` plays it
with a downloaded Vocos instead of Griffin-Lim, for a checkpoint trained on its features
(configs/vocos.yaml; docs/vocoder.md).
"""

import sys
from typing import Literal, Optional

from jsonargparse.typing import PositiveInt

from jsonargparse import ArgumentParser

from musicvae.audio.mel_settings import MelSettings
from musicvae.commands.parsing import command_parser, parse_command, report_error
from musicvae.errors import MusicVAEError
from musicvae.io.outputs import add_force_flag
from musicvae.inference.generation import interpolate_files, load_generation_model, reconstruct_file, sample_files
from musicvae.inference.detail import check_source, check_strength
from musicvae.models.detail import SOURCES
from musicvae.inference.latent_paths import METHODS
from musicvae.inference.priors import CHOICES
from musicvae.audio.neural_vocoder import load_vocos
from musicvae.audio.vocoder import measure_ceiling


def add_prior_flag(parser: ArgumentParser, what: str) -> None:
    parser.add_argument("--prior", type=Literal[CHOICES], default="auto",
                        help=f"{what}: 'learned' (fitted by musicvae fit-prior, stored in the checkpoint), "
                             "'standard' (N(0, I)), or 'auto': the learned one when the checkpoint has one")


def add_detail_flag(parser: ArgumentParser) -> None:
    parser.add_argument("--detail", type=float, default=0.0,
                        help="generated detail (musicvae/models/detail.py): a strength in [0, 1] of noise shaped to "
                             "each code's predicted per-band detail energy, fitted on the checkpoint's training "
                             "music, which must be on this machine (default 0: none, the plain decoder output)")
    parser.add_argument("--detail_source", type=Literal[SOURCES], default=SOURCES[0],
                        help="texture of the detail: exemplar (a training window's residual, scaled to the "
                             "predicted energies) or gaussian (noise with their covariance) (default: exemplar)")


def build_parser() -> ArgumentParser:
    parser = command_parser("generate", __doc__.splitlines()[0])
    commands = parser.add_subcommands(dest="command", required=True)

    def command(name: str, help: str, ckpt: bool = True) -> ArgumentParser:
        sub = ArgumentParser(description=help, allow_abbrev=False)
        sub.add_argument("--ckpt_path", type=Optional[str], required=ckpt, help="checkpoint (best.ckpt or last.ckpt)"
                         + ("" if ckpt else "; its mel settings are measured (default: the project's defaults)"))
        sub.add_argument("--device", type=str, default="cpu", help="cpu or cuda[:i]")
        sub.add_argument("--griffin_lim_iters", type=PositiveInt, default=64, help="Griffin-Lim iterations")
        sub.add_argument("--vocoder", type=Optional[str], default=None,
                         help="a Vocos download (the folder with config.yaml and pytorch_model.bin, or the "
                              "config.yaml) to play the audio instead of Griffin-Lim; the checkpoint must have "
                              "been trained on its features (configs/vocos.yaml, docs/vocoder.md)")
        sub.add_argument("--vocoder_weights", type=Optional[str], default=None,
                         help="the vocoder's weights file, when it is not pytorch_model.bin beside its config")
        if ckpt:
            add_force_flag(sub, "replace output files that already exist (never an input)")
            sub.add_argument("--alpha", type=str, default="0",
                             help="variance compensation: a strength in [0, 1] (0: the plain decoder output, the "
                                  "least MSE) or 'perceptual' (the checkpoint's point where every validation band "
                                  "keeps 90%% of its detail)")
        commands.add_subcommand(name, sub, help=help)
        return sub

    sub = command("reconstruct", "reconstruct a whole recording through the model")
    sub.add_argument("input", type=str, help="audio file or .npy log-mel (n_mels, frames), any length")
    sub.add_argument("--out", type=str, required=True, help="WAV to write; a PNG of input vs output goes beside it")
    sub.add_argument("--hop", type=Optional[PositiveInt], default=None,
                     help="frames between segments (default: half a segment)")
    sub.add_argument("--seed", type=int, default=0, help="seed of the generated detail (with --detail above 0)")
    add_detail_flag(sub)

    sub = command("sample", "decode draws from the prior")
    sub.add_argument("-n", type=PositiveInt, default=8, help="number of samples")
    sub.add_argument("--out", type=str, required=True, help="folder for sample_XX.wav and samples.png")
    sub.add_argument("--temperature", type=float, default=1.0,
                     help="scales each draw's deviation from its component's mean (N(0, I): its standard deviation); "
                          "0: the component means")
    sub.add_argument("--seed", type=Optional[int], default=None, help="seed of the draws (default: a fresh one)")
    add_prior_flag(sub, "the prior the codes are drawn from")
    add_detail_flag(sub)

    sub = command("interpolate", "morph between two recordings through the latent space")
    sub.add_argument("a", type=str, help="first recording (audio or .npy log-mel)")
    sub.add_argument("b", type=str, help="second recording")
    sub.add_argument("--steps", type=int, default=8, help="points on the path, both ends included")
    sub.add_argument("--out", type=str, required=True, help="folder for step_XX.wav, morph.wav and interpolation.png")
    sub.add_argument("--method", type=Literal[METHODS], default="slerp", help="path through the latent space")
    sub.add_argument("--offset_a", type=float, default=0.0, help="seconds into A where its segment starts")
    sub.add_argument("--offset_b", type=float, default=0.0, help="seconds into B where its segment starts")
    add_prior_flag(sub, "the prior each step's log-density is reported under (the path does not depend on it)")

    sub = command("ceiling", "spectral convergence of Griffin-Lim (or --vocoder) on a recording's own log-mel",
                  ckpt=False)
    sub.add_argument("audio", type=str, help="a recording")
    sub.add_argument("--offset", type=float, default=0.0, help="start of the excerpt, seconds")
    sub.add_argument("--seconds", type=float, default=30.0, help="length of the excerpt; 0 for the rest of the file")
    return parser


def run(parsed) -> None:
    command, args = parsed.command, parsed[parsed.command]  # the chosen subcommand's flags
    common = {"device": args.device, "griffin_lim_iters": args.griffin_lim_iters}
    if command != "ceiling":
        common.update(alpha=args.alpha, vocoder=args.vocoder, vocoder_weights=args.vocoder_weights, force=args.force)
    if command in ("reconstruct", "sample"):
        check_strength(args.detail), check_source(args.detail_source)  # before any work
    if command == "reconstruct":
        result = reconstruct_file(args.ckpt_path, args.input, args.out, hop=args.hop, detail=args.detail,
                                  seed=args.seed, detail_source=args.detail_source, **common)
        print(f"reconstructed {result['seconds']:.2f} s ({result['frames']} frames) -> {result['wav']}, {result['png']}")
    elif command == "sample":
        result = sample_files(args.ckpt_path, args.out, args.n, args.temperature, args.seed, prior=args.prior,
                              detail=args.detail, detail_source=args.detail_source, **common)
        print(f"wrote {len(result['wavs'])} samples of the prior {result['prior']} and {result['png']}")
    elif command == "interpolate":
        result = interpolate_files(args.ckpt_path, args.a, args.b, args.out, args.steps, args.method,
                                   args.offset_a, args.offset_b, prior=args.prior, **common)
        print(f"wrote {len(result['wavs'])} steps, {result['morph']} and {result['png']} "
              f"(segments at {result['offsets'][0]:.2f} s and {result['offsets'][1]:.2f} s)")
        print(f"log-density of each step under the prior {result['prior']} (nats per code): "
              + ", ".join(f"{v:.1f}" for v in result["log_density"]))
    else:
        mel = load_generation_model(args.ckpt_path).mel if args.ckpt_path else None
        vocoder, name = None, f"Griffin-Lim ({args.griffin_lim_iters} iterations)"
        if args.vocoder:  # measured on its own features, or refused when the checkpoint's differ
            vocoder = load_vocos(args.vocoder, args.vocoder_weights, args.device, features=mel, source=args.ckpt_path)
            mel, name = mel or vocoder.mel, f"Vocos ({args.vocoder})"
        mel = mel or MelSettings()
        result = measure_ceiling(args.audio, mel, args.offset, args.seconds or None, vocoder=vocoder, **common)
        print(f"{name} ceiling on {args.audio} ({result['seconds']:.1f} s from {args.offset:g} s, "
              f"{mel.n_mels} mels, n_fft {mel.n_fft}, hop {mel.hop_length}): "
              f"spectral convergence {result['spectral_convergence']:.4f} "
              f"({result['in_band']:.4f} over the STFT bins the mel filters cover)")


def main(argv=None) -> int:
    parser = build_parser()
    try:
        run(parse_command(parser, argv))
    except MusicVAEError as err:
        return report_error(parser.prog, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
