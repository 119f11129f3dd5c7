"""A selection round: score the candidates, select the coreset, check it across processes, record it.

:class:`RoundRunner` runs rounds for a :class:`~acs_hf.training.selection_state.SelectionState`
with what a :class:`~acs_hf.training.round_context.RoundContext` gives it; it never holds the
trainer, so a test runs a round on a model and a list of batches. The statistics come from its
:class:`~acs_hf.training.round_stats.RoundStatistics`; the selector is built once per run and
handed in. Taking the round into the state and telling the callbacks is the caller's part
(:class:`~acs_hf.training.callback.SelectionCallback`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.images import ImageView
from ..data.view_cache import split_transform
from ..selection import Selector, check_coreset, selection_generator
from .arguments import ACSArguments
from .consistency import processes_by_value
from .round_context import RoundContext
from .round_stats import RoundStatistics
from .sampler import subset_hash
from .selection_state import SelectionState

__all__ = ["RoundRunner"]

logger = logging.getLogger(__name__)


class RoundRunner:
    """Runs the selection rounds of one training run.

    Args:
        context: what a round reads of the training (accelerator, models, the scoring loader).
        acs_args: the selection settings.
        selector: the run's selector (``acs_args.create_selector()``, built once).
        score_dataset: the training set under the eval transform, same order and length.
        num_samples: N, the size of the training set.
        data_fingerprint: identifies the training set (the teacher cache's key).

    A selection its inputs cannot make is refused here, at construction.
    """

    def __init__(
        self,
        context: RoundContext,
        acs_args: ACSArguments,
        selector: Selector,
        score_dataset: Dataset | None,
        num_samples: int,
        data_fingerprint: str | None = None,
    ) -> None:
        self.context = context
        self.acs_args = acs_args
        self.selector = selector
        self.num_samples = num_samples
        self.statistics = RoundStatistics(context, acs_args, selector, score_dataset, num_samples, data_fingerprint)
        self._check_inputs(score_dataset)
        self.num_selected = num_samples
        if not selector.selects_all:  # the one feasibility check of the run's coreset (N, classes)
            labels = self.statistics.dataset_labels()
            self.num_selected = check_coreset(num_samples, acs_args.fraction, labels, selector.class_balanced)

    def _check_inputs(self, score_dataset: Dataset | None) -> None:
        """Refuse, at construction, a selection its inputs cannot make."""
        args, selector = self.acs_args, self.selector
        if not selector.selects_all and score_dataset is None:
            raise ValueError(
                f"selection_method={args.selection_method!r} needs score_dataset: the training set under "
                "the eval transform (see acs_hf.data)"
            )
        if score_dataset is not None and len(score_dataset) != self.num_samples:
            raise ValueError(
                f"score_dataset has {len(score_dataset)} examples, train_dataset {self.num_samples}; "
                "they must be the same examples in the same order"
            )
        if args.score_cache_dir and selector.required_stats:  # refused now, not at the first round
            if not isinstance(score_dataset, ImageView):
                raise ValueError(
                    f"score_cache_dir={args.score_cache_dir!r} needs a score_dataset from acs_hf.data "
                    f"(ImageView), got {type(score_dataset).__name__}; unset score_cache_dir for other datasets"
                )
            split_transform(score_dataset.transform)
        if selector.needs_teacher and self.context.teacher is None:
            raise ValueError(
                f"selection_method={args.selection_method!r} (schedule {args.evs_schedule!r}) uses the "
                "disagreement score and needs teacher_model (the FP model the student started from)"
            )
        if (args.score_pool_fraction < 1 or args.reuse_training_scores) and self.statistics.dataset_labels() is None:
            raise ValueError(
                "score_pool_fraction < 1 and reuse_training_scores need every training label without decoding: "
                f"a score_dataset with a `labels` array of length {self.num_samples} (acs_hf.data's views have one)"
            )

    def run(self, epoch: int, num_epochs: float, state: SelectionState) -> tuple[torch.Tensor, dict[str, Any]]:
        """Score the round's candidates (every sample, by default) and select the coreset for
        ``epoch``; returns it with the round's record. ``state`` is read, not changed."""
        start = time.perf_counter()
        timings: dict[str, float] = {}
        generator = selection_generator(self.acs_args.selection_seed, epoch)
        labels = self.statistics.dataset_labels()
        candidates = None
        if labels is not None and not self.selector.required_stats:  # label-only selectors: no image decoded
            stats = {"labels": labels}
        else:
            stats, candidates = self.statistics.score(epoch, labels, generator, timings)
        scoring_seconds = time.perf_counter() - start
        self._hint_score_cache(state, timings, scoring_seconds)
        subset = self.selector.select(stats, epoch, max(num_epochs, 1), self.acs_args.fraction, generator, candidates)
        timings["select_seconds"] = time.perf_counter() - start - scoring_seconds
        self._check_same_subset(subset)
        record = self._record(epoch, num_epochs, subset, state, stats, scoring_seconds)
        record.update({k: round(v, 3) for k, v in timings.items()})
        logger.info(
            "ACS round %d at epoch %d: %d of %d samples selected (%s), scoring %.1fs",
            record["round"], epoch, subset.numel(), self.num_samples, record["subset_hash"], scoring_seconds,
        )  # fmt: skip
        return subset, record

    def _hint_score_cache(self, state: SelectionState, timings: dict[str, float], scoring_seconds: float) -> None:
        if (
            state.selection_round == 0
            and self.selector.dynamic
            and not self.acs_args.score_cache_dir
            and timings.get("data_seconds", 0.0) > 0.5 * scoring_seconds
        ):
            logger.info(
                "ACS scoring waited %.1f of %.1f s for images; --score_cache_dir DIR decodes them only in the first "
                "round (see ACSArguments.score_cache_dir for the disk it needs)",
                timings["data_seconds"], scoring_seconds,
            )  # fmt: skip

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
        state: SelectionState,
        stats: dict[str, torch.Tensor],
        scoring_seconds: float,
    ) -> dict[str, Any]:
        labels, previous = stats["labels"], state.subset
        overlap = None if previous is None else np.intersect1d(previous.numpy(), subset.numpy()).size / subset.numel()
        record: dict[str, Any] = {
            "epoch": epoch,
            "round": state.selection_round + 1,
            "method": self.acs_args.selection_method,
            **self.selector.describe(epoch, max(num_epochs, 1)),
            "num_selected": int(subset.numel()),
            "num_samples": self.num_samples,
            "world_size": self.context.accelerator.num_processes,
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
