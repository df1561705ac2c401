"""The classifier two-sample test (musicvae.evaluation.two_sample) over a dataset of windows: the floor,
the noise control, reconstructions at each operating point and prior samples, in one call.

Windows are taken alternately within each recording: the even ones are the real side, the odd ones
are decoded for the generated side (and are the second real side of the floor). Both sides thus come
from the same recordings in equal counts, and the classifier, which is split by recording, cannot
score by recognising albums or tracks; only what decoding changes tells the sides apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from musicvae.evaluation.realism import even_subset
from musicvae.evaluation.two_sample import DEFAULT_SEEDS, TRAIN_STEPS, noise_control, two_sample_test
from musicvae.io.tables import markdown_table

#: Windows per side at most (evenly thinned): ~5 s per seed on one CPU core at 128 x 128.
DEFAULT_WINDOWS = 512


def interleaved_windows(dataset: Dataset, max_windows: int = DEFAULT_WINDOWS) -> tuple[list[int], list[int]]:
    """Window indices of the two sides: alternate windows of each recording (by start frame), each side
    thinned evenly to at most `max_windows`. A dataset without recording ids alternates by position."""
    items = getattr(dataset, "items", None)
    if items is None:
        order = list(range(len(dataset)))
    else:
        rows = np.asarray(items)
        order = sorted(range(len(rows)), key=lambda i: (int(rows[i, 0]), int(rows[i, 1])))
        rank = {}
        sides: tuple[list[int], list[int]] = ([], [])
        for i in order:
            file_index = int(rows[i, 0])
            sides[rank.get(file_index, 0) % 2].append(i)
            rank[file_index] = rank.get(file_index, 0) + 1
        count = min(len(sides[0]), len(sides[1]), max_windows)
        return even_subset(sides[0], count), even_subset(sides[1], count)
    count = min(len(order) // 2, max_windows)
    return even_subset(order[0::2], count), even_subset(order[1::2], count)


def stack_windows(dataset: Dataset, indices: Sequence[int]) -> tuple[Tensor, Optional[Tensor]]:
    """``(N, 1, n_mels, T)`` windows and ``(N,)`` recording ids (None without ``items``)."""
    x = torch.stack([torch.as_tensor(dataset[i]) for i in indices]).float()
    items = getattr(dataset, "items", None)
    groups = None if items is None else torch.as_tensor(np.asarray(items)[list(indices), 0]).long()
    return x, groups


@torch.no_grad()
class TwoSampleWindows:
    """The windows a set of two-sample tests share: alternate windows of each recording, the even ones
    real, the odd ones decoded (at most `max_windows` per side), so every decoder is tested on the same
    windows and the floor is computed once.

    Raises:
        ValueError: fewer than two windows per side.
    """

    def __init__(self, dataset: Dataset, seeds: Sequence[int] = DEFAULT_SEEDS, max_windows: int = DEFAULT_WINDOWS,
                 batch_size: int = 32, steps: int = TRAIN_STEPS) -> None:
        real_idx, source_idx = interleaved_windows(dataset, max_windows)
        if len(real_idx) < 2:
            raise ValueError(f"the two-sample test needs at least 4 windows, this set has {len(dataset)}")
        self.real, self.real_groups = stack_windows(dataset, real_idx)
        self.x, self.groups = stack_windows(dataset, source_idx)
        self.seeds, self.batch_size, self.steps = list(seeds), batch_size, steps

    def decoded(self, decode: Callable[[Tensor], Tensor]) -> Tensor:
        """`decode` of the odd windows, in batches, as float32 on the CPU."""
        return torch.cat([decode(chunk).float().cpu() for chunk in self.x.split(self.batch_size)])

    def floor(self) -> dict[str, Any]:
        """Music against the other windows of the same recordings: what "indistinguishable" scores here."""
        return two_sample_test(self.real, self.x, self.real_groups, self.groups, self.seeds, self.steps)

    def test(self, x_hat: Tensor) -> dict[str, Any]:
        """The real windows against `x_hat`, the odd windows' decodings."""
        return two_sample_test(self.real, x_hat, self.real_groups, self.groups, self.seeds, self.steps)

    def control(self, x_hat: Tensor) -> dict[str, Any]:
        """The real windows against `x_hat` plus moment-matched noise (musicvae.evaluation.two_sample)."""
        return noise_control(self.real, self.x, x_hat, self.real_groups, self.groups, self.seeds, steps=self.steps)


