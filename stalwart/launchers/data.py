"""Deterministic, position-tracked, resumable iteration over the data.

The data position is the index of the next global batch. Batch `i` depends only on `i` (and the
seed), never on what ran before, so a run restored at position `p` sees exactly the batches an
uninterrupted run would, and a rolled-back run can skip a range of positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch


@dataclass
class DataPosition:
    """What a checkpoint records about the data: the next batch index and the ranges to skip."""

    position: int = 0
    skip: list[tuple[int, int]] = field(default_factory=list)  # half-open [start, end) ranges

    def advance_past_skips(self) -> None:
        moved = True
        while moved:
            moved = False
            for start, end in self.skip:
                if start <= self.position < end:
                    self.position = end
                    moved = True

    def to_dict(self) -> dict:
        return {"position": self.position, "skip": [list(r) for r in self.skip]}

    @classmethod
    def from_dict(cls, data: dict | None) -> "DataPosition":
        if not data:
            return cls()
        return cls(int(data["position"]), [(int(a), int(b)) for a, b in data.get("skip", [])])


class IndexedBatches:
    """Adapts a map-style dataset into `batch(index) -> batch` for one rank.

    Each epoch is a seeded permutation of the dataset; global batch `i` covers `batch_size *
    world_size` consecutive items of it, and this rank takes its `batch_size` slice.
    """

    def __init__(self, dataset: Sequence, batch_size: int, rank: int, world_size: int, *, shuffle: bool = True,
                 seed: int = 0, collate: Callable[[list], Any] | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.collate = collate or _default_collate
        self.per_epoch = len(dataset) // (batch_size * world_size)
        if self.per_epoch == 0:
            raise ValueError(f"dataset of {len(dataset)} items is smaller than one global batch "
                             f"({batch_size} x {world_size} ranks)")
        self._perm_epoch = -1
        self._perm: list[int] = []

    def __call__(self, index: int) -> Any:
        epoch, within = divmod(index, self.per_epoch)
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(len(self.dataset), generator=g).tolist()
            else:
                self._perm = list(range(len(self.dataset)))
            self._perm_epoch = epoch
        start = (within * self.world_size + self.rank) * self.batch_size
        return self.collate([self.dataset[i] for i in self._perm[start:start + self.batch_size]])


def _default_collate(items: list) -> Any:
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(items)
    if isinstance(first, (tuple, list)):
        return type(first)(_default_collate(list(col)) for col in zip(*items))
    if isinstance(first, dict):
        return {k: _default_collate([it[k] for it in items]) for k in first}
    return torch.as_tensor(items)


def iterate(batch_at: Callable[[int], Any], data: DataPosition, start_step: int,
            max_steps: int | None) -> Iterator[tuple[int, Any]]:
    """Yield (step, batch) from `start_step + 1`, advancing `data` and skipping its ranges.

    `data.position` always names the next batch to fetch, so a checkpoint taken after the step
    that consumed batch `i` records position `i + 1`.
    """
    step = start_step
    while max_steps is None or step < max_steps:
        data.advance_past_skips()
        index = data.position
        batch = batch_at(index)
        data.position = index + 1
        step += 1
        yield step, batch
