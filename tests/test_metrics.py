import numpy as np
import torch
from transformers import EvalPrediction

from acs_hf.metrics import load_topk_accuracy, make_compute_metrics, preprocess_logits_for_metrics


def test_metric_module_loads_offline_and_matches_numpy():
    metric = load_topk_accuracy()
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 8))
    labels = rng.integers(0, 8, 50)
    ranked = np.argsort(-logits, axis=1)[:, :5]
    out = metric.compute(predictions=ranked, references=labels)
    assert out["accuracy"] == np.mean(logits.argmax(1) == labels)
    rank_of_label = (np.argsort(-logits, axis=1) == labels[:, None]).argmax(1)
    assert out["top5"] == np.mean(rank_of_label < 5)


def test_by_hand():
    metric = load_topk_accuracy()
    out = metric.compute(predictions=[[1, 2, 3, 4, 5], [0, 1, 2, 3, 4], [9, 8, 7, 6, 5]], references=[1, 4, 0])
    assert out == {"accuracy": 1 / 3, "top5": 2 / 3}


def test_compute_metrics_pipeline():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    top = preprocess_logits_for_metrics(logits, labels, k=2)
    assert top.tolist() == [[1, 0], [0, 2], [2, 1]]
    out = make_compute_metrics(k=2)(EvalPrediction(predictions=top.numpy(), label_ids=labels.numpy()))
    assert out == {"accuracy": 1 / 3, "top2": 2 / 3}
