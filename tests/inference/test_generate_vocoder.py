"""`musicvae generate ... --vocoder DIR`: a run trained with configs/vocos.yaml, played by a Vocos
download (the real vocos-mel-24khz architecture, random weights: tests/conftest.py), end to end
through the command; a checkpoint of other features is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, TINY_FLAGS, load_script

generate = load_script("generate")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def vocos_run(tmp_path_factory, vocos_download) -> Path:
    """A tiny conv1d model trained 2 epochs on the vocos-mel-24khz features, through the real CLI,
    its TensorBoard clips played by the Vocos download."""
    from musicvae.training.cli import cli_main

    root = tmp_path_factory.mktemp("vocos_run")
    at = TINY_FLAGS.index("--data.mel.n_mels")
    flags = TINY_FLAGS[:at] + TINY_FLAGS[at + 2 :]  # the preset's 100 mels, not the tiny 32
    cli_main(["fit", "--config", str(REPO / "configs" / "vocos.yaml"), *flags, "--data.cache_dir", str(root / "cache"),
              "--checkpoint_dir", str(root / "ckpt"), "--trainer.logger.init_args.save_dir", str(root / "logs"),
              "--media.vocoder", str(vocos_download), "--media.audio_every_n_epochs", "1", "--media.n_audio_clips", "1"])
    return root / "ckpt" / "best.ckpt"


def test_the_runs_tensorboard_clips_are_played_by_the_media_vocoder(vocos_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((vocos_run.parents[1] / "logs" / "musicvae").iterdir())), size_guidance={"audio": 0})
    events.Reload()
    clips = [e for tag in events.Tags()["audio"] for e in events.Audio(tag)]
    assert {e.sample_rate for e in clips} == {24000} and len(clips) >= 2 * 2  # input + reconstruction(s), 2 epochs


def note(seconds: float, sample_rate: int) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 660 * t)).astype(np.float32)


def test_generate_plays_a_vocos_run_through_the_vocoder(vocos_run, vocos_download, tmp_path, capsys):
    sf.write(tmp_path / "in.wav", note(1.5, 44100), 44100)  # any rate: read at the run's 24 kHz
    assert generate.main(["reconstruct", "--ckpt_path", str(vocos_run), str(tmp_path / "in.wav"),
                          "--out", str(tmp_path / "out.wav"), "--vocoder", str(vocos_download)]) == 0
    assert "reconstructed 1.50 s" in capsys.readouterr().out
    wave, rate = sf.read(tmp_path / "out.wav", dtype="float32")
    assert rate == 24000 and len(wave) == 36000  # the input's length at the vocoder's rate
    assert np.isfinite(wave).all() and np.abs(wave).max() > 0 and (tmp_path / "out.png").is_file()

    # The two files given apart, for sample: one (frames - 1) * hop clip per draw.
    assert generate.main(["sample", "--ckpt_path", str(vocos_run), "-n", "2", "--seed", "0", "--out",
                          str(tmp_path / "s"), "--vocoder", str(vocos_download / "config.yaml"),
                          "--vocoder_weights", str(vocos_download / "pytorch_model.bin")]) == 0
    for i in range(2):
        wave, rate = sf.read(tmp_path / "s" / f"sample_{i:02d}.wav", dtype="float32")
        assert rate == 24000 and len(wave) == 31 * 256 and np.isfinite(wave).all()

    sf.write(tmp_path / "b.wav", note(1.0, 24000)[::-1].copy(), 24000)
    assert generate.main(["interpolate", "--ckpt_path", str(vocos_run), str(tmp_path / "in.wav"), str(tmp_path / "b.wav"),
                          "--steps", "3", "--out", str(tmp_path / "m"), "--vocoder", str(vocos_download)]) == 0
    morph, rate = sf.read(tmp_path / "m" / "morph.wav", dtype="float32")
    assert rate == 24000 and len(morph) == 3 * 31 * 256 - 2 * int(0.05 * 24000)


def test_generate_refuses_a_vocoder_of_other_features_in_one_line(tiny_run, vocos_download, tmp_path, capsys):
    ckpt = tiny_run["ckpt_dir"] / "best.ckpt"  # 32 mels at 22050 Hz, power 2
    assert generate.main(["sample", "--ckpt_path", str(ckpt), "-n", "1", "--out", str(tmp_path / "s"),
                          "--vocoder", str(vocos_download)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"musicvae generate: error: {ckpt} was trained on other mel settings than the vocoder's: ")
    assert "n_mels 32 (vocoder: 100)" in err and "configs/vocos.yaml" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()  # refused before anything is written


def test_generate_names_a_missing_download(vocos_run, tmp_path, capsys):
    assert generate.main(["sample", "--ckpt_path", str(vocos_run), "--out", str(tmp_path / "s"),
                          "--vocoder", str(tmp_path / "vocos-mel-24khz")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'vocos-mel-24khz'}: no such folder or file" in err and "charactr/vocos-mel-24khz" in err


def test_ceiling_measures_the_vocoder_on_its_own_features(vocos_download, tmp_path, capsys):
    sf.write(tmp_path / "in.wav", note(1.0, 22050), 22050)
    assert generate.main(["ceiling", str(tmp_path / "in.wav"), "--vocoder", str(vocos_download)]) == 0
    out = capsys.readouterr().out
    # Random weights: the number means nothing, only that the vocoder and its features were measured.
    assert out.startswith(f"Vocos ({vocos_download}) ceiling on ") and "100 mels, n_fft 1024, hop 256" in out
