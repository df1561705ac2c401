"""save_pretrained / musicvae.load of a folder: bit-identical codes, a model card without full paths,
and config.json read as untrusted data (refused in one line before anything is built)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import musicvae
from musicvae.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def saved(tiny_run, tmp_path_factory):
    model = musicvae.load(tiny_run["ckpt_dir"] / "best.ckpt")
    folder = tmp_path_factory.mktemp("pretrained") / "tiny-model"
    metrics = {"checkpoint": "x", "metrics": {"mse": 0.25, "lsd_db": 7.5, "band_ratio": {"0-7": 0.9}}}
    model.save_pretrained(folder, metrics=metrics, license="cc-by-4.0")
    return model, folder


def _audio(seconds: float = 1.5, rate: int = 22050) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 330 * t) * (1 + np.sin(2 * np.pi * 2 * t))).astype(np.float32)


def test_a_saved_folder_gives_bit_identical_codes_and_decodes(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    again = musicvae.load(folder)
    audio = _audio()
    assert torch.equal(again.encode(audio, 22050), model.encode(audio, 22050))
    codes = model.encode(audio, 22050)
    assert torch.equal(again.decode_mel(codes), model.decode_mel(codes))
    state, reloaded = model.model.module.state_dict(), again.model.module.state_dict()
    assert state.keys() == reloaded.keys()  # the compensation buffers travel with the weights
    assert all(torch.equal(state[k], reloaded[k]) for k in state)


def test_the_model_card_names_the_run_not_the_machine(saved, tiny_run):
    _, folder = saved
    card = (folder / "README.md").read_text()
    config = (folder / "config.json").read_text()
    assert "license: cc-by-4.0" in card and "library_name: musicvae" in card
    assert "Run folder: `ckpt`" in card and "| mse | 0.25 |" in card and "| lsd_db | 7.5 |" in card
    assert "musicvae fit --model.latent_dim 8 --model.channels '[8, 16]'" in card  # the training command line
    assert 'musicvae.load("tiny-model")' in card
    root = str(tiny_run["root"])
    assert root not in card and root not in config  # no full path of the machine it was made on


def test_a_hub_id_is_resolved_through_snapshot_download(saved, monkeypatch):
    import huggingface_hub

    asked = {}

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        asked.update(repo_id=repo_id, revision=revision, patterns=sorted(allow_patterns))
        return str(saved[1])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = musicvae.load("someone/tiny-model", revision="v1")
    assert asked == {"repo_id": "someone/tiny-model", "revision": "v1",
                     "patterns": ["README.md", "config.json", "model.safetensors"]}
    assert model.latent_dim == 8


def _tampered(folder: Path, tmp_path: Path, change) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir()
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    change(config, weights)
    (copy / "config.json").write_text(json.dumps(config) if isinstance(config, dict) else config)
    save_file(weights, copy / "model.safetensors")
    return copy


def _set(path: str, value):
    def change(config, weights):
        *parents, key = path.split(".")
        target = config
        for name in parents:
            target = target[name]
        target[key] = value
    return change


@pytest.mark.parametrize("change, message", [
    (_set("model.channels", [100_000, 16]), "more than musicvae builds"),
    (_set("mel.n_fft", 10**9), "n_fft 1000000000 is outside"),
    (_set("model.class_path", "os.system"), "not a plain number"),
    (_set("model.init_from", "/elsewhere/run.ckpt"), r"unknown network setting\(s\) \['init_from'\]"),
    (_set("model.channels", [8, 32]), "do not fit the model its settings describe"),
    (_set("hooks", {"on_load": "x"}), r"unknown section\(s\) \['hooks'\]"),
    (_set("normalization.std", 0.0), "normalization.std 0.0"),
    (_set("format", "pytorch"), "not a musicvae model folder"),
    (lambda config, weights: weights.pop("model.vae.to_latent.bias"), "do not fit the model config.json describes"),
], ids=["huge-model", "huge-mel", "class-path", "training-option", "shapes", "section", "std", "format", "missing-tensor"])
def test_a_tampered_folder_is_refused_in_one_line(saved, tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message) as refused:
        musicvae.load(_tampered(saved[1], tmp_path, change))
    assert "\n" not in str(refused.value)


def test_a_folder_is_not_overwritten_without_force(saved):
    model, folder = saved
    with pytest.raises(ConfigError, match="already holds config.json.*force=True"):
        model.save_pretrained(folder)
    (folder / "README.md").write_text("stale")
    model.save_pretrained(folder, force=True)
    assert "stale" not in (folder / "README.md").read_text()


@pytest.mark.parametrize("text, message", [
    ("{not json", "not readable JSON"),
    ("[1, 2]", "not a musicvae model folder"),
    (" " * (2 << 20) + "{}", "more than a model's settings take"),
], ids=["broken", "a-list", "oversized"])
def test_an_unreadable_config_json_is_refused_in_one_line(saved, tmp_path, text, message):
    copy = tmp_path / "copy"
    shutil.copytree(saved[1], copy)
    (copy / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message) as refused:
        musicvae.load(copy)
    assert "\n" not in str(refused.value)


def test_push_to_hub_uploads_the_saved_files(saved, monkeypatch):
    """The mixin's push_to_hub, with huggingface_hub's HfApi replaced (the network is closed here)."""
    from huggingface_hub import hub_mixin

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()}, repo=repo_id)
            return "https://huggingface.co/someone/tiny-model/commit/0"

    monkeypatch.setattr(hub_mixin, "HfApi", FakeApi)
    model, folder = saved
    assert model.push_to_hub("someone/tiny-model", license="cc-by-4.0").endswith("/commit/0")
    assert uploaded.pop("repo") == "someone/tiny-model"
    assert sorted(uploaded) == ["README.md", "config.json", "model.safetensors"]
    assert b'musicvae.load("someone/tiny-model")' in uploaded["README.md"]
    assert uploaded["model.safetensors"] == (folder / "model.safetensors").read_bytes()
