"""Generation: whole-piece reconstruction without seams, prior samples, latent morphs, and the
messages of scripts/generate.py; all on the session's tiny trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import load_script
from helpers import run_command
from musicvae.audio.mel import MelSettings
from musicvae.data.segments import Normalizer
from musicvae.training.checkpoints import DATA_STATE_KEY
from musicvae.inference.generation import (GenerationModel, crossfade_concat, interpolate_files, interpolation_mels,
                                 latent_path, load_generation_model, load_log_mel, overlap_add, reconstruct_file,
                                 reconstruct_mel, sample_files, segment_at, segment_starts)
from musicvae.audio.vocoder import GriffinLimVocoder

REPO = Path(__file__).resolve().parents[2]


generate = load_script("generate")

#: Griffin-Lim iterations in tests: enough for the energy envelope, which is all they measure.
ITERS = 16
#: Energy windows of the seam measure: 1024 samples (4 mel frames) every hop of 256.
WINDOW, STEP = 1024, 256
#: A window-to-window energy change next to a segment boundary may exceed the largest change
#: elsewhere in the piece by at most this many dB. Hard cuts between segments measure 2-3 dB
#: above it (see test_seam_measure_detects_hard_cuts); Griffin-Lim's own phase noise is ~1.5 dB.
SEAM_TOLERANCE_DB = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tiny_run) -> Path:
    return tiny_run["ckpt_dir"] / "best.ckpt"


@pytest.fixture(scope="module")
def model(ckpt) -> GenerationModel:
    return load_generation_model(ckpt)


def tone(seconds: float, sample_rate: int = 22050, crescendo_db: float = 0.0) -> np.ndarray:
    """A harmonic tone on A3, rising by `crescendo_db` over its length."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = sum(a * np.sin(2 * np.pi * f * t) for f, a in ((220, 0.3), (440, 0.2), (660, 0.1), (1320, 0.05)))
    return (wave * 10 ** ((crescendo_db * (t / seconds - 1)) / 20)).astype(np.float32)


