"""GriffinLimVocoder: pitch survives the log-mel round trip at 128 mels, the cached pseudo-inverse
equals torchaudio's gelsd solve, and inversion is repeatable."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from musicvae.audio.mel import LogMel, MelSettings
from musicvae.errors import DataError
from musicvae.data.segments import Normalizer
from musicvae.audio.vocoder import (GriffinLimVocoder, griffin_lim_ceiling, measure_ceiling,
                              waveform_spectral_convergence)

#: The project's default features: 128 mels at n_fft 1024, whose filterbank is rank-deficient (126).
MEL = MelSettings()


pytestmark = pytest.mark.usefixtures("one_thread")


def harmonic_tone(f0: float = 440.0, seconds: float = 1.0, sample_rate: int = MEL.sample_rate) -> torch.Tensor:
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    return sum(a * torch.sin(2 * torch.pi * f0 * k * t) for k, a in ((1, 0.4), (2, 0.2), (3, 0.1)))


def test_round_trip_recovers_the_pitch_of_a_harmonic_tone_at_128_mels():
    wave = harmonic_tone(440.0)
    log_mel = LogMel(MEL)(wave)  # (128, T)
    out = GriffinLimVocoder(MEL, n_iter=32)(log_mel, length=wave.numel())
    assert out.shape == wave.shape and torch.isfinite(out).all()
    spectrum = torch.fft.rfft(out * torch.hann_window(out.numel())).abs()
    peak_hz = float(torch.fft.rfftfreq(out.numel(), 1 / MEL.sample_rate)[spectrum.argmax()])
    # 1 s of audio gives 1 Hz bins; Griffin-Lim's phase errors smear the peak by a bin or two.
    assert abs(peak_hz - 440.0) <= 5.0
    assert int(LogMel(MEL)(out).mean(-1).argmax()) == int(log_mel.mean(-1).argmax())
    # Loudness survives too: the inverted filterbank returns power on the input's scale.
    assert out.pow(2).mean().sqrt() == pytest.approx(float(wave.pow(2).mean().sqrt()), rel=0.2)


def test_cached_pseudo_inverse_equals_torchaudio_gelsd_solve():
    power = LogMel(MEL)(harmonic_tone(220.0, seconds=0.25)).exp() - MEL.log_floor
    reference = torchaudio.transforms.InverseMelScale(
        MEL.n_fft // 2 + 1, MEL.n_mels, MEL.sample_rate, MEL.f_min, MEL.f_max, mel_scale=MEL.mel_scale,
        driver="gelsd")(power)
    ours = GriffinLimVocoder(MEL).mel_to_linear(power.clamp_min(0).add(MEL.log_floor).log())
    assert torch.allclose(ours, reference, rtol=1e-3, atol=1e-6 * float(reference.max()))


def test_inversion_is_repeatable_and_leaves_the_global_generator_alone():
    log_mel = LogMel(MEL)(harmonic_tone(330.0, seconds=0.25))
    vocoder = GriffinLimVocoder(MEL, n_iter=4, seed=7)
    torch.manual_seed(0)
    first = vocoder(log_mel)
    after_first = torch.rand(1)
    torch.manual_seed(0)
    second = vocoder(log_mel)
    assert torch.equal(first, second)
    assert torch.equal(after_first, torch.rand(1))


def test_default_length_and_batches():
    log_mel = LogMel(MEL)(torch.stack([harmonic_tone(220.0, 0.2), harmonic_tone(440.0, 0.2)]))  # (2, 128, T)
    out = GriffinLimVocoder(MEL, n_iter=2)(log_mel)
    assert out.shape == (2, (log_mel.shape[-1] - 1) * MEL.hop_length)


def test_refuses_other_mel_bins_and_no_iterations():
    with pytest.raises(ValueError, match="expected"):
        GriffinLimVocoder(MEL)(torch.zeros(64, 10))
    with pytest.raises(ValueError, match="n_iter"):
        GriffinLimVocoder(MEL, n_iter=0)


def test_normalizer_inverse_undoes_the_training_normalisation():
    x = torch.randn(3, 1, 8, 4)
    normalizer = Normalizer(mean=-4.0, std=2.5)
    assert torch.allclose(normalizer.inverse(normalizer(x)), x, atol=1e-6)
    assert torch.equal(normalizer(x), (x - -4.0) / 2.5)  # tensors or floats: the same numbers on a CPU


def test_spectral_convergence_and_ceiling():
    wave = harmonic_tone(440.0, seconds=0.5)
    assert waveform_spectral_convergence(wave, wave, MEL) == 0.0
    assert waveform_spectral_convergence(torch.zeros_like(wave), wave, MEL) == pytest.approx(1.0)
    # A steady tone inverts well (real music measures 0.1-0.5 at these settings; see the README).
    ceiling = griffin_lim_ceiling(wave, MEL, n_iter=16)
    assert 0.0 < ceiling["in_band"] < 0.5 and 0.0 < ceiling["spectral_convergence"] < 0.5
    # Energy the mel filters cannot see (DC, with f_min 0) counts in the first number only.
    offset = wave + 0.5
    with_dc = griffin_lim_ceiling(offset, MEL, n_iter=16)
    assert with_dc["spectral_convergence"] > 0.5 > with_dc["in_band"]


def test_measure_ceiling_on_a_file(tmp_path):
    path = tmp_path / "tone.wav"
    sf.write(path, harmonic_tone(440.0, seconds=1.0, sample_rate=44100).numpy(), 44100)
    result = measure_ceiling(path, MEL, offset=0.25, seconds=0.5, griffin_lim_iters=8)
    assert result["seconds"] == pytest.approx(0.5)
    assert 0.0 < result["spectral_convergence"] < 1.0
    sf.write(tmp_path / "silence.wav", np.zeros(4410, dtype=np.float32), 44100)
    with pytest.raises(DataError, match="silent"):
        measure_ceiling(tmp_path / "silence.wav", MEL)


def test_a_long_piece_is_inverted_in_blocks_without_seams(monkeypatch):
    """Blocks of 200 frames overlapping by 32 (the defaults are 4096 and 128): each starts from the
    phase its predecessor found, so the crossfade at a seam does not cancel. Window by window the
    energy follows one inversion of the whole no worse at the seams than elsewhere; with a random
    start in every block it deviated by 5 dB there."""
    from musicvae.audio import vocoder
    from musicvae.audio.synth import render_piece

    wave = torch.from_numpy(render_piece(3, seconds=12.0, sample_rate=MEL.sample_rate))
    log_mel = LogMel(MEL)(wave)  # (128, 1034)
    whole = GriffinLimVocoder(MEL, n_iter=16)(log_mel, length=wave.numel())
    monkeypatch.setattr(vocoder, "GRIFFIN_LIM_BLOCK", 200)
    monkeypatch.setattr(vocoder, "GRIFFIN_LIM_OVERLAP", 32)
    blocks = GriffinLimVocoder(MEL, n_iter=16)(log_mel, length=wave.numel())
    assert blocks.shape == wave.shape and torch.isfinite(blocks).all()
    assert waveform_spectral_convergence(blocks, wave, MEL) <= waveform_spectral_convergence(whole, wave, MEL) + 0.01

    def energy_db(x):
        return 10 * torch.log10(x.unfold(0, 1024, 256).square().mean(-1) + 1e-8)  # windows of 4 frames, every frame

    deviation = (energy_db(blocks) - energy_db(whole)).abs()
    at_seams = torch.zeros_like(deviation, dtype=torch.bool)
    for seam in range(200, log_mel.shape[-1], 200):
        at_seams[seam - 2 : seam + 34] = True  # the crossfade: 16 frames from the seam, and the windows over it
    assert deviation[at_seams].max() <= deviation[~at_seams].max()
