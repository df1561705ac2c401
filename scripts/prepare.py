"""Build the log-mel cache of a folder of audio files up front, on every CPU core.

`python scripts/prepare.py AUDIO_DIR --cache_dir CACHE_DIR [--workers N] [--n_mels 128 ...]`
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from musicvae.audio.mel import AUDIO_SUFFIXES, MelSettings  # noqa: E402
from musicvae.data.cache import build_audio_cache, cache_folder  # noqa: E402
from musicvae.data.builtin import default_cache_dir  # noqa: E402
from musicvae.errors import MusicVAEError  # noqa: E402

EPILOG = """\
Prepare large collections with this script before a multi-GPU (DDP) run. Training builds the same
cache in prepare_data, on one process per node while the other processes wait at a barrier; on a
large collection that wait can outlast the process group's start-up timeout (30 minutes by
default), and the run dies. Prepared here, the training run only checks the cache (a stat() per
file). Use the same --cache_dir (or $MUSICVAE_CACHE) and the same mel settings as the training
run (its --data.mel.* flags), or the run will not find this cache.

Unusable files (corrupt, truncated, not audio, empty, silent) are listed on stderr once each,
with the reason, and skipped; the exit status is 1 only when no file is usable.
"""


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use, e.g. under taskset
    except AttributeError:
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=textwrap.fill(
            f"Compute and cache the log-mel spectrogram of every audio file ({', '.join(AUDIO_SUFFIXES)}) "
            f"under AUDIO_DIR, recursively. Files already cached and unchanged are not decoded again.", 95
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("audio_dir", metavar="AUDIO_DIR", help="folder of audio files (only read)")
    parser.add_argument("--cache_dir", default=None,
                        help=f"root of the caches (default: $MUSICVAE_CACHE or {default_cache_dir()})")
    parser.add_argument("--workers", type=int, default=_cpu_count(),
                        help="decoding processes (default: all %(default)s cores; 0 decodes in this process)")
    parser.add_argument("--frames", type=int, default=128, help="segment length used to count segments")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    mel = parser.add_argument_group("mel settings (as --data.mel.* in training)")
    for f in dataclasses.fields(MelSettings):
        kind = {"int": int, "float": float}.get(str(f.type).split("[")[0], None)
        if f.name == "f_max":
            mel.add_argument("--f_max", type=float, default=None, help="default: sample_rate / 2")
        elif f.name == "mel_scale":
            mel.add_argument("--mel_scale", choices=["htk", "slaney"], default=f.default, help="default: %(default)s")
        else:
            mel.add_argument(f"--{f.name}", type=kind or float, default=f.default, help="default: %(default)s")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        mel = MelSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MelSettings)})
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    try:
        report = build_audio_cache(args.audio_dir, cache_dir, mel, workers=args.workers,
                                   progress=not args.no_progress)
    except MusicVAEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; what was finished stays cached", file=sys.stderr)
        return 130
    for path, reason in report.problems:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    segments = sum(entry.n_frames // args.frames for entry in report.entries)
    print(f"cache: {cache_folder(cache_dir, args.audio_dir, mel)}")
    print(f"files: {len(report.entries)} usable, {len(report.problems)} skipped "
          f"({report.computed} decoded now, {report.reused} unchanged since the last run)")
    print(f"hours of audio: {report.seconds_of_audio / 3600:.3f}")
    # Non-overlapping windows, the most training can use; it skips silent ones as it loads them.
    print(f"segments: {segments} of {args.frames} frames")
    if not report.entries:
        print(f"error: no usable audio file under {args.audio_dir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
