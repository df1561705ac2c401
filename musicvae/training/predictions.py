"""LatentWriter: `musicvae predict` writes one file of latent codes per recording.

Each file `<predict_dir>/<recording's path in the data folder>.pt` holds plain tensors, numbers
and strings (readable with `torch.load(path, weights_only=True)`):

- `mu`, `logvar`: (W, latent_dim) posterior of each window, float32;
- `start_frames` (W,) int64 and `start_seconds` (W,) float64: where window i starts (one every
  `frames` frames, and a last one ending at the recording's end when a shorter tail is left:
  musicvae.data.segments.segment_starts);
- `frames`: window length; `n_frames`: the recording's length; `source`: the recording's path
  relative to the data folder;
- `mel`: the mel settings (MelSettings.to_dict()); `mean`, `std`: the normalisation;
- `reconstruction` (W, n_mels, frames), in natural-log mel units, with
  `--predict_reconstructions true`.

Files are written whole or not at all (musicvae.io.outputs), by the rank that encoded the recording.
Before anything is prepared, `check_prediction_outputs` refuses a `--predict_dir` that cannot be
written or already holds a file of this run, unless `--force` (an input is never replaced).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from musicvae.data.segments import Normalizer
from musicvae.io.outputs import check_output_folder, write_output


def prediction_path(predict_dir: Path, source: str) -> Path:
    """`predict_dir/<source>.pt`: the recording's relative path, its own suffix kept (a.ogg -> a.ogg.pt)."""
    return predict_dir / f"{source}.pt"


def check_prediction_outputs(predict_dir: str | Path, datamodule: Any, force: bool = False) -> Path:
    """Refuse `predict_dir` before anything is prepared: it cannot be made or written, a recording's
    file would replace an input (another recording, in a folder predicted into itself), a folder
    stands where a file goes, or files of this run exist there and `force` is off.

    The recordings are listed, not read (musicvae.training.preflight.recording_files).

    Returns:
        The folder's absolute path.

    Raises:
        ConfigError: naming --predict_dir and what to change.
    """
    from musicvae.training.preflight import recording_files

    files = recording_files(datamodule)
    return check_output_folder(predict_dir, [prediction_path(Path(), rel) for rel, _ in files], "--predict_dir",
                               [path for _, path in files], force)


class LatentWriter(BasePredictionWriter):
    """Writes each predicted recording as soon as it is encoded (nothing accumulates in memory)."""

    def __init__(self, predict_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.predict_dir = Path(predict_dir).expanduser().resolve()
        self.written: list[Path] = []

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        path = prediction_path(self.predict_dir, prediction["source"])  # recordings in subfolders keep them
        write_output(path, lambda handle: torch.save(prediction, handle))
        self.written.append(path)


def encode_recording(vae: torch.nn.Module, batch: dict, device: torch.device) -> dict:
    """One recording's latent codes: `batch` holds all its windows (see MelDataModule.predict_dataloader).

    Returns the batch's metadata with `mu` and `logvar` (W, latent_dim) and, when the data
    module asks for them, the reconstructed log-mels (W, n_mels, frames) in log units.
    """
    windows = batch["windows"]  # (W, 1, n_mels, frames), normalised
    mus, logvars, recons = [], [], []
    for chunk in windows.split(batch["chunk"]):
        mu, logvar = vae.encode(chunk.to(device))
        mus.append(mu.float().cpu())
        logvars.append(logvar.float().cpu())
        if batch["reconstructions"]:
            recons.append(vae.decode(mu).float().cpu()[:, 0])
    out = {k: v for k, v in batch.items() if k not in ("windows", "chunk", "reconstructions")}
    out["mu"], out["logvar"] = torch.cat(mus), torch.cat(logvars)
    if recons:
        out["reconstruction"] = Normalizer(batch["mean"], batch["std"]).inverse(torch.cat(recons))
    return out
