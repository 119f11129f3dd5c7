"""What a selection round reads of the training around it, passed explicitly.

The round runner and its statistics never hold the trainer: :class:`~acs_hf.ACSTrainer` builds
one :class:`RoundContext` from itself, and a test builds one from a model and a list of batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import TrainingArguments

__all__ = ["RoundContext", "score_loader_factory"]


@dataclass
class RoundContext:
    """The round's view of the training.

    Args:
        accelerator: devices, autocast and the process group (collectives go through
            :mod:`acs_hf.training.consistency`).
        student: returns the student as it is now (unwrapped from DDP): a getter, since the
            model the round scores is the one training has reached.
        teacher: the frozen FP model, or ``None``.
        make_loader: a loader over a dataset (the score view or a pool of its rows) at the scoring
            batch size, prepared for the processes (each reads its shard).
        teacher_cache_dir: where the teacher cache keeps its shards (``None``: in memory).
    """

    accelerator: Accelerator
    student: Callable[[], nn.Module]
    teacher: nn.Module | None
    make_loader: Callable[[Dataset], DataLoader]
    teacher_cache_dir: str | None = None


def score_loader_factory(
    accelerator: Accelerator, args: TrainingArguments, collate_fn: Callable[[list], Any], batch_size: int
) -> Callable[[Dataset], DataLoader]:
    """:attr:`RoundContext.make_loader` for a Trainer's settings: loaders in dataset order at
    ``batch_size`` per process, with the Trainer's workers and collator, prepared by ``accelerator``."""

    def make_loader(dataset: Dataset) -> DataLoader:
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            collate_fn=collate_fn,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory and args.device.type == "cuda",
        )
        return accelerator.prepare(loader)

    return make_loader