def two_sample_scores(dataset: Dataset, decode: Callable[[Tensor], Tensor],
                      points: Optional[Mapping[str, Callable[[Tensor], Tensor]]] = None,
                      samples: Optional[Mapping[str, Tensor]] = None, seeds: Sequence[int] = DEFAULT_SEEDS,
                      max_windows: int = DEFAULT_WINDOWS, batch_size: int = 32,
                      steps: int = TRAIN_STEPS) -> dict[str, Any]:
    """The C2ST of decoded windows and of samples against the music of `dataset`.

    Args:
        dataset: normalised ``(1, n_mels, T)`` windows (a SegmentDataset: split by its recordings).
        decode: normalised ``(B, 1, n_mels, T)`` -> the alpha-0 reconstruction (posterior mean decoded).
        points: operating points, name -> a function of the alpha-0 output (e.g. variance compensation at
            a strength); ``"alpha_0"`` (the output itself) is always scored.
        samples: name -> ``(K, 1, n_mels, T)`` decoded prior samples; the first N are scored (N real windows).
        seeds: classifiers per comparison.
        max_windows: windows per side at most.
        steps: optimiser steps per classifier (TRAIN_STEPS in every report; fewer only in tests).

    Returns:
        ``windows`` (per side), ``seeds``, ``steps``; ``floor`` (real against real), ``control``
        (moment-matched noise, with ``passed``), ``too_weak`` (the control failed: read no other figure as
        a verdict), ``reconstructions`` and ``samples`` ({name: result of two_sample_test}).

    Raises:
        ValueError: fewer than two recordings, or fewer than two windows per side.
    """
    windows = TwoSampleWindows(dataset, seeds, max_windows, batch_size, steps)
    x_hat = windows.decoded(decode)
    control = windows.control(x_hat)
    out: dict[str, Any] = {
        "windows": len(windows.real), "seeds": list(seeds), "steps": steps, "floor": windows.floor(),
        "control": control, "too_weak": not control["passed"], "reconstructions": {}, "samples": {}}
    for name, point in {"alpha_0": lambda y: y, **dict(points or {})}.items():
        out["reconstructions"][name] = windows.test(point(x_hat))
    for name, drawn in (samples or {}).items():
        out["samples"][name] = two_sample_test(windows.real, drawn[:len(windows.real)].float().cpu(),
                                               windows.real_groups, None, seeds, steps)
    return out


def _cell(found: Mapping[str, Any]) -> str:
    return f"{found['accuracy']:.3f} ± {found['spread']:.3f}"


def two_sample_lines(scores: Optional[Mapping[str, Any]], title: str = "## Classifier two-sample test") -> list[str]:
    """Markdown: one row per comparison (mean ± standard deviation of held-out accuracy over the seeds)."""
    if not scores:
        return []
    rows = [("floor: music against other windows of the same recordings", _cell(scores["floor"])),
            (f"control: alpha-0 output + {scores['control']['covariance']}-covariance noise (must be >= "
             f"{scores['control']['goal']:g})", _cell(scores["control"]))]
    rows += [(f"reconstructions, {name}", _cell(found)) for name, found in scores["reconstructions"].items()]
    rows += [(f"prior samples, {name}", _cell(found)) for name, found in scores["samples"].items()]
    verdict = ("**The control failed: the classifier is too weak here, so these accuracies are no verdict.**"
               if scores["too_weak"] else "The control passed.")
    return [title, "",
            f"Held-out accuracy of a small classifier told real windows from generated ones (0.5: indistinguishable; "
            f"{scores['windows']} windows per side, split by recording, seeds {scores['seeds']}). {verdict}", "",
            *markdown_table(("comparison", "accuracy (mean ± sd)"), rows), ""]


@torch.no_grad()
def checkpoint_two_sample(module: Any, dataset: Dataset, alpha: float, seeds: Sequence[int],
                          max_windows: int = DEFAULT_WINDOWS, batch_size: int = 32) -> dict[str, Any]:
    """:func:`two_sample_scores` of a trained module (a MusicVAEModule, or anything with its
    ``reconstruct``, ``compensated`` and ``sample``): reconstructions at alpha 0 and at `alpha` (when
    above 0), and decoded N(0, I) samples (seed 0) as ``samples["standard"]``."""
    points = {f"alpha_{alpha:g}": lambda y: module.compensated(y.to(module.device), alpha).cpu()} if alpha > 0 else {}
    count = len(interleaved_windows(dataset, max_windows)[0])
    drawn = module.sample(count, generator=torch.Generator().manual_seed(0)).cpu()
    return two_sample_scores(dataset, module.reconstruct, points, {"standard": drawn}, seeds, max_windows, batch_size)
