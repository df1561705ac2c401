"""Fit a prior over a trained checkpoint's codes and write the checkpoint with it (`musicvae fit-prior`).

The codes are the posterior means of the checkpoint's own training and validation windows: the data
module and split rebuilt from the checkpoint (musicvae.inference.loading.datamodule_for; another
folder with `data_dir`, split by the same rule), each window at a fixed crop without augmentation,
so the same checkpoint and folder give the same codes. musicvae.models.prior.fit_prior fits every
candidate on the training codes and keeps the one of highest mean log-likelihood per validation code
(N(0, I) is always a candidate). The result is the whole checkpoint (weights, optimizer, run config:
it still resumes) with the prior under musicvae.inference.priors.PRIOR_KEY, written to a new file,
by default `NAME.prior.ckpt` beside `NAME.ckpt`, whole or not at all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from musicvae.errors import ConfigError
from musicvae.inference.loading import datamodule_for, load_module
from musicvae.inference.priors import MAX_COMPONENTS, PRIOR_KEY, prior_record, prior_settings
from musicvae.io.outputs import check_output_file, write_output
from musicvae.models.prior import COVARIANCES, DEFAULT_COMPONENTS, fit_prior

#: What the default output's name adds before `.ckpt`: best.ckpt -> best.prior.ckpt.
SUFFIX = ".prior"


def default_output(ckpt_path: str | os.PathLike) -> Path:
    """`NAME.prior.ckpt` beside `NAME.ckpt` (or beside a checkpoint of any other suffix)."""
    path = Path(ckpt_path)
    return path.with_name(f"{path.stem}{SUFFIX}{path.suffix or '.ckpt'}")


@torch.no_grad()
def posterior_means(module: Any, dataset: Dataset, batch_size: int = 64) -> Tensor:
    """``(N, D)`` posterior means of every window of `dataset` (float32, CPU)."""
    return torch.cat([module.vae.encode(x.to(module.device))[0].float().cpu()
                      for x in DataLoader(dataset, batch_size=batch_size, shuffle=False)])


def check_candidates(components: Sequence[int], covariances: Sequence[str]) -> None:
    """Refuse, before any work, component counts outside [1, MAX_COMPONENTS] or an unknown covariance."""
    bad = [k for k in components if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_COMPONENTS]
    if not components or bad:
        raise ConfigError(f"--components {list(components)}: give counts in [1, {MAX_COMPONENTS}]")
    if not covariances or set(covariances) - set(COVARIANCES):
        raise ConfigError(f"--covariances {list(covariances)}: each one of {', '.join(COVARIANCES)}")


def fit_checkpoint_prior(ckpt_path: str | os.PathLike, out: Optional[str | os.PathLike] = None,
                         data_dir: Optional[str] = None, seed: int = 0,
                         components: Sequence[int] = DEFAULT_COMPONENTS, covariances: Sequence[str] = COVARIANCES,
                         device: str = "cpu", batch_size: int = 64, force: bool = False,
                         cache_dir: Optional[str] = None) -> dict[str, Any]:
    """Fit the prior of highest validation likelihood on a checkpoint's codes; write the checkpoint with it.

    Args:
        ckpt_path: a checkpoint the command line wrote (one that carries a prior already gets a new one).
        out: the file to write; None: `default_output(ckpt_path)`. Never `ckpt_path` itself.
        data_dir: a folder to take the windows from instead of the run's own, split by the run's rule.
        seed: EM's k-means++ start (the same seed and codes give the same prior).
        components, covariances: the mixtures tried (fit_prior); a Gaussian and N(0, I) always are.
        batch_size: windows per forward pass.
        force: replace `out` if it exists.
        cache_dir: the folder's log-mel cache (default: the data module's; a checkpoint never chooses it).

    Returns:
        ``path`` (written), ``prior`` (its settings), ``table`` (fit_prior's rows: kind, components,
        covariance, parameters, train_log_likelihood, val_log_likelihood), ``train_codes``, ``val_codes``.

    Raises:
        ConfigError: before any work, an `out` that cannot be written, is the input, or exists without
            `force`, or bad candidates; after loading, a split without validation windows.
        CheckpointError: see load_module.
    """
    check_candidates(components, covariances)
    out = check_output_file(out if out is not None else default_output(ckpt_path), "--out", [ckpt_path], force)
    module, ckpt = load_module(ckpt_path, device)
    datamodule = datamodule_for(ckpt, data_dir=data_dir, **({"cache_dir": cache_dir} if cache_dir else {}))
    datamodule.prepare_data()
    datamodule.setup("validate")
    train, validation = datamodule.train_set.fixed_windows(), datamodule.val_set
    if len(validation) == 0 or len(train) < 2:
        raise ConfigError(f"{datamodule.folder}: {len(train)} training and {len(validation)} validation windows; "
                          "choosing a prior on validation needs both (more recordings, or a run with data.val_split)")
    train_codes = posterior_means(module, train, batch_size)
    val_codes = posterior_means(module, validation, batch_size)
    best, table = fit_prior(train_codes, val_codes, components=components, covariances=covariances, seed=seed)
    fitted_on = {"checkpoint": Path(ckpt_path).name, "train_codes": len(train_codes), "val_codes": len(val_codes),
                 "seed": int(seed), "chosen_on": "highest mean log-likelihood per validation code (nats)",
                 "candidates": table}
    record = prior_record(best, fitted_on)
    write_output(out, lambda handle: torch.save({**ckpt, PRIOR_KEY: record}, handle))
    return {"path": str(out), "prior": prior_settings(best), "table": table,
            "train_codes": len(train_codes), "val_codes": len(val_codes)}
