"""LatentWriter: `musicvae predict` writes one file of latent codes per recording.

Each file `<predict_dir>/<recording's path in the data folder>.pt` holds plain tensors, numbers
and strings (readable with `torch.load(path, weights_only=True)`):

- `mu`, `logvar`: (W, latent_dim) posterior of each window, float32;
- `start_frames` (W,) int64 and `start_seconds` (W,) float64: where window i starts;
- `frames`: window length; `n_frames`: the recording's length (a tail shorter than a window
  has no code); `source`: the recording's path relative to the data folder;
- `mel`: the mel settings (MelSettings.to_dict()); `mean`, `std`: the normalisation;
- `reconstruction` (W, n_mels, frames), in natural-log mel units, with
  `--predict_reconstructions true`.

Files are written whole or not at all (musicvae.atomic), by the rank that encoded the recording.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from musicvae.atomic import write_atomic


def prediction_path(predict_dir: Path, source: str) -> Path:
    """`predict_dir/<source>.pt`: the recording's relative path, its own suffix kept (a.ogg -> a.ogg.pt)."""
    return predict_dir / f"{source}.pt"


class LatentWriter(BasePredictionWriter):
    """Writes each predicted recording as soon as it is encoded (nothing accumulates in memory)."""

    def __init__(self, predict_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.predict_dir = Path(predict_dir).expanduser().resolve()
        self.written: list[Path] = []

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        path = prediction_path(self.predict_dir, prediction["source"])
        path.parent.mkdir(parents=True, exist_ok=True)  # recordings in subfolders keep them
        write_atomic(path, lambda handle: torch.save(prediction, handle))
        self.written.append(path)
