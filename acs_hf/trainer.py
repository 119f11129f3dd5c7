"""ACSTrainer: QAT that trains every round on a freshly selected coreset.

At the start of epoch 0 and every ``selection_interval`` epochs, the whole training set is scored
(un-augmented view), a registered selector picks the coreset, and the fixed-length
:class:`~acs_hf.sampler.CoresetSampler` swaps its contents before the epoch's batches are drawn.
Selection lives in :class:`~acs_hf.selection_state.SelectionState`; here are the Trainer overrides.

The contract this relies on (tested against the installed transformers in ``tests/test_trainer.py``):
**the Trainer calls ``on_epoch_begin`` before it iterates the epoch's train dataloader**, so a
selection made there is the one the epoch trains on.
"""

from __future__ import annotations

import logging
import os
import warnings
from operator import attrgetter
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .arguments import ACSArguments
from .checkpoint_folders import PAIRING_KEY, check_checkpoints_ahead, run_identity
from .consistency import check_same_across_processes
from .qat_trainer import QATTrainer
from .reporting import SelectionReporter
from .selection_state import SelectionState
from .upstream import is_damaged_file_error, trainer_output_dir

__all__ = ["ACSTrainer"]

logger = logging.getLogger(__name__)


def _from_selection(path: str, doc: str) -> property:
    return property(lambda self: attrgetter(path)(self.selection), doc=doc)


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
        report_selection: add a :class:`~acs_hf.reporting.SelectionReporter` (JSONL, subsets, plot).
        data_fingerprint: identifies the training set as indexed (``acs_hf.data`` computes one from
            the ``datasets`` fingerprint, N and the labels); a resume on other data is refused.
            Default: the ``datasets`` fingerprint of ``train_dataset`` when it has one.
        *args, **kwargs: as for ``transformers.Trainer``; ``model`` is prepared with
            :func:`acs_hf.quantize_model`, batches are dicts with ``pixel_values`` and ``labels``.

    A selector with ``selects_all`` (``full``) trains on all data in the Trainer's own order.
    """

    def __init__(
        self,
        *args: Any,
        acs_args: ACSArguments | None = None,
        teacher_model: nn.Module | None = None,
        score_dataset: Dataset | None = None,
        report_selection: bool = True,
        data_fingerprint: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.acs_args = acs_args = acs_args or ACSArguments()
        super().__init__(
            *args, qat_args=acs_args, teacher_model=teacher_model, calibration_dataset=score_dataset, **kwargs
        )
        if self.train_dataset is None:
            raise ValueError("ACSTrainer needs a train_dataset")
        self.selection = SelectionState(self, acs_args, self.train_dataset, score_dataset, data_fingerprint)
        self._resume_epochs: int | None = None  # epochs done by a checkpoint of another process count
        if not self.selector.selects_all:
            self.add_callback(self.selection)  # selects at on_epoch_begin
            if report_selection:
                self.add_callback(SelectionReporter())

    selector = _from_selection("selector", "The round's selector (``acs_args.create_selector()``).")
    subset = _from_selection("subset", "The current coreset (dataset indices), once selected or restored.")
    history = _from_selection("history", "One record per selection round (what SelectionReporter writes).")
    selection_round = _from_selection("selection_round", "Rounds selected so far (restored on resume).")
    selected_epoch = _from_selection("selected_epoch", "The epoch of the current subset.")
    num_samples = _from_selection("num_samples", "N, the size of the training set.")
    num_selected = _from_selection("num_selected", "The coreset size (N for ``full``).")
    data_fingerprint = _from_selection("data_fingerprint", "Identifies the training set as indexed.")
    run_id = _from_selection("run_id", "The run's id, kept by its resumes (set when training starts).")
    score_dataset = _from_selection("scorer.score_dataset", "The training set under the eval transform.")
    teacher_cache = _from_selection("scorer.teacher_cache", "The teacher cache, once the first round built it.")

    def select(self, epoch: int, num_epochs: float) -> Tensor:
        """Run a selection round for ``epoch`` now (see :meth:`SelectionState.select`)."""
        return self.selection.select(epoch, num_epochs)

    def _get_train_sampler(self, train_dataset=None):
        if self.selector.selects_all:
            return super()._get_train_sampler(train_dataset)
        return self.selection.make_sampler(self.args.data_seed if self.args.data_seed is not None else self.args.seed)

    @property
    def calibration_batch_size(self) -> int:
        return self.acs_args.score_batch_size or self.args.per_device_eval_batch_size

    def train(self, *args: Any, **kwargs: Any):
        # Different data on some process (another seed, folder or cache) would select by index
        # into different images: refuse before any work.
        check_same_across_processes("training data fingerprint", str(self.data_fingerprint))
        try:
            return super().train(*args, **kwargs)
        finally:
            self.selection.scorer.close()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.selection.scorer.training_scores is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        self.selection.scorer.record_training_batch(inputs, outputs["logits"])
        return (loss, outputs) if return_outputs else loss

    def teacher_logits(self, inputs: dict[str, Any]) -> Tensor:
        logits = super().teacher_logits(inputs)
        self.selection.scorer.remember_teacher_logits(logits)
        return logits

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        # The selection state goes into the checkpoint folder first: the Trainer writes trainer_state.json
        # and rotates old checkpoints only after it, so a crash in between never leaves an incomplete newest
        # checkpoint with the last complete one already deleted. The save first clears a stale folder of
        # this step (or refuses another save's), and no process writes there before that (the barrier).
        if self.subset is not None:
            records = self.selection.scorer.training_records()  # a collective: every process's records
            if self.args.should_save:
                checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                folder = os.path.join(trainer_output_dir(self, trial), checkpoint)
                identity = self.selection.save(folder, self.state.global_step, self.accelerator.num_processes, records)
                self.state.stateful_callbacks[PAIRING_KEY] = {"args": {}, "attributes": identity}
            self.accelerator.wait_for_everyone()
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.selector.selects_all:  # checks first: a refused resume touches nothing
            self._resume_epochs = self.selection.load(resume_from_checkpoint, self.accelerator.num_processes)
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except Exception as e:  # safetensors and torch raise several types for a damaged file
            if not is_damaged_file_error(e):
                raise
            raise ValueError(
                f"checkpoint {resume_from_checkpoint} cannot be loaded ({type(e).__name__}: {e}); it is damaged: "
                "resume from an earlier checkpoint"
            ) from e

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ):
        self.selection.begin_training(num_update_steps_per_epoch)
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
            self.selection.begin_run(run_identity(resume_from_checkpoint))  # a resume continues its run
            if resume_from_checkpoint is not None and self.args.save_strategy != "no":
                output_dir, step = trainer_output_dir(self, trial), self.state.global_step
                check_checkpoints_ahead(
                    output_dir, resume_from_checkpoint, step, self.accelerator.num_processes, self.run_id
                )
        return epochs_trained, steps_in_epoch

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self._resume_epochs is not None and self.lr_scheduler is not None:
            # The saved schedule counted the old steps; continue the new one at the same epoch.
            from torch.optim.lr_scheduler import LambdaLR

            if not isinstance(self.lr_scheduler, LambdaLR):
                raise ValueError(
                    f"resuming on another process count needs a LambdaLR schedule (every lr_scheduler_type of "
                    f"transformers), got {type(self.lr_scheduler).__name__}; relaunch on the original count"
                )
            # One public step() from the step before sets every group's LR (and get_last_lr()) for
            # global_step; torch warns that no optimizer step came first, which is the point here.
            self.lr_scheduler.last_epoch = self.state.global_step - 1
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                self.lr_scheduler.step()
