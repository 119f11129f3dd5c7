"""Metrics for the Trainer: an `evaluate` module shipped in the package, so it loads offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["TOPK_ACCURACY_PATH", "load_topk_accuracy", "preprocess_logits_for_metrics", "make_compute_metrics"]

#: Directory of the `evaluate` module; ``evaluate.load(TOPK_ACCURACY_PATH)`` needs no network.
TOPK_ACCURACY_PATH = str(Path(__file__).with_name("topk_accuracy"))


def load_topk_accuracy():
    import evaluate

    return evaluate.load(TOPK_ACCURACY_PATH)


def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Keep only the top-k class ids per sample, so evaluation does not gather [N, C] logits."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.topk(min(k, logits.shape[-1]), dim=-1).indices


def make_compute_metrics(k: int = 5):
    """``compute_metrics`` for the Trainer: reports ``accuracy`` and ``top{k}`` (``eval_`` prefixed)."""
    metric = load_topk_accuracy()

    def compute_metrics(eval_pred) -> dict[str, float]:
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        preds = preds[0] if isinstance(preds, tuple) else preds
        return metric.compute(predictions=np.asarray(preds), references=np.asarray(labels), k=k)

    return compute_metrics
