"""beta(t): the weight of EVS against DS in the ACS score at selection epoch t of E."""

from __future__ import annotations

import math

__all__ = ["evs_weight", "check_schedule", "SCHEDULES"]

SCHEDULES = {
    "cosine": lambda t, e: math.cos(math.pi * t / (2 * e)),  # the paper
    "cosine_half": lambda t, e: 0.5 * (1 + math.cos(math.pi * t / e)),  # the public reference code
    "linear": lambda t, e: 1 - t / e,
    "evs": lambda t, e: 1.0,
    "ds": lambda t, e: 0.0,
}


def check_schedule(schedule: str) -> None:
    """The one rule for a beta schedule name: a key of :data:`SCHEDULES`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"evs_schedule={schedule!r} is unknown; accepted: {', '.join(SCHEDULES)}")


def evs_weight(epoch: float, num_epochs: float, schedule: str = "cosine") -> float:
    """beta(t) in [0, 1]; ACS(x, t) = beta * EVS(x) + (1 - beta) * DS(x).

    Args:
        epoch: the (0-based) epoch t at which the selection happens, 0 <= t <= E.
        num_epochs: total training epochs E > 0.
        schedule: one of ``cosine`` (paper, cos(pi t / 2E)), ``cosine_half`` (reference code,
            (1 + cos(pi t / E)) / 2), ``linear`` (1 - t/E), ``evs`` (1) or ``ds`` (0).
    """
    check_schedule(schedule)
    if not num_epochs > 0:
        raise ValueError(f"num_epochs must be > 0, got {num_epochs!r}")
    if not 0 <= epoch <= num_epochs:
        raise ValueError(f"epoch must lie in [0, num_epochs={num_epochs}], got {epoch!r}")
    return float(min(1.0, max(0.0, SCHEDULES[schedule](epoch, num_epochs))))