def boundary_jumps(wave: torch.Tensor, starts: list[int], frames: int) -> tuple[float, float]:
    """Largest window-to-window change of short-time energy (dB) next to segment boundaries, and elsewhere.

    A boundary at mel frame b (a segment starts or ends there) touches the energy windows b-4..b.
    The first and last four windows are left out: the piece starts and ends there.
    """
    energy = 10 * torch.log10(wave.unfold(0, WINDOW, STEP).pow(2).mean(1) + 1e-10)
    change = (energy[1:] - energy[:-1]).abs()
    near = torch.zeros(len(change), dtype=torch.bool)
    for b in sorted(set(starts[1:]) | {s + frames for s in starts[:-1]}):
        near[max(0, b - WINDOW // STEP) : b + 1] = True
    inner = torch.zeros(len(change), dtype=torch.bool)
    inner[4:-4] = True
    return float(change[near & inner].max()), float(change[~near & inner].max())


# --- pure functions -----------------------------------------------------------------------------

def test_segments_cover_the_piece_and_overlap_add_restores_it():
    assert segment_starts(10, 32, 16) == [0]
    assert segment_starts(100, 32, 16) == [0, 16, 32, 48, 64, 68]  # the last one ends at the end
    piece = torch.randn(8, 100)
    starts = segment_starts(100, 32, 16)
    segments = torch.stack([piece[:, s : s + 32] for s in starts])
    assert torch.allclose(overlap_add(segments, starts, 100), piece, atol=1e-5)


def test_latent_path_includes_both_ends_and_slerp_keeps_the_shell():
    a, b = torch.randn(16), torch.randn(16)
    for method in ("slerp", "linear"):
        path = latent_path(a, b, 5, method)
        assert path.shape == (5, 16) and torch.equal(path[0], a) and torch.equal(path[-1], b)
    unit_a, unit_b = a / a.norm(), b / b.norm()
    assert torch.allclose(latent_path(unit_a, unit_b, 7, "slerp").norm(dim=1), torch.ones(7), atol=1e-5)
    assert latent_path(unit_a, unit_b, 3, "linear")[1].norm() < 1.0  # the chord cuts inside the shell


def test_crossfade_concat_length():
    waves = [torch.ones(1000), torch.ones(1000), torch.ones(1000)]
    joined = crossfade_concat(waves, 100)
    assert joined.shape == (2800,) and torch.isfinite(joined).all()


# --- seams --------------------------------------------------------------------------------------

class _TimeBlur(torch.nn.Module):
    """A stand-in VAE that keeps each segment's spectrum but loses its time detail (each bin's
    mean over the segment), so consecutive segments of a crescendo decode to different levels."""

    def __init__(self, frames: int) -> None:
        super().__init__()
        self.frames = frames

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = x.mean(-1).flatten(1)  # (B, 1, n_mels, frames) -> (B, n_mels)
        return mu, torch.zeros_like(mu)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, None, :, None].expand(-1, 1, -1, self.frames)


class _Stub:
    def __init__(self, frames: int) -> None:
        self.vae, self.device = _TimeBlur(frames), torch.device("cpu")


def _blur_model() -> GenerationModel:
    return GenerationModel(_Stub(32), MelSettings(n_mels=32), 32, Normalizer(-3.0, 4.0))


def test_seam_measure_detects_hard_cuts(tmp_path):
    """The measure has teeth: segments simply placed end to end leave a step at every boundary."""
    model = _blur_model()
    sf.write(tmp_path / "rise.wav", tone(3.0, crescendo_db=60.0), 22050)
    log_mel, samples = load_log_mel(tmp_path / "rise.wav", model.mel)
    starts = segment_starts(log_mel.shape[-1], 32, 32)
    x = model.normalize(log_mel)
    decoded = model.decode_windows(model.encode_windows(torch.stack([x[:, s : s + 32] for s in starts])[:, None]))[:, 0]
    cut = x.clone()
    for start, segment in zip(starts, decoded):
        cut[:, start : start + 32] = segment
    wave = GriffinLimVocoder(model.mel, n_iter=ITERS)(model.denormalize(cut), length=samples)
    at_boundary, elsewhere = boundary_jumps(wave, starts, 32)
    assert at_boundary > elsewhere + SEAM_TOLERANCE_DB + 1.0


def test_overlap_add_leaves_no_seams_where_segments_differ(tmp_path):
    model = _blur_model()
    sf.write(tmp_path / "rise.wav", tone(3.0, crescendo_db=60.0), 22050)
    log_mel, samples = load_log_mel(tmp_path / "rise.wav", model.mel)
    wave = GriffinLimVocoder(model.mel, n_iter=ITERS)(reconstruct_mel(model, log_mel), length=samples)
    at_boundary, elsewhere = boundary_jumps(wave, segment_starts(log_mel.shape[-1], 32, 16), 32)
    assert at_boundary <= elsewhere + SEAM_TOLERANCE_DB


def test_reconstruct_file_of_several_segments(ckpt, model, tmp_path):
    source = tmp_path / "piece.wav"
    sf.write(source, tone(3.0, sample_rate=44100, crescendo_db=20.0), 44100)  # 259 frames: 16 segments
    result = reconstruct_file(ckpt, source, tmp_path / "out" / "piece.wav", griffin_lim_iters=ITERS)
    wave, rate = sf.read(result["wav"], dtype="float32")
    assert rate == 22050 and len(wave) == 66150  # the input's length at the model's rate
    assert np.isfinite(wave).all() and np.abs(wave).max() > 1e-3
    assert Path(result["png"]).stat().st_size > 0
    log_mel, _ = load_log_mel(source, model.mel)
    at_boundary, elsewhere = boundary_jumps(torch.from_numpy(wave), segment_starts(log_mel.shape[-1], 32, 16), 32)
    assert at_boundary <= elsewhere + SEAM_TOLERANCE_DB


def test_reconstruct_pads_a_piece_shorter_than_a_segment(model):
    log_mel = torch.randn(32, 10) - 4.0
    out = reconstruct_mel(model, log_mel)
    assert out.shape == (32, 10) and torch.isfinite(out).all()


# --- sampling and interpolation -----------------------------------------------------------------

def test_sample_writes_finite_nonsilent_files_repeatably(ckpt, tmp_path):
    first = sample_files(ckpt, tmp_path / "a", n=3, seed=5, griffin_lim_iters=ITERS)
    again = sample_files(ckpt, tmp_path / "b", n=3, seed=5, griffin_lim_iters=ITERS)
    assert len(first["wavs"]) == 3 and Path(first["png"]).is_file()
    for path, other in zip(first["wavs"], again["wavs"]):
        wave, rate = sf.read(path, dtype="float32")
        assert rate == 22050 and len(wave) == 31 * 256
        assert np.isfinite(wave).all() and np.sqrt(np.mean(wave**2)) > 1e-4
        assert np.array_equal(wave, sf.read(other, dtype="float32")[0])


def test_interpolation_ends_are_the_reconstructions_of_the_inputs(model):
    a, b = torch.randn(32, 32) - 4.0, torch.randn(32, 32) - 2.0
    mels = interpolation_mels(model, a, b, steps=5)
    assert mels.shape == (5, 32, 32)
    assert torch.allclose(mels[0], reconstruct_mel(model, a), atol=1e-5)
    assert torch.allclose(mels[-1], reconstruct_mel(model, b), atol=1e-5)
    assert not torch.allclose(mels[2], mels[0], atol=1e-3)  # the middle is on the way, not at an end


def test_interpolate_files(ckpt, tmp_path):
    sf.write(tmp_path / "a.wav", tone(1.0), 22050)
    np.save(tmp_path / "b.npy", np.random.default_rng(0).normal(-4, 2, (32, 100)).astype(np.float32))
    result = interpolate_files(ckpt, tmp_path / "a.wav", tmp_path / "b.npy", tmp_path / "morph", steps=4,
                               offset_b=0.5, griffin_lim_iters=ITERS)
    assert len(result["wavs"]) == 4 and Path(result["png"]).is_file()
    assert result["offsets"][1] == pytest.approx(43 / (22050 / 256))
    for path in result["wavs"]:
        wave, _ = sf.read(path, dtype="float32")
        assert np.isfinite(wave).all() and np.sqrt(np.mean(wave**2)) > 1e-4
    morph, _ = sf.read(result["morph"], dtype="float32")
    assert len(morph) == 4 * 31 * 256 - 3 * int(0.05 * 22050)


def test_segment_at_moves_a_late_offset_back_and_refuses_one_past_the_end():
    mel = MelSettings(n_mels=32)
    log_mel = torch.randn(32, 100)
    segment, used = segment_at(log_mel, 1.0, 32, mel, "x")  # 86 frames in: moved back to 68
    assert torch.equal(segment, log_mel[:, 68:100]) and used == pytest.approx(68 / mel.frames_per_second)
    with pytest.raises(Exception, match="outside the recording"):
        segment_at(log_mel, 2.0, 32, mel, "x")


# --- the script's messages ----------------------------------------------------------------------

def _error(capsys, argv: list[str]) -> str:
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("musicvae generate: error: ") and "Traceback" not in err
    return err


def test_script_errors_are_messages(ckpt, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not audio")
    (tmp_path / "bad.wav").write_bytes(b"RIFF garbage")
    sf.write(tmp_path / "silent.wav", np.zeros(22050, dtype=np.float32), 22050)
    out = ["--out", str(tmp_path / "o.wav"), "--griffin_lim_iters", "2"]
    assert "no such checkpoint" in _error(capsys, ["reconstruct", "--ckpt_path", str(tmp_path / "no.ckpt"),
                                                   str(tmp_path / "silent.wav"), *out])
    assert "unknown file type" in _error(capsys, ["reconstruct", "--ckpt_path", str(ckpt), str(tmp_path / "notes.txt"), *out])
    assert "cannot decode" in _error(capsys, ["reconstruct", "--ckpt_path", str(ckpt), str(tmp_path / "bad.wav"), *out])
    assert "silent" in _error(capsys, ["reconstruct", "--ckpt_path", str(ckpt), str(tmp_path / "silent.wav"), *out])
    sf.write(tmp_path / "tone.wav", tone(0.5), 22050)
    assert "--hop 64: must be 1..32" in _error(capsys, ["reconstruct", "--ckpt_path", str(ckpt), str(tmp_path / "tone.wav"),
                                                         "--hop", "64", *out])
    assert not (tmp_path / "o.wav").exists()
    assert "file not found" in _error(capsys, ["interpolate", "--ckpt_path", str(ckpt), str(tmp_path / "x.wav"),
                                               str(tmp_path / "silent.wav"), "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()  # nothing is written when an input is bad
    assert "CUDA" in _error(capsys, ["sample", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "s"), "--device",
                                     "cuda"]) or torch.cuda.is_available()


def test_script_refuses_a_checkpoint_without_mel_settings(ckpt, tmp_path, capsys):
    stripped = torch.load(ckpt, map_location="cpu", weights_only=True)
    del stripped[DATA_STATE_KEY]["mel"]
    torch.save(stripped, tmp_path / "old.ckpt")
    err = _error(capsys, ["sample", "--ckpt_path", str(tmp_path / "old.ckpt"), "--out", str(tmp_path / "s")])
    assert "lacks ['mel']" in err


@pytest.mark.slow
def test_generate_script_end_to_end(ckpt, tmp_path):
    sf.write(tmp_path / "in.wav", tone(1.0), 22050)
    run = run_command("generate", ["reconstruct", "--ckpt_path", str(ckpt), str(tmp_path / "in.wav"),
                                   "--out", str(tmp_path / "out.wav"), "--griffin_lim_iters", "4"])
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out.wav").is_file() and (tmp_path / "out.png").is_file()
    assert "reconstructed 1.00 s" in run.stdout


def test_generate_reads_a_recording_as_the_cache_does(tmp_path):
    """load_log_mel (generate) and the cache (prepare, training, evaluate, predict) share the block-wise
    front end: the same array, and the length of the recording at the model's rate."""
    from musicvae.data.cache import build_audio_cache

    rate, samples = 44100, 44100 * 20 + 5
    t = np.arange(samples) / rate
    stereo = np.stack([np.sin(2 * np.pi * 330 * t), 0.5 * np.sin(2 * np.pi * 495 * t)], axis=1)
    (tmp_path / "music").mkdir()
    sf.write(tmp_path / "music" / "song.flac", 0.3 * stereo, rate)
    mel = MelSettings(n_mels=64)
    log_mel, length = load_log_mel(tmp_path / "music" / "song.flac", mel)
    [entry] = build_audio_cache(tmp_path / "music", tmp_path / "cache", mel).entries
    np.testing.assert_array_equal(np.load(entry.array), log_mel.numpy())
    assert length == -(-samples * mel.sample_rate // rate)
