"""Classifier two-sample test (C2ST; Lopez-Paz & Oquab 2017, arXiv:1610.06545) on log-mel windows.

A small convolutional classifier of fixed architecture and a fixed number of training steps learns
to tell real windows from generated ones; its accuracy on windows of recordings it never trained on
is the statistic. 0.5 means the two sets cannot be told apart; 1.0 means always. Unlike the Fréchet
distances of ``musicvae.evaluation.realism``, which use only means and covariances, the classifier
sees structure that second moments miss: moment-matched Gaussian noise on top of a blurred output
(:func:`noise_control`) has the right covariance and is still told from music, and the test counts
only when it is (``CONTROL_GOAL``).

Everything is split by recording: for each seed about half of each side's recordings are held out
(generated windows carry the ids of the recordings they came from, or are split at random when they
have none, e.g. prior samples), the classifier trains on the rest with balanced batches, and the
score is the balanced accuracy (mean of the two per-class accuracies) on the held-out recordings, so
chance is 0.5 whatever the two counts. Every seed fixes the split, the initial weights and the
batches, so a result is repeatable on the same machine.

Pure torch: no Lightning, no data loading; :func:`two_sample_test` takes tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

#: Seeds a report runs by default (at least three, for a spread).
DEFAULT_SEEDS = (0, 1, 2)
#: Optimiser steps per seed, batches of TRAIN_BATCH windows per class (fixed: the test's power must
#: not depend on how many windows there are).
TRAIN_STEPS = 150
TRAIN_BATCH = 32
LEARNING_RATE = 2e-3
#: The control must be told from music at least this well, or the test is too weak to count.
CONTROL_GOAL = 0.9
#: Share of each side's windows (whole recordings) held out for scoring.
TEST_FRACTION = 0.5


class WindowClassifier(nn.Module):
    """Four strided 3x3 convolutions (8-16-32-32 channels), global mean and standard-deviation pooling,
    one logit: 15 k parameters, ~3 M multiply-adds per 128x128 window, so a seed trains in seconds on
    a CPU. The first layer reads the window at full resolution, because what a blurred decoder loses
    (onsets, harmonic lines) is one or two bins wide; the std pooling sees how textured a window is.

    ``(B, 1, n_mels, T)`` -> ``(B,)`` logits (positive: generated).
    """

    def __init__(self, channels: Sequence[int] = (8, 16, 32, 32)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 1
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1), nn.GELU()]
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * previous, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)  # (B, 1, M, T) -> (B, C, M/16, T/16)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.flatten(2).std(dim=2)], dim=1)  # (B, 2C)
        return self.head(pooled).squeeze(1)


def split_groups(groups: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
    """``(N,)`` bool: True for the windows of the held-out recordings, about `fraction` of the windows.

    Recordings are taken in a random order until `fraction` of the windows is reached; at least one
    recording stays on each side.

    Raises:
        ValueError: fewer than two recordings.
    """
    ids = torch.unique(groups)
    if len(ids) < 2:
        raise ValueError(f"a split by recording needs at least two recordings, these windows come from {len(ids)}")
    held = torch.zeros(len(groups), dtype=torch.bool)
    order = ids[torch.randperm(len(ids), generator=generator)]
    for gid in order[:-1].tolist():  # the last recording always trains
        held |= groups == gid
        if int(held.sum()) >= fraction * len(groups):
            break
    return held


def held_out(n_real: int, n_fake: int, real_groups: Optional[Tensor], fake_groups: Optional[Tensor],
             fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Which real and which generated windows are held out for scoring (two bool masks).

    With ids on both sides the recordings are split once, jointly: a recording's real windows and the
    windows generated from it land on the same side, so the classifier cannot score by recognising
    recordings it trained on (the two classes come from the same recordings in both halves). Generated
    windows without ids (prior samples) are held out at random, in the same fraction.
    """
    def ids(groups: Optional[Tensor], n: int) -> Optional[Tensor]:
        if groups is None:
            return None
        groups = torch.as_tensor(groups).flatten().long()
        if len(groups) != n:
            raise ValueError(f"{len(groups)} recording ids for {n} windows")
        return groups

    real_ids, fake_ids = ids(real_groups, n_real), ids(fake_groups, n_fake)
    if real_ids is None:  # every window its own recording: a random split
        real_ids = torch.arange(n_real)
    if fake_ids is None:
        held_real = split_groups(real_ids, fraction, generator)
        held_fake = split_groups(torch.arange(n_fake), fraction, generator)
        return held_real, held_fake
    held = split_groups(torch.cat([real_ids, fake_ids]), fraction, generator)
    return held[:n_real], held[n_real:]


