"""Top-1 / top-k accuracy as an `evaluate` metric module, shipped inside acs_hf (loads offline).

Predictions are each sample's class ids ranked by score (at least k of them), as
``logits.topk(k).indices`` gives; references are the true class ids.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-1 accuracy and top-k accuracy (default k=5) from ranked class predictions."
_KWARGS = """
Args:
    predictions (list of list of int): per sample, class ids ranked best first (>= k of them).
    references (list of int): true class ids.
    k (int): the k of top-k accuracy (default 5).
Returns:
    accuracy (float): share of samples whose first-ranked class is the label.
    top{k} (float): share of samples whose label is among the first k ranked classes.
"""


class TopkAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=5):
        preds = np.asarray(predictions)
        refs = np.asarray(references)
        if preds.ndim != 2 or preds.shape[1] < 1:
            raise ValueError(f"predictions must be ranked class ids of shape [N, >=1], got {preds.shape}")
        k_eff = min(k, preds.shape[1])
        return {
            "accuracy": float((preds[:, 0] == refs).mean()),
            f"top{k}": float((preds[:, :k_eff] == refs[:, None]).any(axis=1).mean()),
        }
