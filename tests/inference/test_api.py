"""`musicvae.load(...)`: the Python API on audio, on the session's tiny trained checkpoint. One tiling
for `encode` and `predict`, the tail included; the README's Python section, run as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import musicvae
from conftest import REPO
from helpers import run_command, write_tone
from musicvae.data.segments import segment_starts
from musicvae.errors import ConfigError
from musicvae.inference.api import _windows

pytestmark = pytest.mark.usefixtures("one_thread")


def _music(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """(channels, samples) float32: a chord that changes every half second, over a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    notes = 220.0 * 2 ** (((t * 2).astype(int) % 5) / 12)
    mono = 0.3 * np.sin(2 * np.pi * notes * t) + 0.1 * np.sin(2 * np.pi * 3 * notes * t)
    return np.stack([mono * (1 - 0.3 * c) + 0.01 * rng.standard_normal(t.size) for c in range(channels)]).astype(np.float32)


@pytest.fixture(scope="module")
def model(tiny_run):
    return musicvae.load(tiny_run["ckpt_dir"] / "best.ckpt")


@pytest.mark.parametrize("total", [5, 32, 33, 64, 100, 257])
@pytest.mark.parametrize("block", [1, 7, 32, 1000])
def test_windows_of_a_stream_are_segment_starts_of_the_whole(total, block):
    """Any block sizes give the windows of the whole log-mel at segment_starts(total, F, F), the tail's included."""
    mel = np.random.default_rng(total).standard_normal((3, total)).astype(np.float32)
    got = list(_windows((mel[:, i : i + block] for i in range(0, total, block)), 32, -11.5))
    assert [s for s, _ in got] == segment_starts(total, 32, 32)
    padded = np.pad(mel, ((0, 0), (0, max(0, 32 - total))), constant_values=-11.5)
    for start, window in got:
        np.testing.assert_array_equal(window, padded[:, start : start + 32])


def test_encode_takes_any_rate_and_channels_and_a_file(model, tmp_path):
    stereo = _music(2.3, 44100, channels=2)
    codes, starts = model.encode(stereo, 44100, return_starts=True)
    # 2.3 s at 22050 Hz: 199 frames, windows at 0, 32, ..., 160 and the tail's at 167, which ends at the end.
    assert codes.shape == (7, model.latent_dim) and codes.dtype == torch.float32
    frames = [0, 32, 64, 96, 128, 160, 167]
    assert starts.tolist() == pytest.approx([f * 256 / 22050 for f in frames])
    mixed = model.encode(torch.from_numpy(stereo.mean(axis=0)), 44100)  # channels are averaged
    assert torch.allclose(mixed, codes, atol=1e-6)
    path = tmp_path / "song.wav"
    sf.write(path, stereo.T, 44100, subtype="FLOAT")
    assert torch.allclose(model.encode(path), codes, atol=1e-6)  # a file, decoded block by block
    # Batches of other sizes may round differently in the last bit (oneDNN picks its kernels by shape).
    assert torch.allclose(model.encode(stereo, 44100, batch_size=2), model.encode(stereo, 44100, batch_size=5), atol=1e-6)
    with pytest.raises(ConfigError, match=r"\(channels, samples\).*\.T"):
        model.encode(stereo.T, 44100)  # soundfile's (samples, channels)
    with pytest.raises(ConfigError, match="sample_rate"):
        model.encode(stereo)


def test_decode_reconstruct_and_sample_give_waveforms_at_the_models_rate(model):
    audio = _music(2.0, 16000)[0]
    codes, starts = model.encode(audio, 16000, return_starts=True)
    wave = model.decode(codes, starts, griffin_lim_iters=4)
    total = int(round(float(starts[-1]) * 22050 / 256)) + model.frames  # the last window ends the piece
    assert wave.shape == ((total - 1) * 256,) and torch.isfinite(wave).all()
    assert model.reconstruct(audio, 16000, griffin_lim_iters=4).shape == (int(np.ceil(2.0 * 22050)),)
    one = model.sample(2, seed=3, griffin_lim_iters=4)
    assert one.shape == (2, (model.frames - 1) * 256)
    long = model.sample(2, seconds=1.5, seed=3, griffin_lim_iters=4)
    assert long.shape == (2, round(1.5 * 22050))
    assert torch.equal(long, model.sample(2, seconds=1.5, seed=3, griffin_lim_iters=4))  # seeded draws
    mel = model.decode_mel(codes[:1])
    with torch.no_grad():
        direct = model.model.denormalize(model.model.decode_windows(codes[:1]))[0, 0]
    assert torch.allclose(mel, direct, atol=1e-6)  # one code: its window, denormalised
    if bool(model.model.module.gain_fitted):
        assert not torch.allclose(model.decode_mel(codes[:1], alpha=1.0), mel)  # the strength is an argument


def test_predict_writes_the_codes_encode_returns(model, tiny_run, tmp_path):
    """One tiling and one front end: `musicvae predict` on an audio file gives encode's codes, tail window included."""
    folder = tmp_path / "music"
    folder.mkdir()
    rate = 32000
    audio = _music(2.3, rate, channels=2, seed=1)
    sf.write(folder / "piece.wav", audio.T, rate, subtype="FLOAT")
    run = run_command("musicvae", ["predict", "--ckpt_path", str(tiny_run["ckpt_dir"] / "best.ckpt"),
                                   "--data.data_dir", str(folder), "--data.cache_dir", str(tmp_path / "cache"),
                                   "--predict_dir", str(tmp_path / "codes"), "--trainer.logger", "false"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    item = torch.load(tmp_path / "codes" / "piece.wav.pt", weights_only=True)
    codes, starts = model.encode(audio, rate, return_starts=True)
    assert item["n_frames"] % item["frames"] != 0  # a tail shorter than a window ...
    assert item["start_frames"].tolist() == segment_starts(item["n_frames"], 32, 32)  # ... is encoded
    assert torch.equal(item["start_seconds"], starts)
    assert torch.allclose(item["mu"], codes, atol=1e-6)


def test_load_refuses_what_is_not_a_model(tmp_path):
    with pytest.raises(musicvae.CheckpointError, match="no such checkpoint or folder"):
        musicvae.load(tmp_path / "missing.ckpt")
    with pytest.raises(musicvae.CheckpointError, match="no config.json"):
        musicvae.load(tmp_path)


README_SECTION = re.compile(r"^## Python API\n.*?^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def test_readme_python_section_runs_as_written(tiny_run, tmp_path, monkeypatch):
    code = README_SECTION.search((REPO / "README.md").read_text(encoding="utf-8")).group(1)
    assert len(code.splitlines()) <= 15
    (tmp_path / "checkpoints" / "recommended").mkdir(parents=True)
    os.symlink(tiny_run["ckpt_dir"] / "best.ckpt", tmp_path / "checkpoints" / "recommended" / "best.ckpt")
    write_tone(tmp_path / "song.ogg", seconds=2.0, rate=44100, channels=2)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert {"song_decoded.wav", "song_vae.wav", "sample.wav"} <= {p.name for p in tmp_path.iterdir()}
    assert {p.name for p in (tmp_path / "my-model").iterdir()} == {"config.json", "model.safetensors", "README.md"}
    assert isinstance(namespace["model"], musicvae.MusicVAE) and namespace["codes"].shape[1] == 8
