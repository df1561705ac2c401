"""The optional Vocos vocoder: the preset reproduces vocos' own features, a download loads safely
(or is refused in one line), and it plays through the vocoder interface and MediaLogger. Every
vocoder here is the real vocos-mel-24khz architecture with random weights (tests/conftest.py)."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, VOCOS_CONFIG, write_vocos_download
from musicvae.audio.mel import LogMel, MelSettings, mono_to_log_mel
from musicvae.audio.neural_vocoder import (VOCOS_MEL_24KHZ, VocosVocoder, check_features, load_vocos, make_vocoder,
                                           vocos_mel_settings)
from musicvae.audio.vocoder import GriffinLimVocoder
from musicvae.data.segments import Normalizer
from musicvae.errors import CheckpointError, ConfigError
from musicvae.training.media import MediaLogger


def music(seconds: float = 1.5, sample_rate: int = 24000, seed: int = 0) -> np.ndarray:
    """Harmonic notes with a noisy attack and a stretch of digital silence (the log floor's case)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = sum(0.2 / k * np.sin(2 * np.pi * 196.0 * k * t + rng.uniform(0, 6.3)) for k in range(1, 8))
    wave = wave * np.exp(-3 * (t % 0.5)) + 0.02 * rng.standard_normal(t.size) * (t % 0.5 < 0.02)
    wave[int(0.6 * sample_rate) : int(0.9 * sample_rate)] = 0.0
    return wave.astype(np.float32)


@pytest.fixture(scope="module")
def vocoder(vocos_download) -> VocosVocoder:
    return load_vocos(vocos_download)


# --- the preset ---------------------------------------------------------------------------------

def test_the_preset_makes_vocos_own_features():
    from vocos.feature_extractors import MelSpectrogramFeatures

    wave = torch.from_numpy(np.stack([music(seed=0), music(seed=1)]))
    theirs = MelSpectrogramFeatures(**yaml.safe_load(VOCOS_CONFIG)["feature_extractor"]["init_args"])(wave)
    ours = LogMel(VOCOS_MEL_24KHZ)(wave)
    assert ours.shape == theirs.shape == (2, 100, 1 + wave.shape[-1] // 256)
    assert float((ours - theirs).abs().max()) <= 1e-4
    assert float(ours.min()) == pytest.approx(np.log(1e-7))  # the silence reached the floor in both
    # The path training and generation take from a decoded recording (resampling is a no-op at 24 kHz).
    assert np.abs(mono_to_log_mel(music(seed=0), 24000, VOCOS_MEL_24KHZ) - theirs[0].numpy()).max() <= 1e-4


def test_the_recipe_trains_on_the_preset_with_a_network_that_takes_100_mels():
    recipe = yaml.safe_load((REPO / "configs" / "vocos.yaml").read_text())
    assert MelSettings.from_dict(recipe["data"]["mel"]) == VOCOS_MEL_24KHZ
    assert recipe["model"]["architecture"] == "conv1d"


def test_the_default_2d_network_refuses_100_mels_naming_what_takes_them():
    from musicvae.training.module import MusicVAEModule

    with pytest.raises(ConfigError) as info:
        MusicVAEModule(n_mels=100, frames=32)
    for needle in ("n_mels=100", "not divisible by 16", "at most 2: channels=[32, 64]", "conv1d", "data.mel.n_mels"):
        assert needle in str(info.value)


def test_same_padding_features_are_not_taken_for_musicvae_s():
    with pytest.raises(ConfigError, match="padding='same'.*centred"):
        vocos_mel_settings({"padding": "same"})


# --- playing ------------------------------------------------------------------------------------

def test_the_vocoder_keeps_the_interface_and_griffin_lim_s_lengths(vocoder):
    log_mel = torch.from_numpy(mono_to_log_mel(music(), 24000, VOCOS_MEL_24KHZ))  # (100, T)
    frames = log_mel.shape[-1]
    one = vocoder(log_mel)
    assert one.shape == GriffinLimVocoder(VOCOS_MEL_24KHZ, n_iter=1)(log_mel).shape == ((frames - 1) * 256,)
    assert one.dtype == torch.float32 and torch.isfinite(one).all() and one.abs().max() > 0
    batch = vocoder(torch.stack([log_mel, log_mel]), length=36000)
    assert batch.shape == (2, 36000)
    assert torch.allclose(batch[0, : one.shape[-1]], one, atol=1e-5)  # batched = one at a time, and repeatable
    assert vocoder(log_mel, length=frames * 256 + 100)[-100:].eq(0).all()  # padded past what it synthesises
    with pytest.raises(ValueError, match="expected \\(..., 100, T\\)"):
        vocoder(log_mel[:64])


def test_a_folder_a_config_file_or_two_paths(vocos_download, tmp_path, vocoder):
    elsewhere = tmp_path / "weights.bin"
    elsewhere.symlink_to(vocos_download / "pytorch_model.bin")
    x = torch.randn(100, 20)
    for loaded in (load_vocos(vocos_download / "config.yaml"), load_vocos(vocos_download / "config.yaml", elsewhere)):
        assert loaded.mel == VOCOS_MEL_24KHZ
        assert torch.equal(loaded(x), vocoder(x))


def test_make_vocoder_is_griffin_lim_unless_a_vocoder_is_given(vocos_download):
    assert isinstance(make_vocoder(MelSettings(n_mels=16), 4), GriffinLimVocoder)
    assert isinstance(make_vocoder(VOCOS_MEL_24KHZ, 4, vocos_download), VocosVocoder)


def test_a_checkpoint_of_other_features_is_refused_naming_each_difference(vocos_download):
    with pytest.raises(ConfigError) as info:
        make_vocoder(MelSettings(n_mels=32), vocoder=vocos_download, source="run/best.ckpt")
    message = str(info.value)
    for needle in ("run/best.ckpt was trained on other mel settings", "sample_rate 22050 (vocoder: 24000)",
                   "n_mels 32 (vocoder: 100)", "power 2.0 (vocoder: 1.0)", "log_floor 1e-05 (vocoder: 1e-07)",
                   "configs/vocos.yaml"):
        assert needle in message
    assert "n_fft" not in message  # only what differs
    check_features(VOCOS_MEL_24KHZ, VOCOS_MEL_24KHZ)  # the preset itself passes


# --- refusals, one line each --------------------------------------------------------------------

def test_missing_files_name_the_file_and_where_to_get_it(vocos_download, tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nowhere'}: no such folder or file.*charactr/vocos-mel-24khz"):
        load_vocos(tmp_path / "nowhere")
    (tmp_path / "only_config").mkdir()
    (tmp_path / "only_config" / "config.yaml").write_text(VOCOS_CONFIG)
    with pytest.raises(ConfigError, match="pytorch_model.bin: no such file \\(the vocoder's weights\\).*docs/vocoder.md"):
        load_vocos(tmp_path / "only_config")
    with pytest.raises(ConfigError, match="config.yaml: no such file \\(the vocoder's config\\)"):
        load_vocos(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "text", "pickled object"])
def test_corrupt_weights_are_refused_without_unpickling_anything(vocos_download, tmp_path, damage):
    folder = tmp_path / "download"
    folder.mkdir()
    (folder / "config.yaml").write_text(VOCOS_CONFIG)
    weights = folder / "pytorch_model.bin"
    if damage == "truncated":
        weights.write_bytes((vocos_download / "pytorch_model.bin").read_bytes()[:1 << 20])
    elif damage == "text":
        weights.write_text("<html>404 Not Found</html>")
    else:  # what weights_only=True exists for: loading this must not call print
        weights.write_bytes(pickle.dumps(SimpleNamespace(run=print), protocol=2))
    expected = "refused: the file contains Python objects.*SimpleNamespace" if damage == "pickled object" else "not a readable weights file"
    with pytest.raises(CheckpointError, match=f"{weights}: {expected}.*charactr"):
        load_vocos(folder)


def test_weights_of_another_model_are_refused(vocos_download, tmp_path):
    small = write_vocos_download(tmp_path / "small", VOCOS_CONFIG.replace("num_layers: 8", "num_layers: 2"))
    with pytest.raises(CheckpointError, match="do not fit the model config.yaml describes: .*unexpected"):
        load_vocos(small / "config.yaml", vocos_download / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="do not fit the model config.yaml describes: .*missing"):
        load_vocos(vocos_download / "config.yaml", small / "pytorch_model.bin")


@pytest.mark.parametrize("config, needle", [
    (VOCOS_CONFIG.replace("vocos.heads.ISTFTHead", "subprocess.Popen"), "head.class_path 'subprocess.Popen'"),
    (VOCOS_CONFIG.replace("vocos.feature_extractors.MelSpectrogramFeatures", "vocos.feature_extractors.EncodecFeatures"),
     "an EnCodec-token vocoder"),
    ("just text", "not a Vocos mel vocoder config"),
    ("backbone: [unclosed", "cannot read the vocoder's config"),
    (VOCOS_CONFIG.replace("input_channels: 100", "input_channels: 80"), "backbone takes 80 channels"),
])
def test_configs_other_than_a_mel_vocos_are_refused_before_anything_is_built(tmp_path, config, needle):
    (tmp_path / "config.yaml").write_text(config)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=needle):
        load_vocos(tmp_path)


# --- TensorBoard clips --------------------------------------------------------------------------

def _media_run(mel: MelSettings) -> SimpleNamespace:
    return SimpleNamespace(datamodule=SimpleNamespace(mel=mel, normalizer=Normalizer(-4.0, 2.0)), loggers=[])


def _media_logger(vocoder_path) -> MediaLogger:
    return MediaLogger(griffin_lim_iters=2, n_audio_clips=1, audio_every_n_epochs=1, vocoder=vocoder_path)


def test_media_clips_play_through_the_run_s_vocoder(vocos_download):
    trainer = _media_run(VOCOS_MEL_24KHZ)
    logger = _media_logger(str(vocos_download))
    logger.setup(trainer, None, "fit")
    inputs = torch.randn(2, 1, 100, 32)
    clips = logger._clips(trainer.datamodule, inputs, inputs + 0.1, "val")
    assert set(clips) == {"val/audio/0_input", "val/audio/0_reconstruction"}
    for wave, rate in clips.values():
        assert rate == 24000 and wave.shape == (31 * 256,) and torch.isfinite(wave).all()
    assert [type(v) for v in logger._vocoders.values()] == [VocosVocoder]  # loaded once, at setup
    # Without the setting: Griffin-Lim.
    logger = _media_logger(None)
    logger._clips(trainer.datamodule, inputs, inputs, "val")
    assert [type(v) for v in logger._vocoders.values()] == [GriffinLimVocoder]


def test_a_run_whose_features_the_media_vocoder_cannot_play_stops_before_training(vocos_download):
    with pytest.raises(ConfigError, match="this run was trained on other mel settings"):
        _media_logger(str(vocos_download)).setup(_media_run(MelSettings(n_mels=32)), None, "fit")
