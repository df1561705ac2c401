"""A trained checkpoint as one TorchScript file that runs with torch alone (`musicvae export`).

The program maps natural-log mels to latents and back, with the training normalisation inside,
and carries the mel settings that made its inputs; without musicvae installed:

    extra = {"mel_settings.json": "", "musicvae.json": ""}
    model = torch.jit.load("model.pt", _extra_files=extra)          # mel settings: json.loads(extra[...])
    mu = model.encode(log_mel)        # (B, 1, n_mels, frames) natural-log mel power -> (B, latent_dim)
    log_mel_hat = model.decode(mu)    # (B, latent_dim) -> (B, 1, n_mels, frames), denormalised

TorchScript is still the default format, for one release, for users' `torch.jit.load` scripts: one
file holds several methods (`encode`, `decode`, `posterior`, `forward`), attributes and metadata.
torch 2.15 deprecates torch.jit, so the default moves to `--format pt2` (torch.export programs,
musicvae/inference/programs.py, docs/api.md); the test in tests/inference/test_export.py will say
when TorchScript stops working.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

import musicvae
from musicvae.compensation import strength_gain
from musicvae.errors import ConfigError
from musicvae.inference.generation import GenerationModel, load_generation_model
from musicvae.io.outputs import check_output_file, write_output

#: Names of the metadata files stored in the program (read with `torch.jit.load(_extra_files=...)`).
MEL_SETTINGS_FILE = "mel_settings.json"
METADATA_FILE = "musicvae.json"
#: Largest |difference| between the program and the checkpoint's module accepted at export.
EXPORT_ATOL = 1e-4


class PortableVAE(nn.Module):
    """A VAE's encoder and decoder with the normalisation inside, written for torch.jit.script.

    The networks' `encode` / `decode` do not script (their shape checks format tuples), so this
    module checks shapes itself and calls their unchecked `posterior` / `generate`;
    `export_checkpoint` checks the two agree.

    Args:
        vae: the trained network, any of the architectures (shared, not copied).
        mean, std: the training normalisation; inputs and outputs are un-normalised log-mels.
        mel_settings: the MelSettings as JSON, also kept as an attribute of the program.
    """

    def __init__(self, vae: nn.Module, mean: float, std: float, mel_settings: str,
                 gain: Optional[Tensor] = None, edges: Optional[list[tuple[int, int]]] = None) -> None:
        super().__init__()
        self.vae = vae
        self.n_mels, self.frames, self.latent_dim = int(vae.n_mels), int(vae.frames), int(vae.latent_dim)
        self.mean, self.std = float(mean), float(std)
        self.mel_settings = mel_settings
        # Variance compensation at the exported strength (musicvae/compensation.py), written out
        # because `compensate` does not script: each example's band deviations scaled per bin.
        self.compensated = gain is not None
        self.register_buffer("gain", torch.ones(self.n_mels) if gain is None else gain.detach().float().cpu().clone())
        edges = edges or [(0, self.n_mels)]
        # Not annotated: TorchScript warns on an annotated list built in __init__, and infers List[int].
        self.band_starts = [int(a) for a, _ in edges]
        self.band_stops = [int(b) for _, b in edges]

    def _compensate(self, x: Tensor) -> Tensor:
        """(B, 1, n_mels, frames) normalised -> the same with each band's deviations scaled by `gain`."""
        if not self.compensated:
            return x
        parts: list[Tensor] = []
        for i in range(len(self.band_starts)):
            part = x[:, :, self.band_starts[i]:self.band_stops[i], :]
            centre = part.mean(dim=[1, 2, 3], keepdim=True)
            parts.append(centre + self.gain[self.band_starts[i]:self.band_stops[i]].view(1, 1, -1, 1) * (part - centre))
        return torch.cat(parts, dim=2)

    @torch.jit.export
    def posterior(self, log_mel: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 1, n_mels, frames) natural-log mel power -> (mu, logvar), each (B, latent_dim)."""
        if log_mel.dim() != 4 or log_mel.size(1) != 1 or log_mel.size(2) != self.n_mels or log_mel.size(3) != self.frames:
            raise ValueError("expected log-mels of shape (B, 1, " + str(self.n_mels) + ", " + str(self.frames)
                             + "), got " + str(log_mel.shape))
        return self.vae.posterior((log_mel - self.mean) / self.std)

    @torch.jit.export
    def encode(self, log_mel: Tensor) -> Tensor:
        """(B, 1, n_mels, frames) natural-log mel power -> (B, latent_dim) posterior mean."""
        return self.posterior(log_mel)[0]

    @torch.jit.export
    def decode(self, z: Tensor) -> Tensor:
        """(B, latent_dim) -> (B, 1, n_mels, frames) natural-log mel power (denormalised)."""
        if z.dim() != 2 or z.size(1) != self.latent_dim:
            raise ValueError("expected latents of shape (B, " + str(self.latent_dim) + "), got " + str(z.shape))
        return self._compensate(self.vae.generate(z)) * self.std + self.mean  # (B, L) -> (B, 1, M, T)

    def forward(self, log_mel: Tensor) -> Tensor:
        """Reconstruction from the posterior mean, log-mel in, log-mel out."""
        return self.decode(self.encode(log_mel))


def portable(model: GenerationModel) -> PortableVAE:
    """The checkpoint's network and normalisation as a PortableVAE, on the CPU, in eval mode (shared weights)."""
    vae = model.module.vae.cpu().eval()
    gain = strength_gain(model.module.output_gain.cpu(), model.alpha) if model.alpha > 0 else None
    return PortableVAE(vae, model.mean, model.std, json.dumps(model.mel.to_dict(), sort_keys=True),
                       gain, model.module.band_edges).eval()


