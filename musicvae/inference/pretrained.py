"""A trained model as a Hugging Face folder: `model.safetensors`, `config.json` and a model card `README.md`.

Saving, pushing and loading come from huggingface_hub's PyTorchModelHubMixin, through the small
class `PretrainedVAE`, with two of the mixin's defaults replaced: it writes into config.json only
the init arguments it can serialise and silently drops the rest, and it loads weights with
strict=False. Here the one init argument is a JSON dict written whole, and loading is strict.

A folder or Hub repository is a file a user was handed, like a checkpoint, so its config.json is
data (musicvae/training/stored_config.py): known keys and plain values only, mel settings within
bounds, and the model it describes built on the meta device and compared with the shapes in the
safetensors header before any memory is allocated. The weights themselves are plain tensors
(safetensors holds no code). Only the network's settings are stored (`NETWORK_KEYS`): training
options do not change what the weights compute, and a saved model stays loadable when they change.
A learned prior (musicvae/inference/priors.py) travels as config.json's `prior` section and the
buffers `prior.*`, checked the same way.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin, hf_hub_download
from torch import nn

import musicvae
from musicvae.audio.mel import MelSettings
from musicvae.data.segments import Normalizer
from musicvae.errors import CheckpointError
from musicvae.inference.card import CARD_TEMPLATE, card_fields
from musicvae.inference.generation import GenerationModel
from musicvae.inference.loading import resolve_alpha
from musicvae.inference.priors import check_prior_shapes, check_prior_values, checked_section, config_section, \
    unfitted_prior
from musicvae.training.module import MusicVAEModule
from musicvae.training.stored_config import check_mel_bounds, check_model_shapes, is_plain

FORMAT = "musicvae-pretrained-1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)
#: A config.json is a few kilobytes; a larger one is not read (it would be parsed whole into memory).
MAX_CONFIG_BYTES = 1 << 20
#: MusicVAEModule's settings that decide its weights' shapes and what they compute; the rest are training options.
NETWORK_KEYS = ("n_mels", "frames", "latent_dim", "channels", "blocks_per_stage", "dropout", "architecture",
                "linear_path", "nonlinear_init_scale", "linear_path_components", "freq_bands")
_SECTIONS = ("format", "musicvae_version", "model", "mel", "frames", "normalization", "compensation", "prior",
             "training")


def _number(value: Any, source: str, key: str, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise CheckpointError(f"{source}: {key} {value!r} must be a finite number in [{low:g}, {high:g}]")
    return float(value)


def checked_config(config: Any, source: str | os.PathLike) -> dict[str, Any]:
    """A config.json's contents validated as data, before anything is built from them.

    Raises:
        CheckpointError: naming `source`: not this format, an unknown section or network setting, a
            value that is not plain, mel settings out of bounds or not matching the network, or
            normalisation, compensation or prior settings out of range.
    """
    source = str(source)
    if not isinstance(config, Mapping) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, Mapping) else type(config).__name__
        raise CheckpointError(f"{source}: not a musicvae model folder (format {found!r}, expected {FORMAT!r}); "
                              "write one with musicvae.load(CHECKPOINT).save_pretrained(DIR)")
    unknown = sorted(set(config) - set(_SECTIONS))
    if unknown:
        raise CheckpointError(f"{source}: unknown section(s) {unknown}; this musicvae reads {list(_SECTIONS)}")
    if not is_plain(dict(config)):
        raise CheckpointError(f"{source}: holds a value that is not a plain number, string, list or mapping")
    model = config.get("model")
    if not isinstance(model, Mapping) or not {"n_mels", "frames", "latent_dim"} <= set(model):
        raise CheckpointError(f"{source}: model must give at least n_mels, frames and latent_dim")
    extra = sorted(set(model) - set(NETWORK_KEYS))
    if extra:
        raise CheckpointError(f"{source}: unknown network setting(s) {extra}; known: {list(NETWORK_KEYS)}")
    check_mel_bounds(config.get("mel"), source)
    try:
        mel = MelSettings.from_dict(dict(config["mel"]), source=f"{source} mel")
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: invalid mel settings ({err})") from None
    if mel.n_mels != model["n_mels"] or config.get("frames") != model["frames"]:
        raise CheckpointError(f"{source}: the mel settings ({mel.n_mels} bins, {config.get('frames')!r} frames) do not "
                              f"match the network ({model['n_mels']!r} x {model['frames']!r})")
    norm = config.get("normalization") or {}
    compensation = config.get("compensation") or {}
    prior = checked_section(config.get("prior"), model["latent_dim"], source)
    return {**dict(config), "model": dict(model), "mel": mel.to_dict(),
            "normalization": {"mean": _number(norm.get("mean"), source, "normalization.mean"),
                              "std": _number(norm.get("std"), source, "normalization.std", 1e-12)},
            "compensation": {"alpha": _number(compensation.get("alpha", 0.0), source, "compensation.alpha", 0, 1)},
            "prior": prior, "training": dict(config.get("training") or {})}


def check_weight_shapes(config: Mapping[str, Any], weights: str | os.PathLike, source: str) -> None:
    """Compare the network `config` describes, built on the meta device, with the safetensors header's shapes.

    Raises:
        CheckpointError: an unreadable safetensors file, or a model too large or of other shapes.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt", device="cpu") as handle:  # reads the header only
            shapes = {k.removeprefix("model."): torch.empty(handle.get_slice(k).get_shape(), device="meta")
                      for k in handle.keys()}
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({str(err).splitlines()[0][:200]})") from None
    check_model_shapes(MusicVAEModule, config["model"], shapes, source)
    prior, buffers = config["prior"], {k.removeprefix("prior."): v for k, v in shapes.items() if k.startswith("prior.")}
    if "kind" in prior:  # the learned prior's buffers, before any memory is allocated for them
        check_prior_shapes(prior["kind"], prior["latent_dim"], prior["components"], prior["covariance"], buffers,
                           source)
    elif buffers:
        raise CheckpointError(f"{weights}: holds prior buffers {sorted(buffers)}, but {CONFIG_FILE} describes no "
                              "learned prior")


