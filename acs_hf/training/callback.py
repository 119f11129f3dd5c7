"""The Trainer's side of selection: a round at the start of each due epoch, and the ``on_selection`` event.

:class:`SelectionCallback` is the thin ``TrainerCallback`` that connects a
:class:`~acs_hf.training.rounds.RoundRunner` and a
:class:`~acs_hf.training.selection_state.SelectionState` to the Trainer's events. It relies on one
contract of ``transformers.Trainer`` (tested in ``tests/test_trainer.py``): ``on_epoch_begin``
comes before the epoch's train dataloader is iterated, so the subset chosen there is the one the
epoch trains on.

**The on_selection event.** After each round, :func:`dispatch_selection` calls
``on_selection(args, state, control, record=..., subset=..., history=...)`` on every callback of the
trainer that defines it (:class:`~acs_hf.SelectionReporter` does), on every process, in the
callbacks' order: ``record`` is the round's entry in ``history`` (the dict logged under ``acs/``),
``subset`` its dataset indices. It is the only route of that event; ``transformers``'
``CallbackHandler`` has no such event, so it is dispatched here, not through ``call_event``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .rounds import RoundRunner
from .selection_state import SelectionState

__all__ = ["SelectionCallback", "dispatch_selection"]


def dispatch_selection(
    callbacks: Iterable[Any],
    args: TrainingArguments,
    state: TrainerState,
    control: TrainerControl,
    *,
    record: dict[str, Any],
    subset: torch.Tensor,
    history: list[dict[str, Any]],
) -> None:
    """Send the ``on_selection`` event to every callback that defines it (see the module's docstring)."""
    for callback in callbacks:
        on_selection = getattr(callback, "on_selection", None)
        if on_selection is not None:
            on_selection(args, state, control, record=record, subset=subset, history=history)


class SelectionCallback(TrainerCallback):
    """Runs a selection round at ``on_epoch_begin`` when one is due, then points the sampler at the epoch.

    Args:
        selection: the run's selection state (the sampler the Trainer trains from lives there).
        runner: runs the rounds (its selector and ``selection_interval`` say when one is due).
        publish: called with ``(record, subset)`` after each round is taken into ``selection``
            (:class:`~acs_hf.ACSTrainer` dispatches ``on_selection`` and logs the record's numbers).
    """

    def __init__(
        self,
        selection: SelectionState,
        runner: RoundRunner,
        publish: Callable[[dict[str, Any], torch.Tensor], None],
    ) -> None:
        self.selection = selection
        self.runner = runner
        self.publish = publish

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = math.floor(state.epoch + 1e-6)
        interval, dynamic = self.runner.acs_args.selection_interval, self.runner.selector.dynamic
        if self.selection.is_due(epoch, interval, dynamic):
            self.run_round(epoch, state.num_train_epochs)
        self.selection.sampler.set_epoch(epoch)

    def run_round(self, epoch: int, num_epochs: float) -> torch.Tensor:
        """Select the coreset of ``epoch`` now, take it into the state and publish the round."""
        subset, record = self.runner.run(epoch, num_epochs, self.selection)
        self.selection.take(subset, epoch, record)
        self.publish(record, subset)
        return subset
