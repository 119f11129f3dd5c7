"""What selection keeps between rounds: the current coreset, the round counters and the history.

:class:`SelectionState` is plain state: no trainer, no files, no collectives. Like ``transformers``'
``ExportableState`` it round-trips through :meth:`~SelectionState.state_dict` and
:meth:`~SelectionState.load_state_dict`; :mod:`acs_hf.training.checkpoint_state` writes and reads
that dict in a checkpoint, :class:`~acs_hf.training.rounds.RoundRunner` makes the rounds that
:meth:`~SelectionState.take` records, and the fixed-length sampler it keeps follows every change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .sampler import CoresetSampler

__all__ = ["SelectionState"]


@dataclass
class SelectionState:
    """The coreset of the current round and what came before it.

    Attributes:
        subset: the current coreset (dataset indices), once selected or restored.
        selected_epoch: the epoch ``subset`` was selected for.
        selection_round: rounds selected so far (the next round's record says ``round + 1``).
        history: one record per round (what :class:`~acs_hf.SelectionReporter` writes).
        sampler: the training sampler over ``subset``, once :meth:`make_sampler` built it.
    """

    subset: torch.Tensor | None = None
    selected_epoch: int | None = None
    selection_round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    sampler: CoresetSampler | None = field(default=None, repr=False)

    def is_due(self, epoch: int, interval: int, dynamic: bool) -> bool:
        """Whether a round selects at the start of ``epoch``: the first one, then every ``interval``
        epochs for a dynamic selector. A resume inside an epoch finds that epoch's subset restored."""
        if epoch == self.selected_epoch:
            return False
        return self.subset is None or (dynamic and epoch % interval == 0)

    def make_sampler(self, num_selected: int, seed: int) -> CoresetSampler:
        """The fixed-length sampler of the coreset (holding the restored subset, after a resume)."""
        self.sampler = CoresetSampler(num_selected, seed)
        if self.subset is not None:
            self.sampler.set_subset(self.subset)
        return self.sampler

    def take(self, subset: torch.Tensor, epoch: int, record: dict[str, Any]) -> None:
        """Make ``subset`` the coreset of ``epoch`` and ``record`` its round's history entry."""
        self.subset, self.selected_epoch = subset, epoch
        self.selection_round += 1
        self.history.append(record)
        if self.sampler is not None:  # else the sampler takes the subset when it is built
            self.sampler.set_subset(subset)

    def state_dict(self) -> dict[str, Any]:
        """What a resume restores (the sampler is rebuilt from ``subset``)."""
        return {
            "subset": self.subset,
            "selected_epoch": self.selected_epoch,
            "selection_round": self.selection_round,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` gave (the sampler, once built, switches to the subset)."""
        self.subset, self.selected_epoch = state["subset"], state["selected_epoch"]
        self.selection_round, self.history = state["selection_round"], list(state["history"])
        if self.sampler is not None and self.subset is not None:
            self.sampler.set_subset(self.subset)
