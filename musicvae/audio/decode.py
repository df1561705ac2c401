"""Audio files -> mono waveforms at their native rate, decoded block by block in bounded memory.

Audio files are decoded with the libsndfile bundled in soundfile's wheel (WAV, FLAC, OGG/Vorbis,
Opus, MP3, AIFF), because torchaudio.load needs torchcodec and FFmpeg. A file that cannot be
used raises AudioError with a one-line reason, including files visibly cut short, which
libsndfile itself decodes without complaint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import soundfile as sf

from musicvae.errors import DataError

#: File suffixes decoded as audio (compared in lower case); libsndfile reads every one of them.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")

# Bytes decoded per read, into one reused buffer that stays in the L2 cache while it is mixed to
# mono: faster than a fresh 1M-frame array per read, and memory stays bounded on long
# multichannel files.
_DECODE_BLOCK_BYTES = 1 << 19
# libsndfile's frame count of a stream that does not declare its length (SF_COUNT_MAX).
_UNKNOWN_FRAMES = (1 << 63) - 1


class AudioError(DataError):
    """A recording that cannot be used; the message starts with its path and gives the reason."""


def _decode_reason(path: Path, err: Exception) -> str:
    message = str(err).replace(f"'{path}'", "the file").strip()
    # libsndfile answers "not a regular file (possibly a pipe?)" for some plain files it cannot
    # parse (text named .mp3); say what is actually wrong.
    if "not a regular file" in message and path.is_file():
        message = "format not recognised"
    if "lost sync" in message:  # a FLAC stream that ends (or turns to garbage) mid-frame
        return f"truncated or corrupt ({message.removeprefix('Error : ').rstrip('.')})"
    kind = "" if isinstance(err, sf.LibsndfileError) else f"{type(err).__name__}: "
    return f"cannot decode ({kind}{message})"


# libsndfile's header log notes a data chunk longer than the file: "data : 88200 (should be 44078)".
_SHORT_CHUNK = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_OGG_MAX_PAGE = 27 + 255 + 255 * 255  # header, segment table, body: the longest possible Ogg page


def _truncation(path: Path, handle: sf.SoundFile) -> Optional[str]:
    """Why an opened file looks cut short (an interrupted copy or download), or None.

    libsndfile decodes what is there without complaint for two common containers, so they are
    checked here: WAV/AIFF whose data chunk is longer than the file, and Ogg streams whose last
    page is incomplete or lacks the end-of-stream flag every encoder writes on the final page.
    (FLAC reports a lost sync itself, see _decode_reason; MP3 frame counts are often estimates,
    so MP3 is not judged.)
    """
    if handle.format in ("WAV", "WAVEX", "AIFF", "AIFC", "W64", "CAF"):
        match = _SHORT_CHUNK.search(handle.extra_info)
        if match:
            declared, present = int(match.group(1)), int(match.group(2))
            # 0 and 0xFFFFFFFF are placeholders of writers that stream to disk, and a few bytes
            # short is a writer's miscount: neither is a cut file, whose loss is large.
            if declared < 0xFFFFFFF0 and declared - present >= max(1024, declared // 1000):
                return (f"truncated: the header promises {declared} bytes of audio, the file holds {present} "
                        "(an interrupted copy or download?)")
    elif handle.format == "OGG":
        with open(path, "rb") as raw:
            raw.seek(max(0, os.fstat(raw.fileno()).st_size - _OGG_MAX_PAGE))
            tail = raw.read()
        at = tail.rfind(b"OggS")
        if at < 0 or at + 27 > len(tail) or tail[at + 4] != 0:
            return None  # no page header in reach: leave it to the decoder
        segments = tail[at + 26]
        table = tail[at + 27 : at + 27 + segments]
        end = at + 27 + segments + sum(table)
        if len(table) < segments or end > len(tail):
            return "truncated: the last Ogg page is incomplete (an interrupted copy or download?)"
        if not tail[at + 5] & 0x04:
            return "truncated: the Ogg stream has no end-of-stream page (an interrupted copy, download or recording?)"
    return None


def _audio_error(path: Path, err: Exception) -> AudioError:
    """The one-line AudioError for what opening or reading `path` raised."""
    if isinstance(err, FileNotFoundError):
        return AudioError(f"{path}: {'broken symbolic link' if path.is_symlink() else 'file not found'}")
    if isinstance(err, IsADirectoryError):
        return AudioError(f"{path}: is a directory, not an audio file")
    return AudioError(f"{path}: {_decode_reason(path, err)}")


def decode_blocks(path: str | os.PathLike) -> tuple[int, Iterator[np.ndarray]]:
    """Open an audio file to decode it block by block, mixed to mono, in bounded memory.

    Args:
        path: any file libsndfile reads (see AUDIO_SUFFIXES); 16/24/32-bit PCM and float, any
            number of channels, any sample rate.

    Returns:
        Its native sample rate, and an iterator of (frames,) float32 mono blocks (the mean of the
        channels, each a new array) that joined are decode_audio's waveform.

    Raises:
        AudioError: here when the file is missing, empty, unreadable or visibly cut short; from the
            iterator for what only reading finds (corrupt data, a FLAC stream that ends early,
            not a single frame). A MemoryError is not the file's fault and passes unchanged.
    """
    path = Path(path)
    handle = None
    try:
        if os.stat(path).st_size == 0:
            raise AudioError(f"{path}: empty file (0 bytes)")
        handle = sf.SoundFile(str(path))
        truncated = _truncation(path, handle)
        if truncated:
            raise AudioError(f"{path}: {truncated}")
    except BaseException as err:
        if handle is not None:
            handle.close()
        if isinstance(err, (AudioError, MemoryError)) or not isinstance(err, Exception):
            raise
        raise _audio_error(path, err) from err  # libsndfile and its codecs raise several types
    return int(handle.samplerate), _read_blocks(path, handle)


def _read_blocks(path: Path, handle: sf.SoundFile) -> Iterator[np.ndarray]:
    with handle:
        try:
            channels = handle.channels
            weights = np.full(channels, 1.0 / channels, dtype=np.float32)
            buffer = np.empty((max(1024, _DECODE_BLOCK_BYTES // (4 * channels)), channels), np.float32)
            decoded = 0
            unknown_length = handle.format == "FLAC" and handle.frames >= _UNKNOWN_FRAMES
            while True:
                # Until a read comes back short: the header's frame count (which SoundFile.blocks()
                # trusts) is an estimate for MP3, wrong in a file cut short, and absent from a FLAC
                # written by a streaming encoder.
                if unknown_length:
                    block = _read_to_unknown_end(handle, buffer)
                else:
                    block = handle.read(len(buffer), out=buffer)  # (frames, channels), a view of the reused buffer
                if len(block):
                    decoded += len(block)
                    # A matrix-vector product mixes far faster than block.mean(axis=1). (frames, C) -> (frames,)
                    yield block[:, 0].copy() if channels == 1 else block @ weights
                if len(block) < len(buffer):
                    break
            declared, container = handle.frames, handle.format
        except (AudioError, MemoryError):
            raise
        except Exception as err:
            raise _audio_error(path, err) from err
    # FLAC's header count is exact when known (streamed encoders may leave it unset).
    if container == "FLAC" and 0 < decoded < declared < 1 << 40:
        raise AudioError(f"{path}: truncated: decoded {decoded} of the {declared} frames its header promises")
    if not decoded:
        raise AudioError(f"{path}: no audio frames could be decoded (empty or truncated)")


def _read_to_unknown_end(handle: sf.SoundFile, buffer: np.ndarray) -> np.ndarray:
    """SoundFile.read into `buffer` for a FLAC stream of unknown length.

    soundfile seeks to the new position after every read, and libsndfile cannot seek to the end
    of a FLAC stream whose header leaves the length unset (streaming encoders do): the read that
    reaches the end fills the buffer, then raises "Internal psf_fseek() failed". FLAC is integer
    PCM, which never decodes to NaN, so the frames read are those before the first NaN.
    """
    buffer.fill(np.nan)
    try:
        return handle.read(len(buffer), out=buffer)
    except sf.LibsndfileError as err:
        if "psf_fseek" not in str(err):
            raise
    unread = np.isnan(buffer[:, 0])
    return buffer[: int(unread.argmax()) if unread.any() else len(buffer)]


def decode_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode a whole audio file, mixed to mono (see decode_blocks, which bounds the memory).

    Returns:
        (samples,) float32 mono waveform and its native sample rate.

    Raises:
        AudioError: missing, empty, unreadable, corrupt, or without a single decodable frame.
    """
    rate, blocks = decode_blocks(path)
    return join_blocks(list(blocks)), rate


def join_blocks(blocks: list[np.ndarray]) -> np.ndarray:
    """`blocks` joined on their last axis; a single block is returned as it is, not copied."""
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=-1)
