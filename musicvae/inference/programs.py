"""`musicvae export --format pt2|onnx`: a checkpoint as torch.export programs or ONNX models, one per file.

Written into the `--out` folder, each running with torch alone (pt2) or any ONNX runtime (onnx):

    encode.pt2   audio (B, (frames - 1) * hop + n_fft) at mel.sample_rate -> (B, latent_dim) posterior means,
                 or with --encode_input log_mel: (B, 1, n_mels, frames) natural-log mel power -> the same
    decode.pt2   (B, latent_dim) -> (B, 1, n_mels, frames) natural-log mel power (denormalised, compensated
                 at --alpha)
    mel_settings.json, musicvae.json   the mel settings that made the inputs; what the programs are

The batch size is dynamic. The audio encoder frames its input as an uncentred STFT (no padding), so
window s of the whole recording's centred log-mel (frames [s, s + frames), the windows `musicvae.load
(...).encode` and `predict` tile) is the program's code for samples [s * hop, s * hop + (frames - 1)
* hop + n_fft) of the recording reflect-padded by n_fft // 2 at each end: a window cut from audio
equals the whole-file mel. Loading (docs/api.md):

    encode = torch.export.load("model/encode.pt2").module()
    codes = encode(audio)

Each program is compared with the checkpoint's module before it is written, after a save and load
round trip (`PT2_ATOL`, `ONNX_ATOL`, the latter through onnxruntime).
"""

from __future__ import annotations

import importlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

import musicvae
from musicvae.audio.mel import LogMel
from musicvae.errors import ConfigError
from musicvae.inference.card import run_name
from musicvae.inference.export import MEL_SETTINGS_FILE, METADATA_FILE, PortableVAE, portable
from musicvae.inference.generation import GenerationModel, load_generation_model
from musicvae.io.outputs import check_output_folder, write_output

FORMATS = ("pt2", "onnx")
ENCODE_INPUTS = ("audio", "log_mel")
#: Largest |difference| between a written program and the checkpoint's module (torch.export, ONNX Runtime).
PT2_ATOL = 1e-5
ONNX_ATOL = 1e-4
#: Largest batch the programs are exported for (torch.export needs a bound; far above any one call's need).
MAX_BATCH = 1 << 16


