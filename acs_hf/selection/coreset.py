"""Top-fraction coreset selection, class-balanced by default, deterministic."""

from __future__ import annotations

import math

import torch

__all__ = [
    "select_coreset",
    "coreset_size",
    "class_quotas",
    "check_coreset",
    "check_fraction",
    "rank_within_class",
    "draw_pool",
]


def coreset_size(num_samples: int, fraction: float) -> int:
    """round(fraction * N), halves rounded up; at least 1 sample."""
    check_fraction(fraction)
    k = math.floor(fraction * num_samples + 0.5)
    if k < 1:
        raise ValueError(f"fraction={fraction} of {num_samples} samples selects no sample")
    return k


def check_coreset(
    num_samples: int, fraction: float, labels: torch.Tensor | None = None, class_balanced: bool = True
) -> int:
    """Whether a coreset of ``fraction`` of ``num_samples`` can be selected, checked before any work:
    it must hold a sample, and with ``class_balanced`` (and ``labels`` known) at least one of each
    class. Returns its size; raises a ``ValueError`` that says which fraction would work."""
    k = coreset_size(num_samples, fraction)
    if class_balanced and labels is not None:
        class_quotas(torch.bincount(torch.as_tensor(labels, dtype=torch.long)), fraction)
    return k


def check_fraction(fraction: float) -> None:
    """The one rule for a coreset fraction: a number in (0, 1]."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")


def class_quotas(class_counts: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per-class sample counts that sum to exactly round(fraction * N), at least one for every class
    with a sample, so that no class goes untrained for a round.

    Largest remainder with a floor of one: each class with samples first gets max(1, floor(f * n_c)),
    then the slots left go one each to the largest remainders f * n_c - quota (equal remainders: the
    lower class id first). Every quota is then the floor or ceil of f * n_c, unless the ones given to
    classes with f * n_c < 1 overshoot the total: those slots are taken back one at a time from the
    class whose quota most exceeds its share f * n_c (ties: the higher class id), never below one.
    Fewer slots than classes with samples is an error naming both numbers.
    """
    counts = class_counts.long().cpu()
    total = coreset_size(int(counts.sum()), fraction)
    present = int((counts > 0).sum())
    if present > total:
        raise ValueError(
            f"fraction={fraction} of {int(counts.sum())} samples gives {total} slots per round for {present} classes "
            f"with samples, but class balance gives each class at least one; pass --fraction >= "
            f"{present / int(counts.sum()):.4g} or --class_balanced false"
        )
    ideal = counts.double() * fraction
    base = torch.floor(ideal + 1e-9).long()  # 1e-9: 0.1 * 30 must floor to 3, not 2
    base[(counts > 0) & (base == 0)] = 1
    remainder = (ideal - base.double()).clamp_min(0)
    extra = total - int(base.sum())
    if extra > 0:
        # Stable sort on -remainder keeps the lower class id first among equal remainders.
        order = torch.sort(-remainder, stable=True).indices
        order = order[counts[order] > base[order]][:extra]
        base[order] += 1
    for _ in range(-extra):  # the floor of one overshot: take from the most over-served (higher id on ties)
        over = torch.round((base.double() - ideal) * 1e9)  # to 1e-9, like the floors: 3 - 0.1 * 30 is a 0
        base[len(base) - 1 - int(torch.argmax(torch.where(base > 1, over, -math.inf).flip(0)))] -= 1
    return base


def select_coreset(
    scores: torch.Tensor,
    labels: torch.Tensor,
    fraction: float,
    class_balanced: bool = True,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of the highest-scoring ``round(fraction * N)`` samples, sorted ascending.

    Args:
        scores: [N] scores, finite wherever ``candidates`` holds; higher is kept first.
        labels: [N] integer class ids >= 0.
        fraction: share of the data to keep, in (0, 1].
        class_balanced: each class keeps its top share of its own samples (quotas from
            :func:`class_quotas`); otherwise a global top-k.
        candidates: optional [N] bool mask of the samples that were scored (a candidate pool).
            Quotas still come from all N samples; candidates rank before every other sample,
            which fill a quota (lowest index first) only where a class has too few candidates.

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
    if candidates is not None:
        candidates = candidates.detach().reshape(-1).cpu().bool()
        if candidates.numel() != n:
            raise ValueError(f"select_coreset: {n} scores but a candidates mask of {candidates.numel()}")
        scores = torch.where(candidates, scores.double(), torch.tensor(-math.inf, dtype=torch.float64))
    bad = ~torch.isfinite(scores) if candidates is None else candidates & ~torch.isfinite(scores)
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


def draw_pool(
    labels: torch.Tensor,
    fraction: float,
    generator: torch.Generator,
    class_balanced: bool = True,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """A uniform random candidate pool of ``round(fraction * N)`` samples, as an [N] bool mask.

    Class-balanced like :func:`select_coreset` (each class contributes its quota of the pool).
    Samples in the optional [N] bool mask ``keep`` enter the pool first (e.g. samples whose
    scores are already known), up to each class's quota; the rest is drawn at random.
    """
    labels = labels.detach().reshape(-1).cpu()
    keys = torch.rand(labels.numel(), generator=generator, dtype=torch.float64)
    if keep is not None:
        keys = keys + 2.0 * keep.detach().reshape(-1).cpu().double()  # above every random key
    mask = torch.zeros(labels.numel(), dtype=torch.bool)
    mask[select_coreset(keys, labels, fraction, class_balanced)] = True
    return mask