def script(model: GenerationModel) -> torch.jit.ScriptModule:
    """`portable(model)` scripted. torch 2.15 warns (FutureWarning) that torch.jit.script and torch.jit.save
    are deprecated; `musicvae export` silences exactly those two messages, a library caller sees them."""
    return torch.jit.script(portable(model))


@torch.no_grad()
def max_difference(program: torch.jit.ScriptModule, model: GenerationModel, n: int = 4, seed: int = 0) -> float:
    """Largest |difference| between the program and the module on `n` inputs drawn around the data.

    Inputs are N(0, 1) in normalised units, so they cover the scale the network was trained on;
    both the latent means and the decoded log-mels are compared.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, model.mel.n_mels, model.frames, generator=generator)
    vae = model.module.vae.cpu().eval()
    mu = vae.encode(x)[0]
    expected_mel = model.denormalize(model.module.cpu().compensated(vae.decode(mu), model.alpha))
    log_mel = model.denormalize(x)
    return max(float((program.encode(log_mel) - mu).abs().max()),
               float((program.decode(mu) - expected_mel).abs().max()))


def export_checkpoint(ckpt_path: str | os.PathLike, out_path: str | os.PathLike,
                      alpha: Optional[float | str] = 0.0, force: bool = False) -> dict[str, Any]:
    """Write a checkpoint as a TorchScript program (see the module docstring), its `decode` compensated at
    strength `alpha` (a number in [0, 1] or "perceptual"; musicvae.inference.loading.resolve_alpha).

    Returns:
        The metadata stored in the program, with ``path`` and ``max_difference`` (program vs
        checkpoint module, checked before writing).

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, or lacks its mel settings.
        ConfigError: before any work, `out_path` cannot be written, is the checkpoint, or exists and
            `force` is off; after it, the program does not reproduce the module.
        StorageError: the machine refused the write.
    """
    out = check_output_file(out_path, "--out", [ckpt_path], force)
    model = load_generation_model(ckpt_path, "cpu", alpha)
    program = script(model)
    difference = max_difference(program, model)
    if not difference <= EXPORT_ATOL:
        raise ConfigError(f"the exported program differs from the checkpoint's module by {difference:.3g} "
                          f"(> {EXPORT_ATOL:g}); not written")
    metadata = {
        "format": "musicvae-torchscript-1",
        "checkpoint": str(Path(ckpt_path).resolve()),
        "musicvae_version": musicvae.__version__,
        "torch_version": torch.__version__,
        "n_mels": model.mel.n_mels,
        "frames": model.frames,
        "latent_dim": int(model.module.hparams.latent_dim),
        "mean": model.mean,
        "std": model.std,
        "alpha": model.alpha,
        "input": "natural-log mel power (B, 1, n_mels, frames), made with mel_settings.json",
        "methods": {"encode": "log-mel -> posterior mean", "posterior": "log-mel -> (mu, logvar)",
                    "decode": "latent -> log-mel", "forward": "log-mel -> reconstructed log-mel"},
    }
    extra = {MEL_SETTINGS_FILE: program.mel_settings, METADATA_FILE: json.dumps(metadata, indent=2)}
    write_output(out, lambda handle: torch.jit.save(program, handle, _extra_files=extra))
    return {**metadata, "path": str(Path(out_path)), "max_difference": difference}