class Encoder(nn.Module):
    """PortableVAE.encode, from log-mels or (with `to_mel`) from audio framed by an uncentred STFT."""

    def __init__(self, vae: PortableVAE, to_mel: Optional[LogMel] = None) -> None:
        super().__init__()
        self.vae, self.to_mel = vae, to_mel
        for module in self.to_mel.modules() if to_mel is not None else ():
            for name, buffer in list(module.named_buffers(recurse=False)):
                # Own storage: torchaudio's STFT window is a view of a longer one, and torch.export.save
                # warns ("No complete tensor found in the group") on a buffer that does not cover its storage.
                setattr(module, name, buffer.clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.to_mel is not None:
            x = self.to_mel.frames(x)[:, None]  # (B, samples) -> (B, 1, n_mels, frames)
        return self.vae.encode(x)


class Decoder(nn.Module):
    """PortableVAE.decode: (B, latent_dim) -> (B, 1, n_mels, frames) natural-log mel power."""

    def __init__(self, vae: PortableVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor) -> Tensor:
        return self.vae.decode(z)


def audio_samples(model: GenerationModel) -> int:
    """Samples the audio encoder takes: the uncentred STFT of this many has exactly `frames` frames."""
    return (model.frames - 1) * model.mel.hop_length + model.mel.n_fft


@torch.no_grad()
def _cases(model: GenerationModel, encode_input: str, n: int = 3, seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """Inputs around the data, and what the checkpoint's module makes of them: {"encode": (x, mu), "decode": (z, mel)}."""
    generator = torch.Generator().manual_seed(seed)
    if encode_input == "audio":
        x = 0.1 * torch.randn(n, audio_samples(model), generator=generator)
        log_mel = LogMel(model.mel).frames(x)[:, None]
    else:
        x = log_mel = model.denormalize(torch.randn(n, 1, model.mel.n_mels, model.frames, generator=generator))
    z = torch.randn(n, int(model.module.hparams.latent_dim), generator=generator)
    return {"encode": (x, model.encode_windows(model.normalize(log_mel)).cpu()),
            "decode": (z, model.denormalize(model.decode_windows(z)).cpu())}


def _pt2(module: nn.Module, example: Tensor) -> tuple[bytes, Callable[[Tensor], Tensor]]:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(module, (example[:2],), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    loaded = torch.export.load(io.BytesIO(buffer.getvalue())).module()  # checked as it will be read
    return buffer.getvalue(), loaded


def require_onnx() -> None:
    """Raises ConfigError, with the install command, unless the onnx extra's three packages import."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if not _importable(name)]
    if missing:
        raise ConfigError(f"--format onnx needs the onnx extra ({', '.join(missing)} missing): "
                          "pip install 'musicvae[onnx]'")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _onnx(module: nn.Module, example: Tensor) -> tuple[bytes, Callable[[Tensor], Tensor]]:
    import onnxruntime

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.onnx.export(module, (example[:2],), dynamo=True, dynamic_shapes=({0: batch},),
                                input_names=["x"], output_names=["y"], verbose=False)
    data = program.model_proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return data, lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def export_programs(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = "pt2",
                    encode_input: str = "audio", alpha: Optional[float | str] = 0.0,
                    force: bool = False) -> dict[str, Any]:
    """Write `encode.<fmt>`, `decode.<fmt>`, `mel_settings.json` and `musicvae.json` into `out_dir`.

    Args:
        fmt: "pt2" (torch.export) or "onnx" (the onnx extra).
        encode_input: what encode takes, "audio" or "log_mel" (see the module docstring).
        alpha: variance compensation built into decode (musicvae.inference.loading.resolve_alpha).

    Returns:
        The metadata written to musicvae.json, with ``path`` and ``max_difference`` per program.

    Raises:
        ConfigError: before any work, an unknown format or input, or an `out_dir` that cannot be written
            or holds these files and `force` is off; after it, a program that does not reproduce the
            module (nothing written).
        CheckpointError: see load_generation_model.
    """
    if fmt not in FORMATS or encode_input not in ENCODE_INPUTS:
        raise ConfigError(f"--format {fmt!r} / --encode_input {encode_input!r}: use one of {FORMATS} / {ENCODE_INPUTS}")
    if fmt == "onnx":
        require_onnx()
    names = {"encode": f"encode.{fmt}", "decode": f"decode.{fmt}"}
    out = check_output_folder(out_dir, [*names.values(), MEL_SETTINGS_FILE, METADATA_FILE], "--out", [ckpt_path], force)
    model = load_generation_model(ckpt_path, "cpu", alpha)
    vae = portable(model)
    modules = {"encode": Encoder(vae, LogMel(model.mel) if encode_input == "audio" else None).eval(),
               "decode": Decoder(vae).eval()}
    export, atol = (_pt2, PT2_ATOL) if fmt == "pt2" else (_onnx, ONNX_ATOL)
    written, differences = {}, {}
    for name, (x, expected) in _cases(model, encode_input).items():
        with torch.no_grad():
            written[name], run = export(modules[name], x)
            differences[name] = float((run(x) - expected).abs().max())
        if not differences[name] <= atol:
            raise ConfigError(f"the exported {name} program differs from the checkpoint's module by "
                              f"{differences[name]:.3g} (> {atol:g}); nothing written")
    samples = audio_samples(model)
    metadata = {
        "format": f"musicvae-{fmt}-1", "checkpoint": f"{run_name(ckpt_path)}/{Path(ckpt_path).name}",
        "musicvae_version": musicvae.__version__, "torch_version": torch.__version__,
        "n_mels": model.mel.n_mels, "frames": model.frames, "latent_dim": int(model.module.hparams.latent_dim),
        "mean": model.mean, "std": model.std, "alpha": model.alpha, "encode_input": encode_input,
        "audio_samples": samples if encode_input == "audio" else None,
        "programs": {
            names["encode"]: (f"audio (B, {samples}) at {model.mel.sample_rate} Hz, no centring" if encode_input == "audio"
                              else f"natural-log mel power (B, 1, {model.mel.n_mels}, {model.frames})")
            + f" -> posterior means (B, {int(model.module.hparams.latent_dim)})",
            names["decode"]: f"latents (B, {int(model.module.hparams.latent_dim)}) -> natural-log mel power "
                             f"(B, 1, {model.mel.n_mels}, {model.frames})"},
        "max_difference": differences,
    }
    for name, data in written.items():
        write_output(out / names[name], lambda handle, data=data: handle.write(data))
    write_output(out / MEL_SETTINGS_FILE, lambda h: h.write(json.dumps(model.mel.to_dict(), indent=2) + "\n"), mode="w")
    write_output(out / METADATA_FILE, lambda h: h.write(json.dumps(metadata, indent=2) + "\n"), mode="w")
    return {**metadata, "path": str(out), "files": [str(out / n) for n in names.values()]}
