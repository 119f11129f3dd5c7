"""The fixed-length coreset sampler that ACSTrainer hands to the Trainer's dataloader."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ..selection import selection_generator

__all__ = ["CoresetSampler", "subset_hash"]


def subset_hash(indices: torch.Tensor) -> str:
    """Short content hash of a subset (hex), equal on every process iff the subsets are equal."""
    return hashlib.sha256(indices.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


class CoresetSampler(Sampler[int]):
    """Fixed-length sampler over the current coreset, reshuffled by (seed, epoch).

    The Trainer builds its train dataloader once and fixes steps per epoch, the LR schedule and the
    progress bar from its length, so ``len()`` never changes (``round(fraction * N)``); only the
    contents do, through :meth:`set_subset`. ``set_epoch`` is idempotent and the order is a pure
    function of (seed, epoch, subset): every process draws the same order (accelerate shards the
    batches) and a mid-epoch resume skips exactly the batches already trained.
    """

    def __init__(self, num_selected: int, seed: int) -> None:
        self.num_selected = num_selected
        self.seed = seed
        self.epoch = 0
        self.subset: torch.Tensor | None = None

    def set_subset(self, subset: torch.Tensor) -> None:
        if subset.numel() != self.num_selected:
            raise ValueError(f"subset has {subset.numel()} indices, the sampler is fixed at {self.num_selected}")
        self.subset = subset.to(torch.int64).cpu()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_selected

    def __iter__(self) -> Iterator[int]:
        if self.subset is None:
            raise RuntimeError("CoresetSampler: no subset selected yet (selection runs at on_epoch_begin)")
        g = selection_generator(self.seed, self.epoch)
        return iter(self.subset[torch.randperm(self.num_selected, generator=g)].tolist())
