"""Where a selection round's statistics come from: the scoring pass, the teacher cache, the training pass.

:class:`RoundStatistics` owns the scoring view's loader (and its decoded-view cache), the teacher
cache and its fingerprint, the statistics recorded by the training pass, and the checks that every
process scores with the same models. :class:`~acs_hf.training.rounds.RoundRunner` asks it for each
round's statistics; what it needs of the training around it comes in a
:class:`~acs_hf.training.rounds.RoundContext`.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.batch import INDEX_KEY
from ..data.view_cache import ScoreViewCache
from ..selection import Selector, draw_pool
from .arguments import ACSArguments
from .consistency import broadcast_module_state, check_same_across_processes, module_fingerprint
from .round_context import RoundContext
from .scoring_pass import scoring_pass
from .teacher_cache import TeacherCache
from .training_pass import TrainingScores

__all__ = ["RoundStatistics"]

logger = logging.getLogger(__name__)


class RoundStatistics:
    """The statistics of each selection round.

    Args:
        context: what the round reads of the training around it (accelerator, models, loaders).
        acs_args: the selection settings.
        selector: the round's selector (which statistics it needs, whether it needs the teacher).
        score_dataset: the training set under the eval transform (see :class:`~acs_hf.ACSTrainer`).
        num_samples: N, the size of the training set.
        data_fingerprint: identifies the training set (part of the teacher cache's fingerprint).
    """

    def __init__(
        self,
        context: RoundContext,
        acs_args: ACSArguments,
        selector: Selector,
        score_dataset: Dataset | None,
        num_samples: int,
        data_fingerprint: str | None,
    ) -> None:
        self.context = context
        self.acs_args = acs_args
        self.selector = selector
        self.score_dataset = score_dataset
        self.num_samples = num_samples
        self.data_fingerprint = data_fingerprint
        self.training_scores = TrainingScores(selector.required_stats) if acs_args.reuse_training_scores else None
        self._score_loader: DataLoader | None = None
        self._view_cache: ScoreViewCache | None = None
        self._teacher_cache: TeacherCache | None = None
        self._last_teacher_logits: torch.Tensor | None = None

    @property
    def view_cache(self) -> ScoreViewCache | None:
        """The decoded scoring-view cache while training runs with ``score_cache_dir``."""
        return self._view_cache

    def close(self) -> None:
        """Drop the decoded score views (temporary, whatever happened to the training)."""
        if self._view_cache is not None:
            self._view_cache.close()
            self._view_cache, self._score_loader = None, None

    def score_dataloader(self, rows: torch.Tensor | None = None) -> DataLoader:
        """The scoring view's loader over every sample, or over ``rows`` (a candidate pool)."""
        if self._score_loader is not None and rows is None:
            return self._score_loader
        context = self.context
        dataset = self._view_cache or self.score_dataset
        if self.acs_args.score_cache_dir and self._view_cache is None:
            tag = f"rank{context.accelerator.process_index}"
            dataset = self._view_cache = ScoreViewCache(dataset, self.acs_args.score_cache_dir, tag=tag)
        loader = context.make_loader(dataset if rows is None else Subset(dataset, rows.tolist()))
        if rows is None:
            self._score_loader = loader
        return loader

    def dataset_labels(self) -> torch.Tensor | None:
        """Every training label without touching an image, when the score dataset offers them as
        a ``labels`` array of length N (``acs_hf.data.images.ImageView`` does) or is a ``datasets.Dataset``
        with a ``labels`` column; else None."""
        labels = getattr(self.score_dataset, "labels", None)
        if labels is None and isinstance(self.score_dataset, datasets.Dataset):
            if "labels" in self.score_dataset.column_names:  # reads that column alone
                labels = self.score_dataset.with_format("numpy")["labels"]
        if labels is None or len(labels) != self.num_samples:
            return None
        return torch.as_tensor(np.asarray(labels), dtype=torch.long)

    # ------------------------------------------------------------------ teacher
    @property
    def teacher_cache(self) -> TeacherCache | None:
        """The teacher-probability cache, once the first scoring round has built it."""
        return self._teacher_cache

    def _get_teacher_cache(self) -> TeacherCache | None:
        if not (self.acs_args.cache_teacher_outputs and self.selector.needs_teacher):
            return None
        if self._teacher_cache is None:
            teacher = self.context.teacher
            fingerprint = f"data={self.data_fingerprint}:teacher={module_fingerprint(teacher)}"
            check_same_across_processes("teacher cache fingerprint (data and teacher weights)", fingerprint)
            self._teacher_cache = TeacherCache(
                self.num_samples,
                self.context.teacher_cache_dir,
                rank=self.context.accelerator.process_index,
                fingerprint=fingerprint,
            )
        return self._teacher_cache

    # ------------------------------------------------------------------ training-pass scores
    def training_records(self) -> dict[str, torch.Tensor] | None:
        """The training-pass records of every process since the last round, as a checkpoint keeps
        them (a collective; ``None`` without ``reuse_training_scores``)."""
        if self.training_scores is None:
            return None
        return self.training_scores.state_dict(self.num_samples, self.context.accelerator)

    def restore_training_records(self, records: dict[str, torch.Tensor] | None, checkpoint: str) -> None:
        """Take back :meth:`training_records` from ``checkpoint`` (the main process keeps them)."""
        if self.training_scores is None:
            return
        if records is None:
            logger.warning(
                "%s holds no training-pass scores (saved without --reuse_training_scores, or by an older acs_hf): "
                "the next round scores its whole pool, unlike the interrupted run",
                checkpoint,
            )
        self.training_scores.load_state_dict(records, keep=self.context.accelerator.is_main_process)

    def remember_teacher_logits(self, logits: torch.Tensor) -> None:
        """Keep the distillation forward's teacher logits: the training-pass DS reuses them."""
        self._last_teacher_logits = logits

    def record_training_batch(self, inputs: dict[str, Any], logits: torch.Tensor) -> None:
        """Record a training batch's statistics for the next round (with ``reuse_training_scores``)."""
        probs = None
        if "ds" in self.training_scores.stats:
            probs = self._batch_teacher_probs(inputs)
            if probs is None:
                return  # no teacher output for this batch
        self.training_scores.record(inputs[INDEX_KEY], logits, inputs["labels"], probs)

    def _batch_teacher_probs(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """Teacher probabilities for a training batch: the distillation forward's on the same view,
        or else (no distillation) the teacher cache's on the eval view; None if neither exists."""
        logits, self._last_teacher_logits = self._last_teacher_logits, None
        if logits is not None:
            return torch.softmax(logits.float(), dim=1)
        cache = self._teacher_cache
        cached = cache.get(inputs[INDEX_KEY]) if cache is not None else None
        return None if cached is None else cached.float().to(inputs["labels"].device)

    def score(
        self, epoch: int, labels: torch.Tensor | None, generator: torch.Generator, timings: dict[str, float]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The round's statistics and candidate mask (None: every sample was scored).

        Reused training-pass scores enter the candidate pool first; the scoring pass covers the
        rest of the pool (a fresh class-balanced draw of ``score_pool_fraction * N``), or every
        sample when there is no pool and nothing to reuse.
        """
        accelerator = self.context.accelerator
        reused, seen = None, None
        if self.training_scores is not None:
            reused, seen = self.training_scores.collect(self.num_samples, accelerator)
            self.training_scores.clear()
            if not seen.any():
                reused, seen = None, None
        p = self.acs_args.score_pool_fraction
        candidates = None
        if p < 1 or seen is not None:
            candidates = draw_pool(labels, p, generator, self.acs_args.class_balanced, keep=seen)
        to_score = candidates if seen is None else candidates & ~seen
        model = self.context.student()
        if self.selector.needs_model:
            # Every process scores with process 0's buffers: DDP syncs them only at the start of each
            # training forward, so the BatchNorm statistics of the last step differ across processes
            # and a sample's score would depend on which process scored it; process 0's are also the
            # ones a checkpoint saves, so a resumed run scores as the uninterrupted one did.
            broadcast_module_state(model, buffers_only=True)
            self._check_same_models(model, epoch)
        cache = self._get_teacher_cache()
        cached_before = len(cache) if cache is not None else 0
        stats = scoring_pass(
            model,
            self.score_dataloader(None if to_score is None else to_score.nonzero().flatten()),
            accelerator,
            self.selector.required_stats,
            self.num_samples,
            teacher=self.context.teacher,
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

    def _check_same_models(self, model: nn.Module, epoch: int) -> None:
        """Every process scores with the same student and teacher (a cheap hash, gathered)."""
        if self.context.accelerator.num_processes == 1:
            return
        check_same_across_processes(
            f"student weights and buffers at the scoring of epoch {epoch}", module_fingerprint(model)
        )
        if self.context.teacher is not None:
            check_same_across_processes("teacher weights and buffers", module_fingerprint(self.context.teacher))