def _balanced_accuracy(logits: Tensor, labels: Tensor) -> float:
    predicted = logits > 0
    per_class = [(predicted[labels == c] == bool(c)).double().mean() for c in (0, 1)]
    return float(sum(per_class) / 2)


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    return torch.cat([model(chunk) for chunk in x.split(batch_size)])


def run_seed(real: Tensor, fake: Tensor, real_groups: Optional[Tensor], fake_groups: Optional[Tensor],
             seed: int, steps: int = TRAIN_STEPS, batch: int = TRAIN_BATCH,
             test_fraction: float = TEST_FRACTION) -> dict[str, Any]:
    """One split, one classifier: ``accuracy`` (balanced, held-out recordings), ``train_accuracy``,
    ``test_windows`` ([real, fake]).

    Args:
        real: ``(N, 1, n_mels, T)`` windows labelled 0.
        fake: ``(K, 1, n_mels, T)`` windows labelled 1.
        real_groups, fake_groups: ``(N,)`` / ``(K,)`` recording ids, or None for a random split.
        seed: fixes the split, the initial weights and the batches.
    """
    generator = torch.Generator().manual_seed(int(seed))
    held = held_out(len(real), len(fake), real_groups, fake_groups, test_fraction, generator)
    train = [x[~h].float() for x, h in zip((real, fake), held)]
    test = [x[h].float() for x, h in zip((real, fake), held)]
    # The initial weights from the seed, without leaving a trace in the caller's global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = WindowClassifier()
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    labels = torch.cat([torch.zeros(batch), torch.ones(batch)])
    with torch.enable_grad():  # callers (evaluate, the benchmark) score under no_grad
        model.train()
        for _ in range(steps):
            picks = [x[torch.randint(len(x), (batch,), generator=generator)] for x in train]  # balanced classes
            loss = nn.functional.binary_cross_entropy_with_logits(model(torch.cat(picks)), labels)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    model.eval()

    def score(parts: list[Tensor]) -> float:
        logits = torch.cat([_logits(model, x) for x in parts])
        return _balanced_accuracy(logits, torch.cat([torch.zeros(len(parts[0])), torch.ones(len(parts[1]))]))

    return {"accuracy": score(test), "train_accuracy": score(train), "test_windows": [len(t) for t in test]}


def two_sample_test(real: Tensor, fake: Tensor, real_groups: Optional[Tensor] = None,
                    fake_groups: Optional[Tensor] = None, seeds: Sequence[int] = DEFAULT_SEEDS,
                    steps: int = TRAIN_STEPS) -> dict[str, Any]:
    """The C2ST of `real` against `fake` over several seeds.

    Args:
        real: ``(N, 1, n_mels, T)`` normalised log-mel windows of music.
        fake: ``(K, 1, n_mels, T)`` generated windows (or, for a floor, other music).
        real_groups: ``(N,)`` recording id of each real window (None: each window its own recording).
        fake_groups: ``(K,)`` ids inherited from the windows the fakes were made from; None for prior
            samples, which are split at random.
        seeds: one classifier per seed.
        steps: optimiser steps per classifier.

    Returns:
        ``accuracy`` (mean balanced accuracy on held-out recordings), ``spread`` (standard deviation over
        the seeds, 0 for one seed), ``accuracies`` (per seed), ``train_accuracy`` (mean), ``windows``
        ([N, K]), ``test_windows`` (held out by the first seed: [real, generated]), ``seeds``.

    Raises:
        ValueError: fewer than two recordings (or windows) on a side, or mismatched shapes.
    """
    if real.shape[1:] != fake.shape[1:] or real.dim() != 4:
        raise ValueError(f"two_sample_test: windows of shapes {tuple(real.shape)} and {tuple(fake.shape)}; "
                         "both must be (N, 1, n_mels, frames) of one shape")
    if not seeds:
        raise ValueError("two_sample_test: no seeds")
    runs = [run_seed(real, fake, real_groups, fake_groups, seed, steps) for seed in seeds]
    acc = torch.tensor([r["accuracy"] for r in runs], dtype=torch.float64)
    return {"accuracy": float(acc.mean()), "spread": float(acc.std(correction=1)) if len(acc) > 1 else 0.0,
            "accuracies": acc.tolist(), "train_accuracy": sum(r["train_accuracy"] for r in runs) / len(runs),
            "windows": [len(real), len(fake)], "test_windows": runs[0]["test_windows"], "seeds": [int(s) for s in seeds]}


