"""ACSTrainer: QAT that trains every round on a freshly selected coreset (the Trainer overrides).

The selection runtime beside it never holds the trainer: plain state (:mod:`~acs_hf.training.selection_state`),
the round (:mod:`~acs_hf.training.rounds`, given a :class:`~acs_hf.training.round_context.RoundContext` built
here), the Trainer's events (:mod:`~acs_hf.training.callback`), the checkpoint files
(:mod:`~acs_hf.training.checkpoint_state`).
"""

from __future__ import annotations

import logging
from operator import attrgetter
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from ..layout import RunLayout
from ..selection import Selector
from ..utils.upstream import dataset_fingerprint, trainer_output_dir
from .arguments import ACSArguments
from .callback import SelectionCallback, dispatch_selection
from .checkpoint_state import SelectionCheckpointer, continue_schedule
from .checkpoints import PAIRING_KEY
from .consistency import check_same_across_processes
from .qat_trainer import QATTrainer
from .reporting import SelectionReporter
from .round_context import RoundContext, score_loader_factory
from .rounds import RoundRunner
from .selection_state import SelectionState

__all__ = ["ACSTrainer"]

logger = logging.getLogger(__name__)


def _from(path: str, doc: str) -> property:
    return property(lambda self: attrgetter(path)(self), doc=doc)


