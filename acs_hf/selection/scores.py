"""Per-sample scores from logits. Every function computes in float32 whatever the input dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "error_vector_score",
    "disagreement_score",
    "entropy_score",
    "margin_score",
    "least_confidence_score",
    "batch_statistics",
    "STATISTICS",
]


def _checked(logits: torch.Tensor, name: str) -> torch.Tensor:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"{name} must have shape [N, C] with C >= 2, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {logits.dtype}")
    return logits.float()


def _probs(logits: torch.Tensor, name: str) -> torch.Tensor:
    return torch.softmax(_checked(logits, name), dim=1)


def error_vector_score(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """EVS(x) = || softmax(logits) - onehot(y) ||_2, shape [N]."""
    p = _probs(logits, "logits")
    labels = labels.reshape(-1).long()
    if labels.numel() != p.shape[0]:
        raise ValueError(f"labels has {labels.numel()} entries for {p.shape[0]} logits rows")
    if labels.numel() and (labels.min() < 0 or labels.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in [0, {p.shape[1] - 1}], got [{labels.min()}, {labels.max()}]")
    return (p - F.one_hot(labels, p.shape[1]).float()).norm(dim=1)


def disagreement_score(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    teacher_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """DS(x) = || softmax(student) - softmax(teacher) ||_2, shape [N].

    Pass either ``teacher_logits`` or already-normalised ``teacher_probs`` (e.g. a float16 cache).
    """
    if (teacher_logits is None) == (teacher_probs is None):
        raise ValueError("disagreement_score takes exactly one of teacher_logits and teacher_probs")
    p_s = _probs(student_logits, "student_logits")
    p_t = _probs(teacher_logits, "teacher_logits") if teacher_probs is None else teacher_probs.float()
    if p_t.shape != p_s.shape:
        raise ValueError(f"teacher shape {tuple(p_t.shape)} does not match student {tuple(p_s.shape)}")
    return (p_s - p_t).norm(dim=1)


def entropy_score(logits: torch.Tensor) -> torch.Tensor:
    """Predictive entropy -sum p log p (higher = more uncertain), shape [N]."""
    logp = torch.log_softmax(_checked(logits, "logits"), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def margin_score(logits: torch.Tensor) -> torch.Tensor:
    """1 - (p_top1 - p_top2) (higher = more uncertain), shape [N]."""
    top2 = _probs(logits, "logits").topk(2, dim=1).values
    return 1 - (top2[:, 0] - top2[:, 1])


def least_confidence_score(logits: torch.Tensor) -> torch.Tensor:
    """1 - p_max (higher = more uncertain), shape [N]."""
    return 1 - _probs(logits, "logits").max(dim=1).values


#: Statistic name -> function of (student logits, labels, teacher probabilities or None).
STATISTICS = {
    "evs": lambda logits, labels, p_t: error_vector_score(logits, labels),
    "ds": lambda logits, labels, p_t: disagreement_score(logits, teacher_probs=p_t),
    "entropy": lambda logits, labels, p_t: entropy_score(logits),
    "margin": lambda logits, labels, p_t: margin_score(logits),
    "least_confidence": lambda logits, labels, p_t: least_confidence_score(logits),
}


def batch_statistics(
    names: tuple[str, ...] | list[str],
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_probs: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The named per-sample statistics of one batch (see :data:`STATISTICS`)."""
    unknown = [n for n in names if n not in STATISTICS]
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; accepted: {', '.join(STATISTICS)}")
    if "ds" in names and teacher_probs is None:
        raise ValueError("the 'ds' statistic needs teacher probabilities")
    return {n: STATISTICS[n](logits, labels, teacher_probs) for n in names}
