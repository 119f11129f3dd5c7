"""The selection state of an ACS run: its rounds, what they selected, and its checkpoint files.

:class:`SelectionState` owns everything selection keeps between the Trainer's calls: the coreset
sampler and the current subset, the round (score with its :class:`~acs_hf.round_scores.RoundScorer`,
select, check across processes, record), the round counters and the history. ACSTrainer holds one
and calls it from its Trainer overrides; like ``transformers``' ``ExportableState`` it round-trips
through :meth:`~SelectionState.state_dict` and :meth:`~SelectionState.load_state_dict`.

Into ``checkpoint-<step>/``, before the Trainer's own files, :meth:`~SelectionState.save` writes:

- ``acs_subset.npy``: the current coreset (and ``acs_selector_subset.npy`` for stateful selectors);
- ``acs_training_scores.npz`` (with ``reuse_training_scores``): the training-pass records of every
  process since the last round, which the next round reuses;
- ``acs_state.json``: round counters, the selection history, the hash of the subset, the process
  count and optimizer steps per epoch it was taken with, the fingerprint of the training data, and
  the identity of the save: the run's id (random, made once per run and kept by its resumes) and
  an id of this save, also recorded in the Trainer's ``trainer_state.json``.

What makes such a folder complete and safe to resume is :mod:`acs_hf.checkpoint_folders`' job.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

from ._io import atomic_save_npy, atomic_write_json
from .arguments import ACSArguments
from .checkpoint_folders import (
    SELECTOR_STATE_NAME,
    STATE_NAME,
    SUBSET_NAME,
    check_resume_layout,
    check_same_run,
    clear_for_save,
    read_array,
    read_state,
)
from .consistency import processes_by_value
from .images import ImageView
from .round_scores import RoundScorer
from .sampler import CoresetSampler, subset_hash
from .selection import coreset_size, selection_generator
from .training_scores import read_records, save_records
from .upstream import dataset_fingerprint
from .view_cache import split_transform

if TYPE_CHECKING:
    from .trainer import ACSTrainer

__all__ = ["SelectionState"]

logger = logging.getLogger(__name__)


class SelectionState(TrainerCallback):
    """The selection side of an :class:`~acs_hf.ACSTrainer`: rounds, their inputs and their history.

    Args:
        trainer: the trainer it selects for; read (accelerator, args, models, callbacks), never written.
        acs_args: the selection settings.
        train_dataset: the training set, indexed as the coreset indexes it.
        score_dataset: the same examples under the eval transform (see :class:`~acs_hf.ACSTrainer`).
        data_fingerprint: identifies the training set; default: its ``datasets`` fingerprint.
    """

    def __init__(
        self,
        trainer: ACSTrainer,
        acs_args: ACSArguments,
        train_dataset: Dataset,
        score_dataset: Dataset | None,
        data_fingerprint: str | None,
    ) -> None:
        self.trainer = trainer
        self.acs_args = acs_args
        self.selector = acs_args.create_selector()
        self.num_samples = len(train_dataset)
        fingerprint = dataset_fingerprint(train_dataset)
        self.data_fingerprint = data_fingerprint or (f"{self.num_samples}:{fingerprint}" if fingerprint else None)
        self.scorer = RoundScorer(
            trainer, acs_args, self.selector, score_dataset, self.num_samples, self.data_fingerprint
        )
        self._check_inputs(score_dataset, trainer.teacher_model is not None)
        self.num_selected = (
            self.num_samples if self.selector.selects_all else coreset_size(self.num_samples, acs_args.fraction)
        )
        self.run_id: str | None = None
        self.steps_per_epoch: int | None = None
        self.selection_round = 0
        self.selected_epoch: int | None = None
        self.subset: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []
        self.sampler: CoresetSampler | None = None

    def _check_inputs(self, score_dataset: Dataset | None, has_teacher: bool) -> None:
        """Refuse, at construction, a selection its inputs cannot make."""
        args = self.acs_args
        if not self.selector.selects_all and score_dataset is None:
            raise ValueError(
                f"selection_method={args.selection_method!r} needs score_dataset: the training set under "
                "the eval transform (see acs_hf.data)"
            )
        if score_dataset is not None and len(score_dataset) != self.num_samples:
            raise ValueError(
                f"score_dataset has {len(score_dataset)} examples, train_dataset {self.num_samples}; "
                "they must be the same examples in the same order"
            )
        if args.score_cache_dir and self.selector.required_stats:  # refused now, not at the first round
            if not isinstance(score_dataset, ImageView):
                raise ValueError(
                    f"score_cache_dir={args.score_cache_dir!r} needs a score_dataset from acs_hf.data "
                    f"(ImageView), got {type(score_dataset).__name__}; unset score_cache_dir for other datasets"
                )
            split_transform(score_dataset.transform)
        if self.selector.needs_teacher and not has_teacher:
            raise ValueError(
                f"selection_method={args.selection_method!r} (schedule {args.evs_schedule!r}) uses the "
                "disagreement score and needs teacher_model (the FP model the student started from)"
            )
        if (args.score_pool_fraction < 1 or args.reuse_training_scores) and self.scorer.dataset_labels() is None:
            raise ValueError(
                "score_pool_fraction < 1 and reuse_training_scores need every training label without decoding: "
                f"a score_dataset with a `labels` array of length {self.num_samples} (acs_hf.data's views have one)"
            )

    # ------------------------------------------------------------------ data
    def make_sampler(self, seed: int) -> CoresetSampler:
        """The fixed-length sampler of the coreset (holding the restored subset, after a resume)."""
        self.sampler = CoresetSampler(self.num_selected, seed)
        if self.subset is not None:
            self.sampler.set_subset(self.subset)
        return self.sampler

    # ------------------------------------------------------------------ a round
    def on_epoch_begin(self, args, state, control, **kwargs):
        self.begin_epoch(math.floor(state.epoch + 1e-6), state.num_train_epochs)

    def begin_epoch(self, epoch: int, num_epochs: float) -> None:
        """Select if a round is due at ``epoch``, then point the sampler at the epoch."""
        due = epoch % self.acs_args.selection_interval == 0
        # A resume inside an epoch finds that epoch's subset restored from the checkpoint.
        if epoch != self.selected_epoch and (self.subset is None or (due and self.selector.dynamic)):
            self.select(epoch, num_epochs)
        self.sampler.set_epoch(epoch)

    def select(self, epoch: int, num_epochs: float) -> torch.Tensor:
        """Score the round's candidates (every sample, by default), select the coreset for
        ``epoch`` and hand it to the sampler."""
        start = time.perf_counter()
        timings: dict[str, float] = {}
        generator = selection_generator(self.acs_args.selection_seed, epoch)
        labels = self.scorer.dataset_labels()
        candidates = None
        if labels is not None and not self.selector.required_stats:  # label-only selectors: no image decoded
            stats = {"labels": labels}
        else:
            stats, candidates = self.scorer.score(epoch, labels, generator, timings)
        scoring_seconds = time.perf_counter() - start
        self._hint_score_cache(timings, scoring_seconds)
        subset = self.selector.select(stats, epoch, max(num_epochs, 1), self.acs_args.fraction, generator, candidates)
        timings["select_seconds"] = time.perf_counter() - start - scoring_seconds
        self._check_same_subset(subset)
        previous = self.subset
        self._take(subset, epoch)
        record = self._record(epoch, num_epochs, subset, previous, stats, scoring_seconds)
        record.update({k: round(v, 3) for k, v in timings.items()})
        self._publish(record, subset)
        logger.info(
            "ACS round %d at epoch %d: %d of %d samples selected (%s), scoring %.1fs",
            self.selection_round, epoch, subset.numel(), self.num_samples, record["subset_hash"], scoring_seconds,
        )  # fmt: skip
        return subset

    def _hint_score_cache(self, timings: dict[str, float], scoring_seconds: float) -> None:
        if (
            self.selection_round == 0
            and self.selector.dynamic
            and not self.acs_args.score_cache_dir
            and timings.get("data_seconds", 0.0) > 0.5 * scoring_seconds
        ):
            logger.info(
                "ACS scoring waited %.1f of %.1f s for images; --score_cache_dir DIR decodes them only in the first "
                "round (see ACSArguments.score_cache_dir for the disk it needs)",
                timings["data_seconds"], scoring_seconds,
            )  # fmt: skip

    def _take(self, subset: torch.Tensor, epoch: int) -> None:
        self.subset = subset
        self.selected_epoch = epoch
        self.selection_round += 1
        if self.sampler is not None:  # else the sampler takes self.subset when it is built
            self.sampler.set_subset(subset)

    def _publish(self, record: dict[str, Any], subset: torch.Tensor) -> None:
        """Append the round to the history, tell the callbacks that listen, and log its numbers."""
        trainer = self.trainer
        self.history.append(record)
        for callback in trainer.callback_handler.callbacks:
            if hasattr(callback, "on_selection"):
                callback.on_selection(
                    trainer.args, trainer.state, trainer.control, record=record, subset=subset, history=self.history
                )
        trainer.log(
            {f"acs/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )

    def _check_same_subset(self, subset: torch.Tensor) -> None:
        """All processes must train on the same subset: compare hashes (one small gather)."""
        groups = processes_by_value(subset_hash(subset))
        if groups:
            raise RuntimeError(
                "ACS selection diverged across processes: ranks "
                + " vs ".join(str(ranks) for ranks in groups.values())
                + " selected different subsets; refusing to train on inconsistent data"
            )

    def _record(
        self,
        epoch: int,
        num_epochs: float,
        subset: torch.Tensor,
        previous: torch.Tensor | None,
        stats: dict[str, torch.Tensor],
        scoring_seconds: float,
    ) -> dict[str, Any]:
        labels = stats["labels"]
        overlap = None if previous is None else np.intersect1d(previous.numpy(), subset.numpy()).size / subset.numel()
        record: dict[str, Any] = {
            "epoch": epoch,
            "round": self.selection_round,
            "method": self.acs_args.selection_method,
            **self.selector.describe(epoch, max(num_epochs, 1)),
            "num_selected": int(subset.numel()),
            "num_samples": self.num_samples,
            "world_size": self.trainer.accelerator.num_processes,
            "subset_hash": subset_hash(subset),
            "overlap_with_previous": overlap,
            "scoring_seconds": round(scoring_seconds, 3),
            "class_counts": torch.bincount(labels[subset], minlength=int(labels.max()) + 1).tolist(),
        }
        for name in ("evs", "ds"):
            if name in stats:  # over the scored samples (NaN outside a candidate pool)
                v = stats[name]
                scored = v[~torch.isnan(v)]
                record.update(
                    {f"{name}_mean": float(scored.mean()), f"{name}_min": float(scored.min()),
                     f"{name}_max": float(scored.max())}
                )  # fmt: skip
                record[f"{name}_selected_mean"] = float(v[subset].nanmean())
        return record

    # ------------------------------------------------------------------ checkpoints
    def begin_training(self, steps_per_epoch: int) -> None:
        """Note the optimizer steps per epoch (saved with each checkpoint)."""
        self.steps_per_epoch = steps_per_epoch

    def begin_run(self, run_id: str) -> None:
        """Note the run's identity (a resume continues its run)."""
        self.run_id = run_id

    def state_dict(self, training_scores: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """What a resume restores: the subset, the round counters, the history, the selector's state,
        and ``training_scores`` (the scorer's ``training_records()``, a collective, so gathered by the caller)."""
        return {
            "subset": self.subset,
            "selected_epoch": self.selected_epoch,
            "selection_round": self.selection_round,
            "history": self.history,
            "selector": self.selector.state_dict(),
            "training_scores": training_scores,
        }

    def load_state_dict(self, state: dict[str, Any], checkpoint: str = "the state") -> None:
        """Take back what :meth:`state_dict` gave (the sampler, once built, switches to the subset)."""
        if state.get("selector"):
            self.selector.load_state_dict(state["selector"])
        self.subset, self.selected_epoch = state["subset"], state["selected_epoch"]
        self.selection_round, self.history = state["selection_round"], state["history"]
        self.scorer.restore_training_records(state.get("training_scores"), checkpoint)
        if self.sampler is not None:
            self.sampler.set_subset(self.subset)

    def save(
        self,
        checkpoint_dir: str | os.PathLike,
        global_step: int,
        world_size: int,
        training_scores: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, str]:
        """Write the selection state into ``checkpoint_dir`` (the saving processes only), with
        ``training_scores`` as :meth:`state_dict` takes them; returns the save's identity, for the
        Trainer's ``trainer_state.json``."""
        ckpt = Path(checkpoint_dir)
        clear_for_save(ckpt, self.run_id, world_size, global_step)
        steps_per_epoch = self.steps_per_epoch
        identity = {"run_id": self.run_id, "save_id": uuid.uuid4().hex[:16]}
        saved = self.state_dict(training_scores)
        state: dict[str, Any] = {
            **identity,
            "selection_round": saved["selection_round"],
            "selected_epoch": saved["selected_epoch"],
            "method": self.acs_args.selection_method,
            "fraction": self.acs_args.fraction,
            "num_samples": self.num_samples,
            "data_fingerprint": self.data_fingerprint,
            "subset_hash": subset_hash(saved["subset"]),
            "world_size": world_size,
            "global_step": global_step,
            "steps_per_epoch": steps_per_epoch,
            "at_epoch_boundary": bool(steps_per_epoch) and global_step % steps_per_epoch == 0,
            "history": saved["history"],
        }
        atomic_save_npy(ckpt / SUBSET_NAME, saved["subset"].numpy())
        selector_subset = saved["selector"].get("subset")
        if selector_subset is not None:
            atomic_save_npy(ckpt / SELECTOR_STATE_NAME, selector_subset.numpy())
        if training_scores is not None:
            state["training_scores_hash"] = save_records(ckpt, training_scores)
        atomic_write_json(ckpt / STATE_NAME, state)
        return identity

    def load(self, checkpoint: str | os.PathLike, world_size: int) -> int | None:
        """Restore the selection state from ``checkpoint``, refusing what would not reproduce the
        interrupted run: another method, other data, a damaged file. Returns the epochs a
        checkpoint of another process count completed (``None``: same count)."""
        ckpt = Path(checkpoint)
        state = read_state(ckpt)
        check_same_run(state, ckpt, self.acs_args.selection_method, self.num_samples, self.data_fingerprint)
        subset = read_array(ckpt / SUBSET_NAME)
        if subset_hash(subset) != state["subset_hash"]:
            raise ValueError(f"{ckpt / SUBSET_NAME} does not match the hash in {STATE_NAME}; the checkpoint is damaged")
        has_selector_state = (ckpt / SELECTOR_STATE_NAME).is_file()
        selector = {"subset": read_array(ckpt / SELECTOR_STATE_NAME)} if has_selector_state else {}
        records = state.get("training_scores_hash")
        training_scores = read_records(ckpt, records) if records is not None else None
        resume_epochs = check_resume_layout(state, ckpt, world_size)  # checks first: a refused resume touches nothing
        state = {**state, "subset": subset, "selector": selector, "training_scores": training_scores}
        self.load_state_dict(state, str(ckpt))
        return resume_epochs
