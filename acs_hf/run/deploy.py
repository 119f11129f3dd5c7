"""The recipe's ``--export_onnx``: export the trained student to ``model.onnx``, then measure in ONNX Runtime
how fast it runs against the FP32 model and how accurate it is on the run's validation images."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.batch import default_forward
from ..layout import RunLayout
from ..quantization import compare_with_float, export_onnx, onnx_accuracy

if TYPE_CHECKING:
    from transformers import Trainer

    from ..data.loading import ImageDatasets

__all__ = ["ONNX_CARD_ROWS", "ONNX_EVAL_BATCH_SIZE", "evaluate_onnx", "export_and_evaluate"]

logger = logging.getLogger(__name__)

#: Images per ONNX Runtime call when the recipe evaluates ``model.onnx``.
ONNX_EVAL_BATCH_SIZE = 64

#: The model card's results rows for :func:`export_and_evaluate`'s metrics.
ONNX_CARD_ROWS = {
    "onnx_eval_accuracy": f"top-1 ({RunLayout.ONNX} in ONNX Runtime)",
    "onnx_agreement": f"top-1 agreement of {RunLayout.ONNX} with PyTorch",
}


def evaluate_onnx(
    path: str | Path,
    model: torch.nn.Module,
    dataset: Dataset,
    collate_fn: Callable[[list], Any],
    *,
    batch_size: int = ONNX_EVAL_BATCH_SIZE,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """:func:`~acs_hf.onnx_accuracy` of the export at ``path`` on ``dataset``, with ``model`` (the PyTorch
    model it was exported from, in eval mode meanwhile) as the reference.

    ``dataset`` and ``collate_fn`` are the Trainer's evaluation data and collator, so that ONNX Runtime sees
    the same images, preprocessed alike, as the Trainer's evaluation; batches of dicts with ``pixel_values``
    and ``labels``."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers)
    bar = tqdm(loader, desc="ONNX Runtime evaluation", disable=not progress, leave=False)
    device = next(model.parameters()).device

    def torch_logits(pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return default_forward(model, {"pixel_values": pixel_values.to(device)})

    training = model.training
    model.eval()
    try:
        return onnx_accuracy(path, ((b["pixel_values"], b["labels"]) for b in bar), torch_logits)
    finally:
        model.train(training)


def export_and_evaluate(
    student: torch.nn.Module, fp_model: torch.nn.Module, ds: ImageDatasets, trainer: Trainer, integer_graph: bool
) -> dict[str, float]:
    """Export ``student`` to the run's ``model.onnx``, log its speed against ``fp_model`` in FP32 and its
    accuracy on ``ds.eval_dataset`` (through the Trainer's collator); returns ``onnx_eval_accuracy`` and
    ``onnx_agreement`` (the share of images where ONNX Runtime and PyTorch predict the same class), for
    ``eval_results.json``."""
    path, input_size = RunLayout(trainer.args.output_dir).onnx, ds.data_config["input_size"]
    export_onnx(student, path, input_size=input_size)
    speed = compare_with_float(path, fp_model, input_size)
    logger.info("%s%s", speed["summary"], "" if integer_graph else " (--integer_graph true: all)")
    args = trainer.args
    result = evaluate_onnx(path, student, ds.eval_dataset, trainer.data_collator,
                           num_workers=args.dataloader_num_workers, progress=not args.disable_tqdm)  # fmt: skip
    logger.info(
        "%s in ONNX Runtime: top-1 %.4f on the %d %s images, the PyTorch model's class on %.2f%% of them",
        path, result["accuracy"], result["count"], ds.eval_split, 100 * result["agreement"],
    )  # fmt: skip
    return {"onnx_eval_accuracy": result["accuracy"], "onnx_agreement": result["agreement"]}
