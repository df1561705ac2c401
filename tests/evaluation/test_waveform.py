"""Waveform metrics of `evaluate`: the two distances on known signals, the window choice, excerpts read
from audio files, then `musicvae evaluate` on a tiny folder of audio (in-process)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import load_script
from musicvae.audio.mel import LogMel, load_audio
from musicvae.audio.synth import render_piece
from musicvae.audio.vocoder import GriffinLimVocoder
from musicvae.evaluation.waveform import (GRIFFIN_LIM_ITERS, multi_resolution_stft, pick_windows, read_excerpts,
                                          si_sdr, waveform_metrics)
from musicvae.inference.loading import datamodule_for, load_module


def tone_with_noise(n: int = 8000, seed: int = 0) -> torch.Tensor:
    """(2, n): two clips with energy in every STFT bin, so no magnitude sits at the floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 22050
    clips = [np.sin(2 * np.pi * f * t) + 0.1 * rng.standard_normal(n) for f in (440.0, 1234.5)]
    return torch.tensor(np.stack(clips))


def test_a_signal_against_itself_scores_zero_distance_and_a_large_ratio():
    x = tone_with_noise()
    distance = multi_resolution_stft(x, x)
    for part in ("total", "spectral_convergence", "log_magnitude"):
        assert torch.equal(distance[part], torch.zeros(2, dtype=torch.float64)), part
    assert (si_sdr(x, x) > 100).all()


def test_si_sdr_ignores_gain_and_offset_and_the_stft_distance_measures_it_exactly():
    x = tone_with_noise()
    distorted = x + 0.3 * tone_with_noise(seed=1)
    assert si_sdr(0.3 * distorted, x) == pytest.approx(si_sdr(distorted, x), abs=1e-9)
    assert si_sdr(distorted + 0.5, x) == pytest.approx(si_sdr(distorted, x), abs=1e-9)  # zero-mean: DC is ignored
    assert float(si_sdr(distorted, x).min()) < 30  # a finite ratio: the distortion is seen
    # A gain g changes every magnitude by g: spectral convergence 1 - g, log magnitude |log g|.
    scaled = multi_resolution_stft(0.3 * x, x)
    assert scaled["spectral_convergence"] == pytest.approx(torch.full((2,), 0.7, dtype=torch.float64), rel=1e-9)
    assert scaled["log_magnitude"] == pytest.approx(torch.full((2,), abs(math.log(0.3)), dtype=torch.float64), rel=1e-6)


def test_noise_scores_far_from_the_signal():
    x = tone_with_noise()
    noise = torch.tensor(np.random.default_rng(5).standard_normal(x.shape))
    assert (si_sdr(noise, x) < -20).all()
    assert (multi_resolution_stft(noise, x)["total"] > 1.0).all()
    with pytest.raises(ValueError, match="shorter than every STFT size"):
        multi_resolution_stft(x[:, :400], x[:, :400])


def test_no_clips_turns_the_waveform_metrics_off():
    assert waveform_metrics(None, None, None, clips=0) == {"clips": 0, "not_available": "turned off by --waveform_clips 0"}


def test_windows_are_spread_evenly_and_bounded():
    rows = np.arange(10, 30)
    assert pick_windows(rows, 3).tolist() == [10, 20, 29]
    assert pick_windows(rows, 100).tolist() == rows.tolist()
    assert pick_windows(rows, 0).size == 0 and pick_windows(rows[:0], 4).size == 0


@pytest.mark.parametrize("rate", [22050, 44100, 48000])
def test_excerpts_equal_slices_of_the_whole_file_resampled(tmp_path, rate):
    path = tmp_path / f"piece_{rate}.wav"
    sf.write(path, render_piece(3, seconds=1.5, sample_rate=rate), rate, subtype="FLOAT")
    whole = load_audio(path, 22050)
    starts, length = [0, 7000, len(whole) - 1000], 4000
    excerpts = read_excerpts(path, 22050, starts, length)
    for row, start in enumerate(starts):
        expected = torch.zeros(length)
        piece = whole[start : start + length]
        expected[: len(piece)] = piece  # zero past the end
        assert torch.allclose(excerpts[row], expected, atol=1e-5), (rate, start)


@pytest.mark.slow
def test_evaluate_scores_vocoded_windows_against_the_audio(tiny_run, tmp_path, capsys):
    music = tmp_path / "music"
    music.mkdir()
    for i in range(2):  # one file at another rate than the checkpoint's, so excerpts are resampled
        sf.write(music / f"piece_{i}.wav", render_piece(i, seconds=1.5, sample_rate=(44100, 22050)[i]),
                 (44100, 22050)[i])
    ckpt = str(tiny_run["ckpt_dir"] / "best.ckpt")
    main = load_script("evaluate").main
    out = tmp_path / "report"
    assert main(["--ckpt_path", ckpt, "--data.data_dir", str(music), "--out", str(out), "--waveform_clips", "3"]) == 0
    wave = json.loads((out / "metrics.json").read_text())["metrics"]["waveform"]
    assert wave["clips"] == len(wave["windows"]) == 3
    assert {w["file"] for w in wave["windows"]} == {"piece_0.wav", "piece_1.wav"}  # spread over the recordings
    for key in ("si_sdr_db", "mrstft", "spectral_convergence", "log_magnitude"):
        assert set(wave[key]) >= {"model", "ceiling"} and all(math.isfinite(v) for v in wave[key].values())
    # A two-epoch model is further from the audio than the vocoder on the recording's own mel.
    assert wave["mrstft"]["model"] > wave["mrstft"]["ceiling"]

    # The ceiling again, from whole files decoded at once and the windows' cached mels.
    module, loaded = load_module(ckpt)
    datamodule = datamodule_for(loaded, data_dir=str(music))
    dataset = datamodule.evaluation_set("all")
    mel, frames = datamodule.mel, datamodule.frames
    length = (frames - 1) * mel.hop_length
    rows = [next(i for i, (f, s) in enumerate(dataset.items[:, :2])
                 if datamodule.sources[f].rel == w["file"] and s == w["start_frame"]) for w in wave["windows"]]
    audio = {name: load_audio(music / name, mel.sample_rate) for name in ("piece_0.wav", "piece_1.wav")}
    reference = torch.stack([audio[w["file"]][w["start_frame"] * mel.hop_length:][:length] for w in wave["windows"]])
    own = datamodule.normalizer.inverse(torch.stack([dataset[r][0] for r in rows]))  # (3, n_mels, frames)
    inverted = GriffinLimVocoder(mel, n_iter=GRIFFIN_LIM_ITERS)(own, length=length)
    assert float(si_sdr(inverted, reference).mean()) == pytest.approx(wave["si_sdr_db"]["ceiling"], abs=0.05)
    # The windows line up with the audio: its own log-mel is the cached one, away from the window's edges.
    assert torch.allclose(LogMel(mel)(reference)[..., 4:-4], own[..., 4:-4], atol=1e-3)

    report = (out / "report.md").read_text()
    assert "## Waveform metrics" in report and "vocoder alone (ceiling)" in report
    assert f"{wave['si_sdr_db']['ceiling']:.2f}" in report and f"{wave['mrstft']['model']:.3f}" in report
    printed = capsys.readouterr().out
    assert f"SI-SDR {wave['si_sdr_db']['model']:.2f} dB (vocoder alone {wave['si_sdr_db']['ceiling']:.2f} dB)" in printed
