"""Coreset scoring and selection: pure tensor functions plus a small selector registry.

Knows nothing of transformers, datasets or accelerate.
"""

from .coreset import check_coreset, check_fraction, class_quotas, coreset_size, draw_pool, select_coreset
from .schedules import SCHEDULES, check_schedule, evs_weight
from .scores import (
    STATISTICS,
    batch_statistics,
    disagreement_score,
    entropy_score,
    error_vector_score,
    least_confidence_score,
    margin_score,
)
from .selectors import (
    SELECTORS,
    Selector,
    create_selector,
    list_selectors,
    register_selector,
    selection_generator,
)

__all__ = [
    "SCHEDULES",
    "SELECTORS",
    "STATISTICS",
    "Selector",
    "batch_statistics",
    "check_coreset",
    "check_fraction",
    "check_schedule",
    "class_quotas",
    "coreset_size",
    "create_selector",
    "disagreement_score",
    "draw_pool",
    "entropy_score",
    "error_vector_score",
    "evs_weight",
    "least_confidence_score",
    "list_selectors",
    "margin_score",
    "register_selector",
    "select_coreset",
    "selection_generator",
]
