"""Build the log-mel cache of a folder of audio files up front, on every CPU core.

`musicvae prepare AUDIO_DIR [--data.cache_dir CACHE_DIR] [--workers N] [--data.mel.n_mels 128 ...]`
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path
from typing import Optional


from jsonargparse import ArgumentParser

from musicvae.audio.decode import AUDIO_SUFFIXES
from musicvae.commands.parsing import (RawDescription, add_mel_arguments, command_parser, mel_renames, mel_settings,
                                       parse_command)
from musicvae.data.cache import build_audio_cache, cache_folder
from musicvae.data.builtin import default_cache_dir
from musicvae.errors import ConfigError, MusicVAEError
from musicvae.io.storage import STORAGE_EXIT, StorageError

EPILOG = """\
Prepare large collections with this script before a multi-GPU (DDP) run. Training builds the same
cache in prepare_data, on one process per machine while the other processes wait (without a
timeout); several machines sharing one cache folder would each build it, and every process waits
idle meanwhile. Prepared here, the training run only checks the cache (a stat() per file). Use the
same --data.cache_dir (or $MUSICVAE_CACHE) and the same mel settings as the training run (the same
--data.mel.* flags, or one --config preset for both), or the run will not find this cache.

Unusable files (corrupt, truncated, not audio, empty, silent) are listed on stderr once each,
with the reason, and skipped; the exit status is 1 only when no file is usable.
"""


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use, e.g. under taskset
    except AttributeError:
        return os.cpu_count() or 1


def build_parser() -> ArgumentParser:
    parser = command_parser(
        "prepare",
        textwrap.fill(
            f"Compute and cache the log-mel spectrogram of every audio file ({', '.join(AUDIO_SUFFIXES)}) "
            f"under AUDIO_DIR, recursively. Files already cached and unchanged are not decoded again.", 95
        ),
        epilog=EPILOG,
        formatter_class=RawDescription,
    )
    parser.add_argument("audio_dir", metavar="AUDIO_DIR", help="folder of audio files (only read)")
    parser.add_argument("--data.cache_dir", type=Optional[str], default=None,
                        help=f"root of the caches (default: $MUSICVAE_CACHE or {default_cache_dir()})")
    parser.add_argument("--workers", type=int, default=_cpu_count(),
                        help="decoding processes (default: all cores; 0 decodes in this process)")
    parser.add_argument("--data.frames", type=int, default=128,
                        help="segment length used to count segments")
    parser.add_argument("--data.decode_timeout", type=Optional[float], default=600.0,
                        help="seconds one file may take to decode; its process is then killed and the file reported "
                             "as unusable (null: no limit)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_mel_arguments(parser)
    return parser


#: The flags of the former scripts/prepare.py, spelled as training spells them now.
RENAMES = {"--cache_dir": "--data.cache_dir", "--frames": "--data.frames", **mel_renames()}


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parse_command(parser, argv, RENAMES)
    try:
        mel = mel_settings(args)
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    cache_dir = Path(args.data.cache_dir).expanduser() if args.data.cache_dir else default_cache_dir()
    try:
        report = build_audio_cache(args.audio_dir, cache_dir, mel, workers=args.workers,
                                   progress=not args.no_progress, decode_timeout=args.data.decode_timeout)
    except StorageError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return STORAGE_EXIT
    except MusicVAEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; what was finished stays cached", file=sys.stderr)
        return 130
    for path, reason in report.problems:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    segments = sum(entry.n_frames // args.data.frames for entry in report.entries)
    print(f"cache: {cache_folder(cache_dir, args.audio_dir, mel)}")
    print(f"files: {len(report.entries)} usable, {len(report.problems)} skipped "
          f"({report.computed} decoded now, {report.reused} unchanged since the last run)")
    print(f"hours of audio: {report.seconds_of_audio / 3600:.3f}")
    # Non-overlapping windows, the most training can use; it skips silent ones as it loads them.
    print(f"segments: {segments} of {args.data.frames} frames")
    if not report.entries:
        print(f"error: no usable audio file under {args.audio_dir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
