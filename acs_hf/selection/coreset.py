"""Top-fraction coreset selection, class-balanced by default, deterministic."""

from __future__ import annotations

import math

import torch

__all__ = ["select_coreset", "coreset_size", "class_quotas", "check_fraction", "rank_within_class"]


def coreset_size(num_samples: int, fraction: float) -> int:
    """round(fraction * N), halves rounded up; at least 1 sample."""
    check_fraction(fraction)
    k = math.floor(fraction * num_samples + 0.5)
    if k < 1:
        raise ValueError(f"fraction={fraction} of {num_samples} samples selects no sample")
    return k


def check_fraction(fraction: float) -> None:
    """The one rule for a coreset fraction: a number in (0, 1]."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")


def class_quotas(class_counts: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per-class sample counts that sum to round(fraction * N), each floor or ceil of fraction * n_c.

    The total is apportioned by largest remainder; equal remainders go to the lower class id.
    """
    counts = class_counts.long().cpu()
    total = coreset_size(int(counts.sum()), fraction)
    ideal = counts.double() * fraction
    base = torch.floor(ideal + 1e-9).long()  # 1e-9: 0.1 * 30 must floor to 3, not 2
    remainder = (ideal - base.double()).clamp_min(0)
    extra = total - int(base.sum())
    if extra > 0:
        # Stable sort on -remainder keeps the lower class id first among equal remainders.
        order = torch.sort(-remainder, stable=True).indices
        order = order[counts[order] > base[order]][:extra]
        base[order] += 1
    return base


def select_coreset(
    scores: torch.Tensor,
    labels: torch.Tensor,
    fraction: float,
    class_balanced: bool = True,
) -> torch.Tensor:
    """Indices of the highest-scoring ``round(fraction * N)`` samples, sorted ascending.

    Args:
        scores: [N] finite scores; higher is kept first.
        labels: [N] integer class ids >= 0.
        fraction: share of the data to keep, in (0, 1].
        class_balanced: each class keeps its top share of its own samples (quotas from
            :func:`class_quotas`); otherwise a global top-k.

    Ties go to the lower index, so the result is a pure function of the inputs: every process
    of a distributed run selects the same subset. O(N log N): two stable sorts.
    """
    check_fraction(fraction)
    scores, labels = scores.detach().reshape(-1).cpu(), labels.detach().reshape(-1).cpu()
    n = scores.numel()
    if n == 0:
        raise ValueError("select_coreset: scores is empty")
    if labels.numel() != n:
        raise ValueError(f"select_coreset: {n} scores but {labels.numel()} labels")
    if not scores.is_floating_point():
        scores = scores.double()
    bad = ~torch.isfinite(scores)
    if bad.any():
        raise ValueError(
            f"select_coreset: {int(bad.sum())} non-finite scores (NaN or inf), the first at index "
            f"{int(bad.nonzero()[0])}"
        )
    if labels.is_floating_point() or (labels < 0).any():
        raise ValueError("select_coreset: labels must be non-negative integer class ids")
    labels = labels.long()
    if not class_balanced:
        by_score = torch.sort(scores, descending=True, stable=True).indices
        return torch.sort(by_score[: coreset_size(n, fraction)]).values
    counts = torch.bincount(labels)
    order, rank = rank_within_class(scores, labels, counts)
    return torch.sort(order[rank < class_quotas(counts, fraction)[labels[order]]]).values


def rank_within_class(
    scores: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, rank)``: sample indices grouped by class, by descending score inside each class
    (ties: lower index first), and each one's 0-based rank inside its class. ``counts`` is
    ``bincount(labels)``. Two stable sorts, O(N log N)."""
    by_score = torch.sort(scores, descending=True, stable=True).indices
    order = by_score[torch.sort(labels[by_score], stable=True).indices]
    starts = torch.cumsum(counts, 0) - counts
    return order, torch.arange(order.numel()) - starts[labels[order]]