class PretrainedVAE(nn.Module, PyTorchModelHubMixin, library_name="musicvae", model_card_template=CARD_TEMPLATE,
                    tags=["audio", "music", "variational-autoencoder", "log-mel"]):
    """A MusicVAEModule with everything that turns audio into its inputs and its outputs back into audio.

    Args:
        config: config.json's contents (`pretrained_config`): the network's settings, the mel
            settings, the training normalisation, the default compensation strength, the prior;
            the compensation curve and its perceptual point are buffers that travel with the weights.
    """

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = checked_config(config, "config")
        # Not `self.module`: the mixin saves `self.module` in place of `self` (its DataParallel unwrapping).
        self.model = MusicVAEModule(**self.config["model"])
        self.prior = unfitted_prior(self.config["prior"])  # buffers `prior.*` in the safetensors; None: N(0, I)

    @classmethod
    def from_generation_model(cls, model: GenerationModel, training: Optional[Mapping[str, Any]] = None) -> PretrainedVAE:
        """Wrap a loaded model for saving; its tensors are shared, not copied (built on the meta device)."""
        hparams = model.module.hparams
        config = json.loads(json.dumps({
            "format": FORMAT, "musicvae_version": musicvae.__version__,
            "model": {k: hparams[k] for k in NETWORK_KEYS if k in hparams},
            "mel": model.mel.to_dict(), "frames": model.frames,
            "normalization": {"mean": model.mean, "std": model.std},
            "compensation": {"alpha": model.alpha},
            "prior": config_section(model.learned_prior, int(hparams["latent_dim"])),
            "training": dict(training or {}),
        }))
        with torch.device("meta"):
            wrapper = cls(config)
        state = model.module.state_dict()
        # Training-only parts (an adversarial run's discriminator) are not part of the saved model.
        kept = {k: state[k].detach().cpu() for k in wrapper.model.state_dict()}
        wrapper.model.load_state_dict(kept, strict=True, assign=True)
        if wrapper.prior is not None:
            wrapper.prior.load_state_dict(model.learned_prior.state_dict(), strict=True, assign=True)
        return wrapper

    def generation_model(self, device: str = "cpu", alpha: Optional[float | str] = None) -> GenerationModel:
        """The model ready to encode and decode on `device`, decoding at `alpha` (None: the saved default)."""
        config = self.config
        module = self.model.eval().to(device)
        alpha = config["compensation"]["alpha"] if alpha is None else alpha
        return GenerationModel(module, MelSettings.from_dict(config["mel"]), int(config["frames"]),
                               Normalizer(**config["normalization"]), resolve_alpha(module, alpha), self.prior)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The card of CARD_TEMPLATE, with this save's license (`model_card_kwargs={"license": ...}`)."""
        license = kwargs.pop("license", None) or "unknown"
        data = ModelCardData(**self._hub_mixin_info.model_card_data.to_dict())
        data.license = license
        fields = card_fields(self.config, kwargs.pop("repo_id", None) or "DIR", license)
        return ModelCard.from_template(card_data=data, template_str=CARD_TEMPLATE, **fields, **kwargs)

    @classmethod
    def load_folder(cls, folder: str | os.PathLike, map_location: str = "cpu") -> PretrainedVAE:
        """`from_pretrained` of a local folder, its config.json read and checked here first (the mixin
        would index into whatever JSON it finds).

        Raises:
            CheckpointError: no config.json, or one that is not valid (see `checked_config`).
        """
        path = Path(folder) / CONFIG_FILE
        try:
            if path.stat().st_size > MAX_CONFIG_BYTES:
                raise CheckpointError(f"{path}: {path.stat().st_size:,} bytes, more than a model's settings take "
                                      f"({MAX_CONFIG_BYTES:,}); refused unread")
            checked_config(json.loads(path.read_text(encoding="utf-8")), path)
        except FileNotFoundError:
            raise CheckpointError(f"{folder}: no {CONFIG_FILE}; load a checkpoint file, or a folder written by "
                                  "save_pretrained") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise CheckpointError(f"{path}: not readable JSON ({str(err).splitlines()[0][:200]})") from None
        return cls.from_pretrained(folder, map_location=map_location)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: Optional[str], cache_dir: Optional[str | Path],
                         force_download: bool, local_files_only: bool, token: Optional[str | bool],
                         config: Optional[dict] = None, map_location: str = "cpu") -> PretrainedVAE:
        """What the mixin's from_pretrained calls with config.json's contents: validate, then build, then
        load the weights strictly."""
        import safetensors.torch

        folder = os.path.isdir(model_id)
        source = str(Path(model_id) / CONFIG_FILE) if folder else f"{model_id} {CONFIG_FILE}"
        if config is None:
            raise CheckpointError(f"{model_id}: no {CONFIG_FILE}: not a folder written by save_pretrained")
        config = checked_config(config, source)
        weights = Path(model_id) / WEIGHTS_FILE if folder else hf_hub_download(
            model_id, WEIGHTS_FILE, revision=revision, cache_dir=cache_dir, force_download=force_download,
            token=token, local_files_only=local_files_only)
        if not os.path.isfile(weights):
            raise CheckpointError(f"{weights}: missing; a saved model keeps its weights beside {CONFIG_FILE}")
        check_weight_shapes(config, weights, source)
        wrapper = cls(config)
        try:
            safetensors.torch.load_model(wrapper, str(weights), strict=True, device=str(map_location))
        except (RuntimeError, ValueError) as err:
            raise CheckpointError(f"{weights}: the weights do not fit the model {CONFIG_FILE} describes "
                                  f"({' '.join(str(err).split())[:300]})") from None
        if wrapper.prior is not None:
            check_prior_values(wrapper.prior, weights)
        return wrapper.eval()
