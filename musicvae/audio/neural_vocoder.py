"""An optional neural vocoder: Vocos (Siuzdak 2023, arXiv:2306.00814) from a local download.

Vocos' mel model (`charactr/vocos-mel-24khz`) is a `config.yaml` and a `pytorch_model.bin`. The
config is checked before vocos builds from it (vocos imports whatever class path a config names,
so only its own three classes are let through), the weights load with `weights_only=True`, and
nothing is ever downloaded: the user fetches the two files once (docs/vocoder.md).

The vocoder plays only the features it was trained on: `vocos_mel_settings` turns its feature
extractor's settings into musicvae's MelSettings (the preset `VOCOS_MEL_24KHZ` is the model's),
and `check_features` refuses a checkpoint trained on any other, naming what differs.
`VocosVocoder` has GriffinLimVocoder's interface, so `make_vocoder` hands either to its callers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch import Tensor, nn

from musicvae.audio.mel_settings import MelSettings
from musicvae.audio.vocoder import GriffinLimVocoder
from musicvae.errors import CheckpointError, ConfigError
from musicvae.io.safe_load import load_weights_only, safe_yaml_load

#: The two files of a Vocos model, as its Hugging Face repository names them.
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "pytorch_model.bin"
#: The one mel feature extractor musicvae can reproduce, and the backbone and head it is paired with.
MEL_FEATURES = "vocos.feature_extractors.MelSpectrogramFeatures"
ALLOWED_CLASSES = {"feature_extractor": (MEL_FEATURES,), "backbone": ("vocos.models.VocosBackbone",),
                   "head": ("vocos.heads.ISTFTHead",)}
#: Where users get the weights (docs/vocoder.md); named in every message about missing files.
HOW_TO_GET = ("download config.yaml and pytorch_model.bin of charactr/vocos-mel-24khz into one folder "
              "(docs/vocoder.md)")
INSTALL_HINT = "the neural vocoder needs the optional package vocos: pip install 'musicvae[vocoder]'"


def vocos_mel_settings(init_args: dict[str, Any]) -> MelSettings:
    """The MelSettings that reproduce vocos' `MelSpectrogramFeatures(**init_args)` exactly.

    vocos builds torchaudio's MelSpectrogram with its defaults (Hann window of n_fft, centred
    frames padded by reflection, HTK filterbank from 0 Hz to Nyquist without normalisation) and
    power 1 (magnitude), then takes `log(clip(x, min=1e-7))`: LogMel does the same with these
    settings (tests/audio/test_neural_vocoder.py compares the two on the same audio).

    Args:
        init_args: the `feature_extractor.init_args` of a Vocos config (vocos' defaults fill the rest).

    Raises:
        ConfigError: "same" padding (frames that LogMel does not make).
    """
    args = {"sample_rate": 24000, "n_fft": 1024, "hop_length": 256, "n_mels": 100, "padding": "center", **init_args}
    if args["padding"] != "center":
        raise ConfigError(f"the vocoder's features use padding={args['padding']!r}; musicvae's log-mels are "
                          "centred (padding 'center'), as vocos-mel-24khz's are")
    try:
        sizes = {name: int(args[name]) for name in ("sample_rate", "n_fft", "hop_length", "n_mels")}
    except (TypeError, ValueError):
        raise ConfigError(f"the vocoder's feature settings are not whole numbers: {init_args}") from None
    return MelSettings(**sizes, f_min=0.0, f_max=None, mel_scale="htk", power=1.0, log_floor=1e-7)


#: The features of charactr/vocos-mel-24khz: 24 kHz, n_fft 1024, hop 256, 100 HTK mels, magnitude, floor 1e-7.
VOCOS_MEL_24KHZ = vocos_mel_settings({})


def check_features(trained: MelSettings, vocoder: MelSettings, source: str = "the checkpoint") -> None:
    """Refuse to play log-mels made with other settings than the vocoder's own.

    Raises:
        ConfigError: naming each differing setting and how to train with the vocoder's.
    """
    differences = trained.differences(vocoder)
    if differences:
        listed = ", ".join(f"{name} {ours!r} (vocoder: {theirs!r})" for name, (ours, theirs) in differences.items())
        raise ConfigError(
            f"{source} was trained on other mel settings than the vocoder's: {listed}. A neural vocoder plays only "
            "the features it was trained on: train with them (`musicvae fit --config configs/vocos.yaml`, "
            "docs/vocoder.md), or play it with Griffin-Lim (no vocoder given)")


def vocos_files(path: str | os.PathLike, weights: Optional[str | os.PathLike] = None) -> tuple[Path, Path]:
    """(config.yaml, pytorch_model.bin) of a Vocos download.

    Args:
        path: the folder holding both files, or the config file itself.
        weights: the weights file; default `pytorch_model.bin` beside the config.

    Raises:
        ConfigError: a file that is not there, named, with how to get it.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{path}: no such folder or file (the vocoder); {HOW_TO_GET}")
    config = path / CONFIG_FILE if path.is_dir() else path
    weights = Path(weights).expanduser() if weights is not None else config.parent / WEIGHTS_FILE
    for name, file in (("config", config), ("weights", weights)):
        if not file.is_file():
            raise ConfigError(f"{file}: no such file (the vocoder's {name}); {HOW_TO_GET}")
    return config, weights


def read_vocos_config(path: Path) -> dict[str, Any]:
    """A Vocos config.yaml, checked to name only the classes of a mel Vocos.

    vocos builds a model by importing each `class_path` of the config and calling it with its
    `init_args`: a config naming any other callable would run it, so nothing else gets that far.

    Raises:
        ConfigError: unreadable, not a Vocos config, or a vocoder of other features (EnCodec tokens).
    """
    try:
        config = safe_yaml_load(path.read_text(), str(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the vocoder's config ({type(err).__name__}); "
                          f"{HOW_TO_GET}") from None
    parts = config if isinstance(config, dict) else {}
    for part, allowed in ALLOWED_CLASSES.items():
        entry = parts.get(part)
        class_path = entry.get("class_path") if isinstance(entry, dict) else None
        if class_path not in allowed:
            what = ("an EnCodec-token vocoder" if part == "feature_extractor" and class_path and "Encodec" in class_path
                    else f"{part}.class_path {class_path!r}")
            raise ConfigError(f"{path}: not a Vocos mel vocoder config ({what}; expected "
                              f"{part}.class_path {allowed[0]}); {HOW_TO_GET}")
        if not isinstance(entry.get("init_args", {}), dict):
            raise ConfigError(f"{path}: {part}.init_args is not a mapping; {HOW_TO_GET}")
    return parts


def load_vocos_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict saved with torch.save into `model`, unpickling tensors only.

    Raises:
        CheckpointError: missing, truncated or corrupt, not a state dict, or weights of another model.
    """
    state = load_weights_only(path, "weights file", HOW_TO_GET)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict; {HOW_TO_GET}")
    result = model.load_state_dict(state, strict=False)
    problems = [f"{len(keys)} {kind} (e.g. {keys[0]})" for kind, keys in
                (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
    if problems:
        raise CheckpointError(f"{path}: the weights do not fit the model config.yaml describes: "
                              f"{', '.join(problems)} tensors; use the two files of the same download")


def _build_vocos(config_path: Path) -> nn.Module:
    try:
        from vocos import Vocos  # optional: only a run that asks for the vocoder needs it
    except ImportError as err:
        raise ConfigError(f"{INSTALL_HINT} ({err})") from None
    try:
        return Vocos.from_hparams(str(config_path))
    except (TypeError, ValueError, KeyError, RuntimeError) as err:  # init_args the classes refuse
        raise ConfigError(f"{config_path}: vocos cannot build this config ({type(err).__name__}: "
                          f"{err}); {HOW_TO_GET}") from None


class VocosVocoder(nn.Module):
    """Natural-log mel magnitude (..., n_mels, T) -> waveform (..., samples) at `mel.sample_rate`, by Vocos.

    Args:
        vocos: a `vocos.Vocos` with its weights loaded.
        mel: the features it was trained on (`vocos_mel_settings` of its config).
    """

    def __init__(self, vocos: nn.Module, mel: MelSettings) -> None:
        super().__init__()
        self.vocos, self.mel = vocos.eval(), mel

    def forward(self, log_mel: Tensor, length: Optional[int] = None) -> Tensor:
        """Synthesise audio from log-mels.

        Args:
            log_mel: (..., n_mels, T) natural-log mel magnitude (denormalised: Normalizer.inverse).
            length: samples of the result (cut or zero-padded); default (T - 1) * hop_length, the
                length Griffin-Lim gives, whose centred STFT has T frames.

        Returns:
            (..., samples) float32 waveform at `mel.sample_rate`.
        """
        if log_mel.dim() < 2 or log_mel.shape[-2] != self.mel.n_mels:
            raise ValueError(f"expected (..., {self.mel.n_mels}, T) log-mels, got {tuple(log_mel.shape)}")
        frames = log_mel.shape[-1]
        flat = log_mel.float().reshape(-1, self.mel.n_mels, frames)  # (..., n_mels, T) -> (B, n_mels, T)
        wave = self.vocos.decode(flat)  # (B, n_mels, T) -> (B, samples): (T - 1) * hop with centred frames
        length = (frames - 1) * self.mel.hop_length if length is None else int(length)
        wave = wave[..., :length] if wave.shape[-1] >= length else nn.functional.pad(wave, (0, length - wave.shape[-1]))
        return wave.reshape(log_mel.shape[:-2] + (length,))


def load_vocos(path: str | os.PathLike, weights: Optional[str | os.PathLike] = None,
               device: str | torch.device = "cpu", features: Optional[MelSettings] = None,
               source: str = "the checkpoint") -> VocosVocoder:
    """A Vocos mel vocoder from a local download, in eval mode on `device`.

    Args:
        path: the folder holding config.yaml and pytorch_model.bin, or the config file.
        weights: the weights file, when it is not `pytorch_model.bin` beside the config.
        device: where it runs.
        features: the mel settings it will be given (`check_features`, before the weights load).
        source: what `features` belong to, for that message.

    Raises:
        ConfigError: a missing file, a config that is not a mel Vocos, features it was not
            trained on, or vocos not installed.
        CheckpointError: weights that are corrupt or do not fit the config.
    """
    config_path, weights_path = vocos_files(path, weights)
    config = read_vocos_config(config_path)
    mel = vocos_mel_settings(config["feature_extractor"].get("init_args", {}))
    channels = config["backbone"].get("init_args", {}).get("input_channels")
    if channels != mel.n_mels:
        raise ConfigError(f"{config_path}: the backbone takes {channels} channels but the features "
                          f"have {mel.n_mels} mels; {HOW_TO_GET}")
    if features is not None:
        check_features(features, mel, source)
    model = _build_vocos(config_path)
    load_vocos_weights(model, weights_path)
    return VocosVocoder(model, mel).to(device)


def make_vocoder(mel: MelSettings, griffin_lim_iters: int = 64, vocoder: Optional[str | os.PathLike] = None,
                 vocoder_weights: Optional[str | os.PathLike] = None, device: str | torch.device = "cpu",
                 source: str = "the checkpoint") -> nn.Module:
    """The vocoder that turns log-mels made with `mel` into audio: Griffin-Lim, or Vocos when `vocoder` is given.

    Args:
        mel: the settings the log-mels were made with (a checkpoint's).
        griffin_lim_iters: Griffin-Lim iterations (without `vocoder`).
        vocoder: a Vocos download (see `load_vocos`); None for Griffin-Lim.
        vocoder_weights: its weights file, when not beside its config.
        device: where it runs.
        source: what `mel` belongs to, for the message when the vocoder's features differ.

    Raises:
        ConfigError: see `load_vocos`, and `check_features` when the vocoder cannot play `mel`.
        CheckpointError: see `load_vocos`.
    """
    if vocoder is None:
        return GriffinLimVocoder(mel, n_iter=griffin_lim_iters).to(device)
    return load_vocos(vocoder, vocoder_weights, device, features=mel, source=source)