def residual_covariance(x: Tensor, x_hat: Tensor, diagonal: bool = False) -> tuple[Tensor, Tensor]:
    """Mean ``(M,)`` and covariance ``(M, M)`` over mel bins of the residual ``x - x_hat``, pooled over
    every frame of every window (float64): the moments a decoder's output misses."""
    rows = (x - x_hat).double().squeeze(1).transpose(1, 2).reshape(-1, x.shape[-2])  # (N*T, M)
    mean = rows.mean(dim=0)
    cov = torch.cov(rows.T, correction=0)
    return mean, (torch.diag(torch.diagonal(cov)) if diagonal else cov)


def moment_matched_noise(x_hat: Tensor, mean: Tensor, cov: Tensor, generator: torch.Generator) -> Tensor:
    """``x_hat`` plus Gaussian noise of the residual's mean and covariance over mel bins, independent
    from frame to frame: the second moments of each frame match the music's (for a decoder whose
    residual is uncorrelated with its output, as an MSE-optimal one's is), with no structure beyond them.

    Args:
        x_hat: ``(N, 1, M, T)`` decoder outputs (alpha 0).
        mean, cov: from :func:`residual_covariance`.
    """
    n, _, m, t = x_hat.shape
    eigval, eigvec = torch.linalg.eigh(cov.double())
    root = eigvec * eigval.clamp_min(0).sqrt()  # (M, M): root @ root.T = cov, also for a singular cov
    draws = torch.randn(n * t, m, generator=generator, dtype=torch.float64) @ root.T + mean  # (N*T, M)
    noise = draws.reshape(n, t, m).transpose(1, 2).unsqueeze(1)  # (N*T, M) -> (N, 1, M, T)
    return x_hat + noise.to(x_hat.dtype)


def noise_control(real: Tensor, x: Tensor, x_hat: Tensor, real_groups: Optional[Tensor] = None,
                  groups: Optional[Tensor] = None, seeds: Sequence[int] = DEFAULT_SEEDS,
                  diagonal: bool = False, steps: int = TRAIN_STEPS) -> dict[str, Any]:
    """The control: :func:`two_sample_test` of `real` against :func:`moment_matched_noise` on `x_hat`,
    the noise fitted on ``x - x_hat``. ``passed``: accuracy >= CONTROL_GOAL, i.e. the test is strong
    enough to tell a noise generator that matches second moments from music.

    Args:
        real: ``(N, 1, M, T)`` music the control is told from (other recordings than `x`'s).
        x, x_hat: ``(K, 1, M, T)`` inputs and their alpha-0 reconstructions.
        real_groups, groups: recording ids of `real` and of `x`.
        diagonal: per-bin variances only, instead of the full covariance over mel bins.
        steps: optimiser steps per classifier.
    """
    mean, cov = residual_covariance(x, x_hat, diagonal)
    fake = moment_matched_noise(x_hat, mean, cov, torch.Generator().manual_seed(12345))
    found = two_sample_test(real, fake, real_groups, groups, seeds, steps)
    return {**found, "goal": CONTROL_GOAL, "passed": found["accuracy"] >= CONTROL_GOAL,
            "covariance": "diagonal" if diagonal else "full"}
