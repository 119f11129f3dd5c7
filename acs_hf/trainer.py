"""ACSTrainer: QAT that trains every round on a freshly selected coreset.

At the start of epoch 0 and every ``selection_interval`` epochs, the whole training set is scored
(un-augmented view), a registered selector picks the coreset, and the fixed-length
:class:`~acs_hf.sampler.CoresetSampler` swaps its contents before the epoch's batches are drawn.

The contract this relies on (tested against the installed transformers in ``tests/test_trainer.py``):
**the Trainer calls ``on_epoch_begin`` before it iterates the epoch's train dataloader**, so a
selection made there is the one the epoch trains on.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .arguments import ACSArguments
from .checkpointing import check_checkpoints_ahead, check_resume_layout, load_acs_state, run_identity, save_acs_state
from .consistency import check_same_across_processes, module_fingerprint
from .data import ImageView
from .qat_trainer import QATTrainer
from .reporting import SelectionReporter
from .sampler import CoresetSampler, subset_hash
from .scoring import INDEX_KEY, TeacherCache, TrainingScores, score_dataset
from .selection import coreset_size, draw_pool, selection_generator
from .upstream import dataset_fingerprint, is_damaged_file_error, trainer_output_dir
from .view_cache import ScoreViewCache, split_transform

__all__ = ["ACSTrainer"]

logger = logging.getLogger(__name__)


class _EpochBegin(TrainerCallback):
    def __init__(self, trainer: ACSTrainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer.begin_epoch(math.floor(state.epoch + 1e-6), state.num_train_epochs)


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
        self.selector = acs_args.create_selector()
        if self.train_dataset is None:
            raise ValueError("ACSTrainer needs a train_dataset")
        self.num_samples = len(self.train_dataset)
        if not self.selector.selects_all and score_dataset is None:
            raise ValueError(
                f"selection_method={acs_args.selection_method!r} needs score_dataset: the training set under "
                "the eval transform (see acs_hf.data)"
            )
        if score_dataset is not None and len(score_dataset) != self.num_samples:
            raise ValueError(
                f"score_dataset has {len(score_dataset)} examples, train_dataset {self.num_samples}; "
                "they must be the same examples in the same order"
            )
        if acs_args.score_cache_dir and self.selector.required_stats:  # refused now, not at the first round
            if not isinstance(score_dataset, ImageView):
                raise ValueError(
                    f"score_cache_dir={acs_args.score_cache_dir!r} needs a score_dataset from acs_hf.data "
                    f"(ImageView), got {type(score_dataset).__name__}; unset score_cache_dir for other datasets"
                )
            split_transform(score_dataset.transform)
        if self.selector.needs_teacher and teacher_model is None:
            raise ValueError(
                f"selection_method={acs_args.selection_method!r} (schedule {acs_args.evs_schedule!r}) uses the "
                "disagreement score and needs teacher_model (the FP model the student started from)"
            )
        self.num_selected = (
            self.num_samples if self.selector.selects_all else coreset_size(self.num_samples, acs_args.fraction)
        )
        self.score_dataset = score_dataset
        fingerprint = dataset_fingerprint(self.train_dataset)
        self.data_fingerprint = data_fingerprint or (f"{self.num_samples}:{fingerprint}" if fingerprint else None)
        self.steps_per_epoch: int | None = None
        self._resume_epochs: int | None = None  # epochs done by a checkpoint of another process count
        self._coreset_sampler: CoresetSampler | None = None
        self._score_loader: DataLoader | None = None
        self._teacher_cache: TeacherCache | None = None
        self._score_view_cache: ScoreViewCache | None = None
        self.selection_round = 0
        self.selected_epoch: int | None = None
        self.subset: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []
        self._training_scores = TrainingScores(self.selector.required_stats) if acs_args.reuse_training_scores else None
        self._last_teacher_logits: torch.Tensor | None = None
        if (acs_args.score_pool_fraction < 1 or acs_args.reuse_training_scores) and self._dataset_labels() is None:
            raise ValueError(
                "score_pool_fraction < 1 and reuse_training_scores need every training label without decoding: "
                f"a score_dataset with a `labels` array of length {self.num_samples} (acs_hf.data's views have one)"
            )
        if not self.selector.selects_all:
            self.add_callback(_EpochBegin(self))
            if report_selection:
                self.add_callback(SelectionReporter())

    # ------------------------------------------------------------------ data
    def _get_train_sampler(self, train_dataset=None):
        if self.selector.selects_all:
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self._coreset_sampler = CoresetSampler(self.num_selected, seed)
        if self.subset is not None:  # restored from a checkpoint
            self._coreset_sampler.set_subset(self.subset)
        return self._coreset_sampler

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
            if self._score_view_cache is not None:  # decoded pixels are temporary, whatever happened
                self._score_view_cache.close()
                self._score_view_cache, self._score_loader = None, None

    def _score_dataloader(self, rows: torch.Tensor | None = None) -> DataLoader:
        """The scoring view's loader over every sample, or over ``rows`` (a candidate pool)."""
        if self._score_loader is None or rows is not None:
            dataset = self._score_view_cache or self.score_dataset
            if self.acs_args.score_cache_dir and self._score_view_cache is None:
                tag = f"rank{self.accelerator.process_index}"
                dataset = self._score_view_cache = ScoreViewCache(dataset, self.acs_args.score_cache_dir, tag=tag)
            loader = DataLoader(
                dataset if rows is None else Subset(dataset, rows.tolist()),
                batch_size=self.calibration_batch_size,
                shuffle=False,
                collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory and self.args.device.type == "cuda",
            )
            if rows is not None:
                return self.accelerator.prepare(loader)
            self._score_loader = self.accelerator.prepare(loader)
        return self._score_loader

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._training_scores is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        probs = None
        if "ds" in self._training_scores.stats:
            probs = self._batch_teacher_probs(inputs)
            if probs is None:
                return (loss, outputs) if return_outputs else loss  # no teacher output for this batch
        self._training_scores.record(inputs[INDEX_KEY], outputs["logits"], inputs["labels"], probs)
        return (loss, outputs) if return_outputs else loss

    def teacher_logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        logits = super().teacher_logits(inputs)
        self._last_teacher_logits = logits  # the training-pass DS reuses the distillation forward
        return logits

    def _batch_teacher_probs(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """Teacher probabilities for a training batch: the distillation forward's on the same view,
        or else (no distillation) the teacher cache's on the eval view; None if neither exists."""
        logits, self._last_teacher_logits = self._last_teacher_logits, None
        if logits is not None:
            return torch.softmax(logits.float(), dim=1)
        cache = self._teacher_cache
        cached = cache.get(inputs[INDEX_KEY]) if cache is not None else None
        return None if cached is None else cached.float().to(inputs["labels"].device)

    # ------------------------------------------------------------------ selection
    def begin_epoch(self, epoch: int, num_epochs: float) -> None:
        """Select if a round is due at ``epoch``, then point the sampler at the epoch."""
        due = epoch % self.acs_args.selection_interval == 0
        # A resume inside an epoch finds that epoch's subset restored from the checkpoint.
        if epoch != self.selected_epoch and (self.subset is None or (due and self.selector.dynamic)):
            self.select(epoch, num_epochs)
        self._coreset_sampler.set_epoch(epoch)

    def select(self, epoch: int, num_epochs: float) -> torch.Tensor:
        """Score the round's candidates (every sample, by default), select the coreset for
        ``epoch`` and hand it to the sampler."""
        start = time.perf_counter()
        timings: dict[str, float] = {}
        generator = selection_generator(self.acs_args.selection_seed, epoch)
        labels = self._dataset_labels()
        candidates = None
        if labels is not None and not self.selector.required_stats:  # label-only selectors: no image decoded
            stats = {"labels": labels}
        else:
            stats, candidates = self._score_round(epoch, labels, generator, timings)
        scoring_seconds = time.perf_counter() - start
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
        subset = self.selector.select(stats, epoch, max(num_epochs, 1), self.acs_args.fraction, generator, candidates)
        timings["select_seconds"] = time.perf_counter() - start - scoring_seconds
        self._check_same_subset(subset)
        previous, self.subset = self.subset, subset
        self.selected_epoch = epoch
        self.selection_round += 1
        if self._coreset_sampler is not None:  # else the sampler takes self.subset when it is built
            self._coreset_sampler.set_subset(subset)
        record = self._record(epoch, num_epochs, subset, previous, stats, scoring_seconds)
        record.update({k: round(v, 3) for k, v in timings.items()})
        self.history.append(record)
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "on_selection"):
                callback.on_selection(
                    self.args, self.state, self.control, record=record, subset=subset, history=self.history
                )
        self.log({f"acs/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        logger.info(
            "ACS round %d at epoch %d: %d of %d samples selected (%s), scoring %.1fs",
            self.selection_round, epoch, subset.numel(), self.num_samples, record["subset_hash"], scoring_seconds,
        )  # fmt: skip
        return subset

    def _score_round(
        self, epoch: int, labels: torch.Tensor | None, generator: torch.Generator, timings: dict[str, float]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The round's statistics and candidate mask (None: every sample was scored).

        Reused training-pass scores enter the candidate pool first; the scoring pass covers the
        rest of the pool (a fresh class-balanced draw of ``score_pool_fraction * N``), or every
        sample when there is no pool and nothing to reuse.
        """
        reused, seen = None, None
        if self._training_scores is not None:
            reused, seen = self._training_scores.collect(self.num_samples, self.accelerator)
            self._training_scores.clear()
            if not seen.any():
                reused, seen = None, None
        p = self.acs_args.score_pool_fraction
        candidates = None
        if p < 1 or seen is not None:
            candidates = draw_pool(labels, p, generator, self.acs_args.class_balanced, keep=seen)
        to_score = candidates if seen is None else candidates & ~seen
        model = self.accelerator.unwrap_model(self.model)
        if self.selector.needs_model:
            self._sync_buffers(model)
            self._check_same_models(model, epoch)
        cache = self._get_teacher_cache()
        cached_before = len(cache) if cache is not None else 0
        stats = score_dataset(
            model,
            self._score_dataloader(None if to_score is None else to_score.nonzero().flatten()),
            self.accelerator,
            self.selector.required_stats,
            self.num_samples,
            teacher=self.teacher_model,
            teacher_cache=cache,
            desc=f"ACS scoring (epoch {epoch})",
            timings=timings,
            expected=to_score,
        )
        scored = self.num_samples if to_score is None else int(to_score.sum())
        # Compute spent, for cost accounting: student forwards, and teacher forwards (rows this
        # process added to the cache; without a cache every scored sample ran the teacher).
        timings["scored_samples"] = scored
        if self.selector.needs_teacher:
            timings["teacher_forwards"] = len(cache) - cached_before if cache is not None else scored
        if labels is not None:
            stats["labels"] = labels  # all of them, also outside the pool
        if reused is not None:
            for name, value in reused.items():
                stats[name] = torch.where(seen, value, stats[name])
        timings["reused_samples"] = 0 if seen is None else int((seen & candidates).sum())
        return stats, candidates

    def _dataset_labels(self) -> torch.Tensor | None:
        """Every training label without touching an image, when the score dataset offers them as
        a ``labels`` array of length N (``acs_hf.data.ImageView`` does) or is a ``datasets.Dataset``
        with a ``labels`` column; else None."""
        labels = getattr(self.score_dataset, "labels", None)
        if labels is None and isinstance(self.score_dataset, datasets.Dataset):
            if "labels" in self.score_dataset.column_names:  # reads that column alone
                labels = self.score_dataset.with_format("numpy")["labels"]
        if labels is None or len(labels) != self.num_samples:
            return None
        return torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def _sync_buffers(self, model: nn.Module) -> None:
        """Every process scores with rank 0's buffers. DDP syncs them only at the start of each
        training forward, so the BatchNorm statistics of the last step differ across ranks, and a
        sample's score (and the subset) would depend on which rank scored it; rank 0's are also
        the ones a checkpoint saves, so a resumed run scores as the uninterrupted one did."""
        if self.accelerator.num_processes == 1 or not dist.is_initialized():
            return
        for buffer in model.buffers():
            if buffer.dtype != torch.bool:  # flags (LSQ calibration state) agree already; gloo has no bool
                dist.broadcast(buffer.data, src=0)

    def _check_same_models(self, model: nn.Module, epoch: int) -> None:
        """Every process scores with the same student and teacher (a cheap hash, gathered)."""
        if self.accelerator.num_processes == 1:
            return
        check_same_across_processes(
            f"student weights and buffers at the scoring of epoch {epoch}", module_fingerprint(model)
        )
        if self.teacher_model is not None:
            check_same_across_processes("teacher weights and buffers", module_fingerprint(self.teacher_model))

    def _get_teacher_cache(self) -> TeacherCache | None:
        if not (self.acs_args.cache_teacher_outputs and self.selector.needs_teacher):
            return None
        if self._teacher_cache is None:
            fingerprint = f"data={self.data_fingerprint}:teacher={module_fingerprint(self.teacher_model)}"
            check_same_across_processes("teacher cache fingerprint (data and teacher weights)", fingerprint)
            self._teacher_cache = TeacherCache(
                self.num_samples, self.teacher_cache_dir, rank=self.accelerator.process_index, fingerprint=fingerprint
            )
        return self._teacher_cache

    @property
    def teacher_cache(self) -> TeacherCache | None:
        """The teacher-probability cache, once the first scoring round has built it."""
        return self._teacher_cache

    @property
    def teacher_cache_dir(self) -> str | None:
        d = self.acs_args.teacher_cache_dir
        if d == "memory":
            return None
        return d or os.path.join(self.args.output_dir, "teacher_cache")

    def _check_same_subset(self, subset: torch.Tensor) -> None:
        """All processes must train on the same subset: compare hashes (one small all_gather)."""
        if self.accelerator.num_processes == 1:
            return
        digest = int(subset_hash(subset)[:15], 16)
        gathered = self.accelerator.gather(torch.tensor([digest], device=self.accelerator.device)).cpu().tolist()
        if len(set(gathered)) > 1:
            groups: dict[int, list[int]] = {}
            for rank, h in enumerate(gathered):
                groups.setdefault(h, []).append(rank)
            raise RuntimeError(
                "ACS selection diverged across processes: ranks "
                + " vs ".join(str(ranks) for ranks in groups.values())
                + " selected different subsets; refusing to train on inconsistent data"
            )

    def _record(self, epoch, num_epochs, subset, previous, stats, scoring_seconds) -> dict[str, Any]:
        labels = stats["labels"]
        overlap = None if previous is None else np.intersect1d(previous.numpy(), subset.numpy()).size / subset.numel()
        record: dict[str, Any] = {
            "epoch": epoch,
            "round": self.selection_round,
            "method": self.acs_args.selection_method,
            **self.selector.describe(epoch, max(num_epochs, 1)),
            "num_selected": int(subset.numel()),
            "num_samples": self.num_samples,
            "world_size": self.accelerator.num_processes,
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
    def _save_checkpoint(self, model, trial):
        # The selection state goes into the checkpoint folder first: the Trainer writes
        # trainer_state.json and rotates old checkpoints only after it, so a crash in between never
        # leaves an incomplete newest checkpoint with the last complete one already deleted.
        # save_acs_state first clears a stale folder of this step (or refuses another save's), and
        # no process writes its files there before that (the barrier).
        if self.subset is not None:
            if self.args.should_save:
                checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                save_acs_state(self, os.path.join(trainer_output_dir(self, trial), checkpoint))
            self.accelerator.wait_for_everyone()
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.selector.selects_all:  # checks first: a refused resume touches nothing
            state = load_acs_state(self, resume_from_checkpoint)
            self._resume_epochs = check_resume_layout(
                state, Path(resume_from_checkpoint), self.accelerator.num_processes
            )
            if self._coreset_sampler is not None:
                self._coreset_sampler.set_subset(self.subset)
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
        self.steps_per_epoch = num_update_steps_per_epoch
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
            self.run_id = run_identity(resume_from_checkpoint)  # a resume continues its run
            if resume_from_checkpoint is not None and self.args.save_strategy != "no":
                check_checkpoints_ahead(self, trainer_output_dir(self, trial), resume_from_checkpoint)
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
