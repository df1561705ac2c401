"""The block-wise front end (musicvae/audio/blocks.py): decoding, resampling and log-mels computed
piece by piece equal the whole-file computation, wherever the seams fall."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from musicvae.audio import decode
from musicvae.audio.decode import decode_audio, decode_blocks
from musicvae.audio.mel import LogMel, LogMelStream, audio_to_log_mel, resample
from musicvae.audio.mel_settings import MelSettings

MEL = MelSettings()  # the default features: 128 mels at 22050 Hz
#: Piece sizes that fall nowhere near one another or the rates' periods: decoded blocks of 4999 frames,
#: resampler pieces of 30011 input samples (rounded down to a multiple of orig / gcd), STFT pieces of 61
#: frames. (Resampler pieces stay above the 20480 samples below which torch convolves another way.)
DECODE_FRAMES, RESAMPLE_BLOCK, FRAME_BLOCK = 4999, 30011, 61


def recording(path: Path, rate: int, channels: int, samples: int) -> Path:
    """Noise and a tone, with a passage 100 dB down: its quiet bins magnify any rounding in the log."""
    rng = np.random.default_rng(rate + samples)
    t = np.arange(samples) / rate
    wave = 0.3 * np.sin(2 * np.pi * 330.0 * t)[:, None] + 0.05 * rng.standard_normal((samples, channels))
    wave[samples // 3 : samples // 2] *= 1e-5
    sf.write(path, wave.astype(np.float32), rate, subtype="FLOAT")
    return path


def whole_file_log_mel(path: Path, mel: MelSettings) -> np.ndarray:
    """One read, one resampling and one STFT of the whole file: the computation before blocks."""
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    mono = data @ np.full(data.shape[1], 1.0 / data.shape[1], dtype=np.float32)
    with torch.inference_mode():
        return LogMel(mel)(resample(torch.from_numpy(mono), rate, mel.sample_rate)).numpy()


@pytest.mark.parametrize("rate, channels", [(44100, 2), (48000, 2), (22050, 1), (16000, 2)],
                         ids=["44.1k-stereo", "48k-stereo", "22.05k-mono-no-resampling", "16k-stereo-upsampled"])
@pytest.mark.parametrize("extra", [0, 1, 255])
def test_block_wise_log_mel_equals_the_whole_file(tmp_path, monkeypatch, rate, channels, extra):
    samples = 5 * RESAMPLE_BLOCK + extra  # several pieces of every stage, the last ones partial
    path = recording(tmp_path / "x.wav", rate, channels, samples)
    monkeypatch.setattr(decode, "_DECODE_BLOCK_BYTES", 4 * channels * DECODE_FRAMES)
    native, blocks = decode_blocks(path)
    stream = LogMelStream(blocks, native, MEL, str(path), resample_block=RESAMPLE_BLOCK, frame_block=FRAME_BLOCK)
    pieces = list(stream)
    reference = whole_file_log_mel(path, MEL)
    assert len(pieces) > 4 and samples > 4 * RESAMPLE_BLOCK  # the seams are there to be tested
    joined = np.concatenate(pieces, axis=1)
    assert joined.shape == reference.shape
    assert np.abs(joined - reference).max() <= 1e-6
    assert stream.samples == samples and stream.resampled == -(-samples * MEL.sample_rate // rate)


def test_default_pieces_and_other_mel_settings_agree_too(tmp_path):
    """The default piece sizes on a recording longer than one piece of each stage, and settings
    whose STFT centring and power differ (odd n_fft, hop that does not divide it, magnitude)."""
    path = recording(tmp_path / "x.wav", 44100, 2, 44100 * 15 + 3)
    assert np.abs(audio_to_log_mel(path, MEL) - whole_file_log_mel(path, MEL)).max() <= 1e-6
    odd = MelSettings(n_fft=1001, hop_length=300, n_mels=40, power=1.0, sample_rate=16000)
    native, blocks = decode_blocks(path)
    pieces = LogMelStream(blocks, native, odd, resample_block=RESAMPLE_BLOCK, frame_block=37).joined()
    assert np.abs(pieces - whole_file_log_mel(path, odd)).max() <= 1e-6


def test_a_flac_without_a_length_in_its_header_decodes_to_its_end(tmp_path):
    """Streaming encoders leave FLAC's total-samples field at 0 ("unknown"); the header is no
    guide to where the stream ends, and the last read must not be lost (soundfile's seek after
    it fails there)."""
    wave = (0.3 * np.sin(np.arange(44100 * 3 + 77) * 0.05)).astype(np.float32)
    sf.write(tmp_path / "known.flac", wave, 44100, subtype="PCM_16")
    data = bytearray((tmp_path / "known.flac").read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first; its body starts at byte 8
    data[8 + 13] &= 0xF0  # total samples: the low 4 bits of byte 13 of the body and bytes 14-17
    data[8 + 14 : 8 + 18] = b"\0\0\0\0"
    (tmp_path / "streamed.flac").write_bytes(bytes(data))
    assert sf.info(tmp_path / "streamed.flac").frames != len(wave)  # libsndfile does not know the length
    decoded, rate = decode_audio(tmp_path / "streamed.flac")
    np.testing.assert_array_equal(decoded, decode_audio(tmp_path / "known.flac")[0])
    assert rate == 44100 and len(decoded) == len(wave)
