"""Resampling and centred STFT framing of a stream of audio blocks, equal to doing them at once.

A three-hour recording is 476 million samples at 44.1 kHz: as one float32 array it takes 1.9 GB,
and torchaudio's resampler asks for 15 GB to convolve it. Both stages only look a fixed distance
around each output, so they run on pieces of a stream, each carrying that much context on either
side, and the concatenated outputs are the whole signal's outputs, bit for bit:

* torchaudio's windowed-sinc resampler (Resample) is a strided convolution: with orig' and new'
  the two rates divided by their gcd, outputs [k new', (k+1) new') are made from the inputs
  [k orig' - width, (k+1) orig' + width). A piece that starts at a multiple of orig' and carries
  `width` samples beyond the outputs it releases on each side computes them exactly as the whole
  signal would.
* A centred STFT frame t covers the reflect-padded samples [t hop, t hop + n_fft): frames
  [t0, t1) need only the padded samples [t0 hop, (t1 - 1) hop + n_fft).

Every call but a short stream's last one sees pieces of one length, and the last piece reaches
back to that length too: torch picks its convolution algorithm by input size (ATen's
`ConvParams::use_mkldnn` takes oneDNN only above 20480 elements), and the two round differently
in the last bit, which a log-mel magnifies in quiet bins. A stream shorter than one piece is one
call on the whole signal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Optional

import torch
from torch import Tensor

#: Input samples behind each resampler call (6 s at 44.1 kHz), and STFT frames per log-mel call (12 s at
#: 22050 Hz with a 256 hop). On a 20-minute 44.1 kHz FLAC, `prepare` needed about 60 MB above its imports
#: with these and 170 MB with pieces 4x as long, which were no faster (docs/data.md).
RESAMPLE_BLOCK = 1 << 18
FRAME_BLOCK = 1024

class _Pending:
    """The samples of a stream from index `start` up to `end` that may still be needed."""

    def __init__(self) -> None:
        self.pieces: list[Tensor] = []
        self.start = 0
        self.end = 0

    def add(self, samples: Tensor) -> None:
        self.pieces.append(samples)
        self.end += samples.shape[-1]

    def take(self, a: int, b: int) -> Tensor:
        """Samples [a, b) of the stream, start <= a <= b <= end."""
        if len(self.pieces) > 1:
            self.pieces = [torch.cat(self.pieces)]  # joined when read, not per block received
        return self.pieces[0][a - self.start : b - self.start]

    def drop_before(self, a: int) -> None:
        """Forget the samples before index `a`; a copy, so the dropped ones are freed."""
        if a > self.start and self.pieces:
            self.pieces = [self.take(a, self.end).clone()]
            self.start = a


@torch.inference_mode()
def resample_blocks(blocks: Iterable[Tensor], resampler: Callable[[Tensor], Tensor], orig_freq: int,
                    new_freq: int, width: int, block: int = RESAMPLE_BLOCK) -> Iterator[Tensor]:
    """Resample a stream of (samples,) blocks, as `resampler` would resample them joined.

    Args:
        blocks: (samples,) float tensors at `orig_freq`, of any lengths.
        resampler: a torchaudio `transforms.Resample(orig_freq, new_freq)`.
        orig_freq, new_freq: its rates.
        width: its kernel's reach in input samples on each side (`Resample.width`).
        block: input samples released per call (rounded down to a multiple of orig').

    Yields:
        (samples,) blocks at `new_freq`; joined, ceil(n new_freq / orig_freq) samples for n input
        samples, equal to `resampler` of the joined input.
    """
    gcd = math.gcd(orig_freq, new_freq)
    orig, new = orig_freq // gcd, new_freq // gcd
    context = -(-width // orig) * orig  # at least `width`, and a multiple of orig' so pieces stay aligned
    step = max(1, block // orig) * orig
    size = step + 2 * context
    pending = _Pending()
    start = 0  # the first input whose outputs are not yet released; a multiple of orig'
    for samples in blocks:
        pending.add(samples)
        while pending.end >= max(0, start - context) + size:
            a = max(0, start - context)
            out = resampler(pending.take(a, a + size))
            first = (start - a) // orig * new
            yield out[first : first + step // orig * new].clone()
            start += step
            # The last piece reaches back up to `size` samples before the end (see below).
            pending.drop_before(max(0, start - context - size - orig))
    if pending.end == 0:
        return
    # The rest, in a piece of the usual length that reaches back over released outputs.
    a = max(0, min(start - context, pending.end - size))
    a -= a % orig
    out = resampler(pending.take(a, pending.end))
    yield out[(start - a) // orig * new :].clone()


@torch.inference_mode()
def centred_frame_blocks(blocks: Iterable[Tensor], frames: Callable[[Tensor], Tensor], n_fft: int, hop: int,
                         block: int = FRAME_BLOCK) -> Iterator[Tensor]:
    """Apply a frame-wise transform to the centred (reflect-padded) STFT frames of a stream.

    Args:
        blocks: (samples,) float tensors, of any lengths; together at least n_fft // 2 + 1 samples
            for any output (torch's reflect padding needs that many).
        frames: (padded samples,) -> (..., F) for the F = 1 + (samples - n_fft) // hop frames of an
            uncentred STFT (LogMel.frames).
        n_fft, hop: the STFT's window and hop.
        block: frames per call.

    Yields:
        (..., frames) outputs that, joined on the last axis, equal `frames` of the whole stream
        reflect-padded by n_fft // 2 on each side (what torch.stft(center=True) frames).
    """
    pad = n_fft // 2
    block = max(block, 1 + -(-pad // hop))  # a full piece needs more than the left padding
    size = (block - 1) * hop + n_fft  # padded samples behind `block` frames
    pending = _Pending()  # in padded coordinates: index pad is the stream's first sample
    head: Optional[list[Tensor]] = []  # the stream's start, until the left reflection can be made
    tail = torch.zeros(0)  # its last pad + 1 samples, for the right reflection
    received = 0
    t = 0  # the first frame not yet released
    for samples in blocks:
        received += samples.shape[-1]
        tail = samples[-(pad + 1) :] if samples.shape[-1] > pad else torch.cat([tail, samples])[-(pad + 1) :]
        if head is not None:
            head.append(samples)
            if received <= pad:
                continue
            start = torch.cat(head)
            pending.add(torch.cat([start[1 : pad + 1].flip(0), start]))  # reflect: x[pad] .. x[1], x[0], ...
            head = None
        else:
            pending.add(samples)
        while pending.end >= t * hop + size:
            yield frames(pending.take(t * hop, t * hop + size))
            t += block
            pending.drop_before(max(0, (t - block) * hop))  # the last piece may reach a block back
    if head is not None:
        return  # too short to pad; the caller says so
    pending.add(tail[:-1].flip(0))  # reflect: x[n-2] .. x[n-pad-1]
    total = 1 + (received + 2 * pad - n_fft) // hop
    while t < total:  # the frames that reach into the right reflection, in full pieces
        a = t if total - t >= block else max(0, total - block)  # the last piece reaches back
        b = min(total, a + block)
        yield frames(pending.take(a * hop, (b - 1) * hop + n_fft))[..., t - a :]
        t = b

