"""The statistics of the training pass (``reuse_training_scores``).

:class:`TrainingScores` records each training batch's per-sample statistics at no extra forward;
the next selection round gathers them from every process, and every checkpoint keeps them
(:mod:`acs_hf.training.checkpoint_state`), so that a resumed round reuses what the interrupted
run would have reused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from accelerate import Accelerator

from ..data.batch import INDEX_KEY
from ..selection import batch_statistics
from .consistency import ORDER_KEY, gather_statistics

__all__ = ["TrainingScores"]


class TrainingScores:
    """Per-sample statistics taken from the training pass, at no extra forward.

    ACSTrainer records each training batch's student logits (and the distillation teacher's
    probabilities, for ``ds``) under the batch's dataset indices; at the next selection round
    :meth:`collect` gathers them from every process. A sample trained on several times, on any
    process, keeps its latest values: records are numbered in training order, the same on every
    process (each trains the same number of batches per step). The statistics are of the
    *training* view (augmented, train mode), not the un-augmented eval view of the scoring pass.
    """

    def __init__(self, stats: Sequence[str]) -> None:
        self.stats = tuple(stats)
        self.clear()

    def clear(self) -> None:
        self._local: dict[str, list[torch.Tensor]] = {k: [] for k in (*self.stats, INDEX_KEY, ORDER_KEY)}
        self._records = 0

    def state_dict(self, num_samples: int, accelerator: Accelerator) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps (a collective, the same on every process): the indices of the
        samples trained on since :meth:`clear` (:data:`INDEX_KEY`) and each one's latest statistics."""
        stats, seen = self.collect(num_samples, accelerator)
        index = seen.nonzero().flatten()
        return {INDEX_KEY: index, **{name: stats[name][index] for name in self.stats}}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None, keep: bool = True) -> None:
        """Restart from a :meth:`state_dict` (``None``: no records), its records older than any made
        after; with ``keep=False`` (every process but one) hold none: :meth:`collect` gathers them from
        the one that keeps them. Call on every process: all must number their records alike."""
        self.clear()
        self._records = 1
        missing = [name for name in (INDEX_KEY, *self.stats) if state is not None and name not in state]
        if missing:
            raise ValueError(f"training-pass scores lack {missing}; these statistics need {list(self.stats)}")
        if state is not None and keep:
            for name in (*self.stats, INDEX_KEY):
                self._local[name].append(state[name])
            self._local[ORDER_KEY].append(torch.zeros_like(state[INDEX_KEY]))

    @torch.no_grad()
    def record(
        self, index: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, teacher_probs: torch.Tensor | None
    ) -> None:
        values = batch_statistics(self.stats, logits.detach(), labels, teacher_probs)
        for name, value in values.items():
            self._local[name].append(value.float().cpu())
        self._local[INDEX_KEY].append(index.detach().long().cpu())
        self._local[ORDER_KEY].append(torch.full((index.numel(),), self._records, dtype=torch.long))
        self._records += 1

    def collect(self, num_samples: int, accelerator: Accelerator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``(stats, seen)``: ``[N]`` statistics (NaN where not trained on) and the mask of samples
        trained on since :meth:`clear`, on every process (a collective). Later records win."""
        local = dict(self._local)
        rows = sum(i.numel() for i in local[INDEX_KEY])
        local["labels"] = [torch.zeros(rows, dtype=torch.long)]  # placeholder: labels come from the data
        stats = gather_statistics(local, num_samples, accelerator, expected=torch.zeros(num_samples, dtype=torch.bool))
        stats.pop("labels")
        seen = ~torch.isnan(stats[self.stats[0]]) if self.stats else torch.zeros(num_samples, dtype=torch.bool)
        return stats, seen
