"""`musicvae export --format pt2|onnx`: programs that load with torch.export.load (or run in
onnxruntime) and give `musicvae.load(...).encode`'s codes for windows cut from the audio."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import musicvae
from conftest import load_script
from musicvae.audio.mel import mono_to_log_mel

export = load_script("export")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def recording(tiny_run) -> dict:
    """2.3 s at the model's rate: its codes, and each window's samples cut from the reflect-padded audio."""
    model = musicvae.load(tiny_run["ckpt_dir"] / "best.ckpt")
    rng = np.random.default_rng(0)
    t = np.arange(int(2.3 * 22050)) / 22050
    audio = (0.3 * np.sin(2 * np.pi * 220 * (1 + t) * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
    codes, starts = model.encode(audio, 22050, return_starts=True)
    mel = model.model.mel
    frames = [int(round(float(s) * mel.frames_per_second)) for s in starts]
    pad = mel.n_fft // 2
    padded = torch.nn.functional.pad(torch.from_numpy(audio)[None, None], (pad, pad), mode="reflect")[0, 0]
    length = (model.frames - 1) * mel.hop_length + mel.n_fft
    cuts = torch.stack([padded[f * mel.hop_length : f * mel.hop_length + length] for f in frames])  # (W, length)
    log_mel = torch.from_numpy(mono_to_log_mel(audio, 22050, mel))
    windows = torch.stack([log_mel[:, f : f + model.frames] for f in frames])[:, None]  # (W, 1, n_mels, frames)
    return {"model": model, "codes": codes, "cuts": cuts, "windows": windows, "ckpt": tiny_run["ckpt_dir"] / "best.ckpt"}


def test_pt2_programs_give_encodes_codes_for_windows_cut_from_audio(recording, tmp_path, capsys):
    out = tmp_path / "programs"
    assert export.main(["--ckpt_path", str(recording["ckpt"]), "--out", str(out), "--format", "pt2"]) == 0
    assert "max |difference| to the checkpoint" in capsys.readouterr().out
    encode = torch.export.load(out / "encode.pt2").module()
    decode = torch.export.load(out / "decode.pt2").module()
    codes, cuts = recording["codes"], recording["cuts"]
    assert cuts.shape[0] == 7  # the tail's window included
    assert (encode(cuts) - codes).abs().max() <= 1e-5
    assert (encode(cuts[2:3]) - codes[2:3]).abs().max() <= 1e-5  # a batch of one: the batch is dynamic
    generation = recording["model"].model
    with torch.no_grad():
        expected = generation.denormalize(generation.decode_windows(codes))
    assert (decode(codes) - expected).abs().max() <= 1e-5
    metadata = json.loads((out / "musicvae.json").read_text())
    assert metadata["encode_input"] == "audio" and metadata["audio_samples"] == cuts.shape[1]
    assert json.loads((out / "mel_settings.json").read_text()) == generation.mel.to_dict()


def test_pt2_encode_of_log_mel_windows(recording, tmp_path):
    from musicvae.inference.programs import export_programs

    result = export_programs(recording["ckpt"], tmp_path / "mel", "pt2", encode_input="log_mel")
    assert max(result["max_difference"].values()) <= 1e-5
    encode = torch.export.load(tmp_path / "mel" / "encode.pt2").module()
    assert (encode(recording["windows"]) - recording["codes"]).abs().max() <= 1e-5


def test_onnx_models_match_the_checkpoint_in_onnxruntime(recording, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    out = tmp_path / "onnx"
    assert export.main(["--ckpt_path", str(recording["ckpt"]), "--out", str(out), "--format", "onnx"]) == 0
    session = onnxruntime.InferenceSession(str(out / "encode.onnx"), providers=["CPUExecutionProvider"])
    codes = session.run(None, {"x": recording["cuts"].numpy()})[0]
    assert np.abs(codes - recording["codes"].numpy()).max() <= 1e-4


def test_onnx_without_its_extra_is_refused_with_the_install_command(recording, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails, as when the extra is absent
    assert export.main(["--ckpt_path", str(recording["ckpt"]), "--out", str(tmp_path / "x"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "musicvae[onnx]" in err and "onnxruntime" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
