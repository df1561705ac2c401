"""The training sampler: order and random crops as a pure function of (seed, epoch).

A resumed run must see the same batches as an uninterrupted one. DataLoader workers draw crops
from per-worker random streams that no checkpoint captures; here the sampler draws each
example's crop together with its position in the epoch, from a generator seeded by
(seed, epoch) alone. Fast-forwarding the sampler to the checkpoint's position (what
torchdata's StatefulDataLoader does) then reproduces the rest of the epoch exactly, whatever
the number of workers.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler

#: Crop draws are uniform integers below this; the dataset reduces them modulo its crop range.
DRAW_RANGE = 2**31 - 1


class CropSampler(DistributedSampler):
    """Yields `(index, draw)` pairs: a shuffled epoch of indices, each with a random integer.

    A DistributedSampler subclass, so Lightning keeps it under DDP instead of wrapping it;
    `num_replicas` and `rank` come from the trainer (1 and 0 on one device). Like
    DistributedSampler, an epoch is padded by repeating examples until it divides evenly, so
    every rank takes the same number of steps.

    Args:
        dataset: the training segments.
        seed: with the epoch (`set_epoch`, called by Lightning), fixes order and crops.
        num_replicas: number of processes sharing the epoch.
        rank: this process's share.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.yielded = 0  # pairs handed out in the current epoch
        self._resume_at = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=generator)
        draws = torch.randint(0, DRAW_RANGE, (n,), generator=generator)
        if self.total_size > n:  # pad with the start of the epoch, as DistributedSampler does
            repeats = math.ceil(self.total_size / n)
            order, draws = order.repeat(repeats)[: self.total_size], draws.repeat(repeats)[: self.total_size]
        mine = slice(self.rank, self.total_size, self.num_replicas)
        pairs = list(zip(order[mine].tolist(), draws[mine].tolist()))
        # Taken now, not when the first pair is drawn: a restored iterator that is never
        # advanced (a checkpoint from an epoch's last step) must not pass the skip to the next epoch.
        self.yielded, self._resume_at = self._resume_at, 0
        return self._count(pairs[self.yielded :])

    def _count(self, pairs: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        for pair in pairs:
            self.yielded += 1
            yield pair

    # Stateful (torchdata): the epoch is part of the state because Lightning, resuming
    # mid-epoch, builds the loader's iterator before it calls set_epoch.
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._resume_at = int(state["epoch"]), int(state["yielded"])
        if self._resume_at >= self.num_samples:
            # Saved at an epoch's last step: Lightning goes on with the next epoch using the
            # iterator it builds now, before it calls set_epoch, so that iterator must be the next epoch's.
            self.epoch, self._resume_at = self.epoch + 1, 0