class ACSTrainer(QATTrainer):
    """:class:`~acs_hf.QATTrainer` on adaptively selected coresets.

    Args:
        acs_args: :class:`~acs_hf.ACSArguments` (selection and the QAT settings it extends).
        teacher_model: frozen FP model for distillation and the DS score.
        score_dataset: the training set under the eval transform, same order and length as
            ``train_dataset``, yielding ``pixel_values``, ``labels`` and ``index``. Needed by every
            selector that scores (all but ``full``); also used for calibration. When it has a
            ``labels`` attribute (an ``[N]`` integer array, as ``acs_hf.data`` views have), the
            label-only selectors (``random_*``) read it and decode no image.
        report_selection: add a :class:`~acs_hf.SelectionReporter` (JSONL, subsets, plot).
        data_fingerprint: identifies the training set as indexed (``acs_hf.data`` computes one from
            the ``datasets`` fingerprint, N and the labels); a resume on other data is refused.
            Default: the ``datasets`` fingerprint of ``train_dataset`` when it has one.
        selector: the run's selector; default ``acs_args.create_selector()`` (built once, here).
        *args, **kwargs: as for ``transformers.Trainer``; ``model`` is prepared with
            :func:`acs_hf.quantize_model`, batches are dicts with ``pixel_values`` and ``labels``.

    A selector with ``selects_all`` (``full``) trains on all data in the Trainer's own order.
    After each round every callback with an ``on_selection`` method receives it (see
    :mod:`acs_hf.training.callback`).
    """

    def __init__(
        self,
        *args: Any,
        acs_args: ACSArguments | None = None,
        teacher_model: nn.Module | None = None,
        score_dataset: Dataset | None = None,
        report_selection: bool = True,
        data_fingerprint: str | None = None,
        selector: Selector | None = None,
        **kwargs: Any,
    ) -> None:
        self.acs_args = acs_args = acs_args or ACSArguments()
        # Calibration reads the score dataset, at the scoring batch size (default: the eval batch size).
        calibration = {"calibration_dataset": score_dataset, "calibration_batch_size": acs_args.score_batch_size}
        super().__init__(*args, qat_args=acs_args, teacher_model=teacher_model, **calibration, **kwargs)
        self.score_batch_size = self.calibration_batch_size
        if self.train_dataset is None:
            raise ValueError("ACSTrainer needs a train_dataset")
        self.selector = selector or acs_args.create_selector()
        n, fingerprint = len(self.train_dataset), dataset_fingerprint(self.train_dataset)
        self.data_fingerprint = data_fingerprint = data_fingerprint or (f"{n}:{fingerprint}" if fingerprint else None)
        self.selection = SelectionState()
        self.rounds = RoundRunner(self._round_context(), acs_args, self.selector, score_dataset, n, data_fingerprint)
        self.checkpointer = SelectionCheckpointer(acs_args.selection_method, acs_args.fraction, n, data_fingerprint)
        self._resume_epochs: int | None = None  # epochs done by a checkpoint of another process count
        self.selection_callback = SelectionCallback(self.selection, self.rounds, self._publish)
        if not self.selector.selects_all:
            self.add_callback(self.selection_callback)  # selects at on_epoch_begin
            if report_selection:
                self.add_callback(SelectionReporter())

    def _round_context(self) -> RoundContext:
        cache_dir = self.acs_args.teacher_cache_dir or str(RunLayout(self.args.output_dir).teacher_cache)
        return RoundContext(
            accelerator=self.accelerator,
            student=lambda: self.accelerator.unwrap_model(self.model),  # the model training has reached
            teacher=self.teacher_model,
            make_loader=score_loader_factory(self.accelerator, self.args, self.data_collator, self.score_batch_size),
            teacher_cache_dir=None if cache_dir == "memory" else cache_dir,
        )

    selection_round = _from("selection.selection_round", "Rounds selected so far (restored on resume).")
    subset = _from("selection.subset", "The current coreset (dataset indices), once selected or restored.")
    selected_epoch = _from("selection.selected_epoch", "The epoch of the current subset.")
    history = _from("selection.history", "One record per selection round (what SelectionReporter writes).")
    num_samples = _from("rounds.num_samples", "N, the size of the training set.")
    num_selected = _from("rounds.num_selected", "The coreset size (N for ``full``).")
    score_dataset = _from("rounds.statistics.score_dataset", "The training set under the eval transform.")
    teacher_cache = _from("rounds.statistics.teacher_cache", "The teacher cache, once the first round built it.")
    run_id = _from("checkpointer.run_id", "The run's id, kept by its resumes (set when training starts).")

    def select(self, epoch: int, num_epochs: float) -> Tensor:
        """Run a selection round for ``epoch`` now (see :class:`~acs_hf.training.rounds.RoundRunner`)."""
        return self.selection_callback.run_round(epoch, num_epochs)

    def _publish(self, record: dict[str, Any], subset: Tensor) -> None:
        event = {"record": record, "subset": subset, "history": self.selection.history}
        dispatch_selection(self.callback_handler.callbacks, self.args, self.state, self.control, **event)
        self.log({f"acs/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def _get_train_sampler(self, train_dataset=None):
        if self.selector.selects_all:
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return self.selection.make_sampler(self.rounds.num_selected, seed)

    def train(self, *args: Any, **kwargs: Any):
        # Different data on some process (another seed, folder or cache) would select by index
        # into different images: refuse before any work.
        check_same_across_processes("training data fingerprint", str(self.data_fingerprint))
        try:
            return super().train(*args, **kwargs)
        finally:
            self.rounds.statistics.close()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.rounds.statistics.training_scores is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        self.rounds.statistics.record_training_batch(inputs, outputs["logits"])
        return (loss, outputs) if return_outputs else loss

    def teacher_logits(self, inputs: dict[str, Any]) -> Tensor:
        logits = super().teacher_logits(inputs)
        self.rounds.statistics.remember_teacher_logits(logits)
        return logits

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        # The selection state goes into the checkpoint folder first: the Trainer writes trainer_state.json
        # and rotates old checkpoints only after it, so a crash in between never leaves an incomplete newest
        # checkpoint with the last complete one already deleted. The save first clears a stale folder of
        # this step (or refuses another save's), and no process writes there before that (the barrier).
        if self.subset is not None:
            records = self.rounds.statistics.training_records()  # a collective: every process's records
            if self.args.should_save:
                step, world_size = self.state.global_step, self.accelerator.num_processes
                folder = RunLayout(trainer_output_dir(self, trial)).checkpoint(step)
                identity = self.checkpointer.save(folder, self.selection, self.selector, records, step, world_size)
                self.state.stateful_callbacks[PAIRING_KEY] = {"args": {}, "attributes": identity}
            self.accelerator.wait_for_everyone()
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.selector.selects_all:  # checks first: a refused resume touches nothing
            world_size = self.accelerator.num_processes
            records, self._resume_epochs = self.checkpointer.restore(
                resume_from_checkpoint, world_size, self.selection, self.selector
            )
            self.rounds.statistics.restore_training_records(records, str(resume_from_checkpoint))
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # a damaged file is refused there

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ):
        self.checkpointer.steps_per_epoch = num_update_steps_per_epoch
        epochs_trained, steps_in_epoch = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if self._resume_epochs is not None:
            # An epoch-boundary checkpoint of another process count: the Trainer divided the old
            # step count by the new steps per epoch; count the epochs it really completed instead.
            epochs_trained, steps_in_epoch = self._resume_epochs, 0
            self.state.global_step = epochs_trained * num_update_steps_per_epoch
            logger.info("Resuming on a new process count at epoch %d (step %d)", epochs_trained, self.state.global_step)
        if not self.selector.selects_all:
            saving = self.args.save_strategy != "no"
            output_dir, world_size = trainer_output_dir(self, trial), self.accelerator.num_processes
            self.checkpointer.begin_run(resume_from_checkpoint, output_dir, self.state.global_step, world_size, saving)
        return epochs_trained, steps_in_epoch

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self._resume_epochs is not None and self.lr_scheduler is not None:
            continue_schedule(self.lr_scheduler, self.state.global_step)  # it counted the old steps
