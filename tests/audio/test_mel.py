"""The audio front end: decode any format/channel count/rate, mix to mono, resample, log-mel."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from musicvae.audio import decode
from musicvae.audio.decode import AUDIO_SUFFIXES, AudioError, decode_audio
from musicvae.audio.mel import audio_to_log_mel, load_audio, log_mel
from musicvae.audio.mel_settings import MelSettings
from musicvae.errors import DataError

MEL = MelSettings(n_mels=64)


def tone(rate: int, seconds: float = 1.0, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    """(samples, channels) sine at `freq`, a different level per channel so mixing is visible."""
    t = np.arange(round(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([wave * (1.0 - 0.1 * c) for c in range(channels)], axis=1).astype(np.float32)


def expected_frames(samples: int, rate: int, mel: MelSettings = MEL) -> int:
    return 1 + math.ceil(samples * mel.sample_rate / rate) // mel.hop_length


def expected_peak_bin(freq: float, mel: MelSettings = MEL) -> int:
    """The mel filter that responds most to a sine at `freq` (the filterbank LogMel uses)."""
    fbanks = torchaudio.functional.melscale_fbanks(
        mel.n_fft // 2 + 1, mel.f_min, mel.f_max or mel.sample_rate / 2, mel.n_mels, mel.sample_rate,
        mel_scale=mel.mel_scale,
    )  # (n_freqs, n_mels)
    return int(fbanks[round(freq * mel.n_fft / mel.sample_rate)].argmax())


def peak_bin(spec: np.ndarray) -> int:
    return int(spec[:, 2:-2].mean(axis=1).argmax())  # skip the edge frames of the centred STFT


def writable(fmt: str, subtype: str) -> bool:
    return subtype in sf.available_subtypes(fmt)


# (suffix, format, subtype, rate): lossy codecs carry their own rates (Opus only runs at 48 kHz).
FORMATS = [
    (".wav", "WAV", "PCM_16", 44100),
    (".wav", "WAV", "PCM_24", 44100),
    (".wav", "WAV", "FLOAT", 44100),
    (".flac", "FLAC", "PCM_16", 44100),
    (".flac", "FLAC", "PCM_24", 96000),
    (".aiff", "AIFF", "PCM_16", 22050),
    (".ogg", "OGG", "VORBIS", 44100),
    (".opus", "OGG", "OPUS", 48000),
    (".mp3", "MP3", "MPEG_LAYER_III", 44100),
]


@pytest.mark.parametrize("suffix,fmt,subtype,rate", FORMATS, ids=[f"{f[0][1:]}-{f[2]}" for f in FORMATS])
def test_every_format_decodes_to_the_expected_mel(tmp_path: Path, suffix, fmt, subtype, rate) -> None:
    if not writable(fmt, subtype):
        pytest.skip(f"this libsndfile cannot write {fmt}/{subtype}")
    assert suffix in AUDIO_SUFFIXES
    path = tmp_path / f"tone{suffix}"
    sf.write(path, tone(rate, 2.0, channels=2), rate, format=fmt, subtype=subtype)
    spec = audio_to_log_mel(path, MEL)
    assert spec.dtype == np.float32 and spec.shape[0] == MEL.n_mels
    # Lossy codecs add or trim a few milliseconds of encoder delay and padding.
    assert abs(spec.shape[1] - expected_frames(2 * rate, rate)) <= 4
    assert np.isfinite(spec).all()
    assert peak_bin(spec) == expected_peak_bin(440.0)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 96000])
@pytest.mark.parametrize("channels", [1, 2, 6])
def test_channels_and_rates_give_the_same_mel(tmp_path: Path, rate: int, channels: int) -> None:
    path = tmp_path / "tone.wav"
    sf.write(path, tone(rate, 1.0, channels), rate, subtype="PCM_16")
    spec = audio_to_log_mel(path, MEL)
    assert spec.shape == (MEL.n_mels, expected_frames(rate, rate))
    assert peak_bin(spec) == expected_peak_bin(440.0)
    # After mixing, the tone is as loud as a mono tone at the channels' mean level, at any rate.
    level = np.mean([1.0 - 0.1 * c for c in range(channels)])
    reference = audio_to_log_mel(_write(tmp_path / "ref.wav", level * tone(22050, 1.0), 22050), MEL)
    band = expected_peak_bin(440.0)
    assert abs(np.median(spec[band]) - np.median(reference[band])) < 0.1  # natural-log units


def _write(path: Path, wave: np.ndarray, rate: int, subtype: str = "FLOAT") -> Path:
    sf.write(path, wave, rate, subtype=subtype)
    return path


def test_decode_mixes_channels_to_their_mean(tmp_path: Path) -> None:
    left = tone(16000, 0.5)[:, 0]
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    wave, rate = decode_audio(_write(tmp_path / "s.wav", stereo, 16000))
    assert rate == 16000 and wave.dtype == np.float32 and wave.shape == left.shape
    np.testing.assert_allclose(wave, 0.5 * left, atol=1e-6)


def test_decode_in_blocks_equals_one_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "long.flac", tone(8000, 1.3, channels=3), 8000, subtype="PCM_16")
    whole, _ = decode_audio(path)
    monkeypatch.setattr(decode, "_DECODE_BLOCK_BYTES", 12 * 1000)  # 1000 frames: 11 blocks, the last partial
    blocks, _ = decode_audio(path)
    np.testing.assert_array_equal(whole, blocks)


def test_audio_matches_the_waveform_front_end(tmp_path: Path) -> None:
    """A float WAV at the model rate gives exactly what LogMel gives its waveform."""
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, 22050).astype(np.float32)
    spec = audio_to_log_mel(_write(tmp_path / "n.wav", wave, 22050), MEL)
    np.testing.assert_allclose(spec, log_mel(torch.from_numpy(wave), MEL).numpy(), atol=1e-5)


@pytest.mark.parametrize("shape", [(4000,), (2, 4000), (2, 3, 4000)])
@pytest.mark.parametrize("power", [2.0, 1.0])
def test_log_mel_equals_torchaudio(shape: tuple[int, ...], power: float) -> None:
    """LogMel's power-2 shortcut computes what torchaudio's MelSpectrogram computes."""
    mel = MelSettings(n_mels=40, power=power, mel_scale="slaney", f_min=30.0)
    wave = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    reference = torchaudio.transforms.MelSpectrogram(
        sample_rate=mel.sample_rate, n_fft=mel.n_fft, hop_length=mel.hop_length, n_mels=mel.n_mels,
        f_min=mel.f_min, mel_scale=mel.mel_scale, power=power,
    )(wave)
    result = log_mel(wave, mel)
    assert result.shape == shape[:-1] + (40, 1 + 4000 // mel.hop_length)
    torch.testing.assert_close(result, torch.log(reference.clamp_min(mel.log_floor)), atol=1e-4, rtol=1e-5)


def test_load_audio_resamples(tmp_path: Path) -> None:
    wave = load_audio(_write(tmp_path / "t.wav", tone(48000, 0.5, 2), 48000), 22050)
    assert isinstance(wave, torch.Tensor) and wave.dtype == torch.float32
    assert wave.shape == (math.ceil(24000 * 22050 / 48000),)


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("missing.wav", None, "file not found"),
        ("empty.wav", b"", "empty file"),
        ("noise.wav", np.random.default_rng(1).bytes(4000), "cannot decode"),
        ("text.mp3", b"not audio at all\n" * 40, "cannot decode"),
    ],
)
def test_unreadable_files_raise_audio_error(tmp_path: Path, name: str, content, reason: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AudioError, match=reason) as info:
        decode_audio(path)
    assert str(info.value).startswith(str(path)) and isinstance(info.value, DataError)


def test_truncated_flac_raises(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.flac", tone(44100, 2.0), 44100, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="t.flac"):
        audio_to_log_mel(path, MEL)


@pytest.mark.parametrize(
    "wave,reason",
    [
        (np.zeros((22050, 2), np.float32), "silent"),
        (np.concatenate([tone(22050, 1.0), -tone(22050, 1.0)], axis=1), "silent"),  # cancels in the mix
        (tone(22050, 0.01), "too short"),
        (np.where(np.arange(22050)[:, None] == 500, np.nan, tone(22050, 1.0)).astype(np.float32), "NaN"),
    ],
    ids=["zeros", "anti-phase", "short", "nan"],
)
def test_unusable_audio_raises(tmp_path: Path, wave: np.ndarray, reason: str) -> None:
    path = _write(tmp_path / "bad.wav", wave, 22050)
    decode_audio(path)  # decodes; only the log-mel refuses it
    with pytest.raises(AudioError, match=reason):
        audio_to_log_mel(path, MEL)
