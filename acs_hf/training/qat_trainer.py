"""Trainers for timm-style image classifiers: plain supervised training, and QAT with distillation.

``ImageClassificationTrainer`` is a ``transformers.Trainer`` for models called as
``model(pixel_values) -> logits`` (the FP warm-up uses it as is). ``QATTrainer`` adds what
quantization-aware training needs and nothing about data selection: LSQ calibration before the
first step, the distillation loss from a frozen FP teacher, and the LSQ step sizes in their own
optimizer group. ``ACSTrainer`` (``acs_hf.training.trainer``) adds the coreset on top.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import Trainer

from ..data.batch import default_forward
from ..quantization import LSQQuantizer, calibrate_quantizers, quantizers_initialized
from ..utils.upstream import is_damaged_file_error
from .arguments import QATArguments
from .consistency import broadcast_module_state

__all__ = ["ImageClassificationTrainer", "QATTrainer"]

logger = logging.getLogger(__name__)


#: Every BatchNorm class (torch's common base, ``_BatchNorm``, is private).
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextlib.contextmanager
def _batchnorm_eval_if_single(model: nn.Module, batch_size: int):
    """A batch of one sample has no batch statistics: BatchNorm would raise ("Expected more than 1
    value per channel"). Such a batch (the last of an epoch, e.g. 165 samples at batch 32 on 2
    processes) trains with the running statistics instead."""
    norms = []
    if batch_size == 1:  # every step passes here: scan the model only for the rare single-sample batch
        norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS) and m.training]
    if not norms:
        yield
        return
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


class ImageClassificationTrainer(Trainer):
    """``transformers.Trainer`` for image classifiers that take a tensor and return logits.

    Batches are dicts with ``pixel_values`` and ``labels`` (``acs_hf.data`` builds them). Sets
    ``remove_unused_columns=False`` and ``label_names=["labels"]``: timm models take a tensor, so
    the Trainer cannot infer them from the forward signature. Weight decay only on conv/linear weights.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False
        if self.args.label_names is None:
            self.args.label_names = ["labels"]
            self.label_names = ["labels"]
        self._check_distributed()

    def _check_distributed(self) -> None:
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        if env_world > 1 and self.args.world_size == 1:
            raise RuntimeError(
                f"WORLD_SIZE={env_world} in the environment but the Trainer runs a single process: each process "
                "would train alone on the whole dataset. On CPU pass --use_cpu (TrainingArguments(use_cpu=True)) "
                "so that accelerate starts the gloo process group."
            )

    @staticmethod
    def forward_logits(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Logits of ``model`` for a batch: timm's ``model(pixel_values)`` or a transformers
        model's ``.logits`` (see :func:`acs_hf.data.batch.default_forward`)."""
        return default_forward(model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with _batchnorm_eval_if_single(model, len(inputs["labels"])):
            logits = self.forward_logits(model, inputs)
        loss = self.classification_loss(logits, inputs)
        return (loss, {"loss": loss, "logits": logits}) if return_outputs else loss

    def classification_loss(self, logits: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        return F.cross_entropy(logits.float(), inputs["labels"])

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Weight decay on the weights of conv and linear layers only: not on normalisation layers,
        biases, class tokens, position embeddings or LSQ step sizes (timm's rule)."""
        weights = {
            f"{name}.weight" if name else "weight"
            for name, module in model.named_modules()
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
        }
        return [n for n in super().get_decay_parameter_names(model) if n in weights]

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except Exception as e:  # safetensors and torch raise several types for a damaged file
            if not is_damaged_file_error(e):
                raise
            raise ValueError(
                f"checkpoint {resume_from_checkpoint} cannot be loaded ({type(e).__name__}: {e}); it is damaged: "
                "resume from an earlier checkpoint"
            ) from e

    def end(self) -> None:
        """Wait for every process, then finish the trackers and destroy the process group.

        Call once, at the very end of a script, on every process, after the last collective
        (train, evaluate, save). Without it the gloo group is torn down during interpreter
        finalisation while its worker threads still hold work objects that reference Python
        tensors; releasing them then needs the GIL of a dying interpreter and the process aborts
        ("terminate called without an active exception", SIGABRT) although training succeeded.
        """
        self.accelerator.wait_for_everyone()  # no process leaves while another still talks to it
        parent = getattr(super(), "end", None)  # Trainer.end exists in recent transformers 5.x
        if parent is not None:
            parent()
        else:
            self.accelerator.end_training()


class QATTrainer(ImageClassificationTrainer):
    """Quantization-aware training of a model prepared with :func:`acs_hf.quantize_model`.

    Args:
        qat_args: :class:`~acs_hf.QATArguments` (distillation, step-size LR, calibration).
        teacher_model: frozen FP model for distillation (moved to the device, kept in eval mode,
            never optimised or checkpointed); ``None`` trains on cross-entropy alone.
        calibration_dataset: un-augmented examples for calibrating the LSQ steps before the first
            step (default: the training set); the same leading examples on every process.
        calibration_batch_size: its batch size (default: ``per_device_eval_batch_size``).
        *args, **kwargs: as for ``transformers.Trainer``.
    """

    def __init__(
        self,
        *args: Any,
        qat_args: QATArguments | None = None,
        teacher_model: nn.Module | None = None,
        calibration_dataset: Dataset | None = None,
        calibration_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.qat_args = qat_args or QATArguments()
        self.teacher_model = teacher_model
        if teacher_model is not None:
            teacher_model.requires_grad_(False).eval().to(self.args.device)
        # One model on every process: an FP warm-up under DDP leaves each process its own BatchNorm
        # statistics (DDP syncs buffers only at each forward's start), and the teacher is never
        # wrapped by DDP. Everything scored, hashed or distilled from here on is process 0's.
        broadcast_module_state(self.model)
        if teacher_model is not None:
            broadcast_module_state(teacher_model)
        self.calibration_dataset = calibration_dataset
        self.calibration_batch_size = calibration_batch_size or self.args.per_device_eval_batch_size

    def train(self, *args: Any, **kwargs: Any):
        self.calibrate()  # a resumed run then loads the checkpoint's steps over these
        return super().train(*args, **kwargs)

    def calibrate(self) -> None:
        """Initialise every LSQ step that is not yet initialised, before any scoring or training
        step (the reference code scores with uninitialised steps)."""
        model = self.accelerator.unwrap_model(self.model)
        if not any(isinstance(m, LSQQuantizer) for m in model.modules()) or quantizers_initialized(model):
            return
        dataset = self.calibration_dataset if self.calibration_dataset is not None else self.train_dataset
        batch_size = self.calibration_batch_size
        n = min(len(dataset), batch_size * self.qat_args.calibration_batches)
        loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, collate_fn=self.data_collator)
        logger.info("Calibrating quantizers on %d examples", n)
        with self.accelerator.autocast():
            calibrate_quantizers(model, (batch["pixel_values"] for batch in loader))  # moved to the model's device

    def classification_loss(self, logits: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """``kd_alpha * T^2 * KD(teacher || student at T) + (1 - kd_alpha) * CE``; CE alone without a teacher."""
        alpha, T = self.qat_args.kd_alpha, self.qat_args.kd_temperature
        if self.teacher_model is None or alpha == 0:
            return super().classification_loss(logits, inputs)
        t_logits = self.teacher_logits(inputs)
        kd = -(F.softmax(t_logits.float() / T, -1) * F.log_softmax(logits.float() / T, -1)).sum(-1).mean()
        loss = alpha * kd * T * T
        if alpha < 1:
            loss = loss + (1 - alpha) * super().classification_loss(logits, inputs)
        return loss

    def teacher_logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The frozen teacher's logits for a training batch (no grad, under autocast)."""
        with torch.no_grad(), self.accelerator.autocast():
            return self.forward_logits(self.teacher_model, inputs)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with every LSQ step size moved to a group at ``lr * step_lr_scale``.

        The paper lowers the LR of activation steps; weight steps need it as well under Adam, whose
        updates are about ``lr`` whatever the gradient: an 8-bit weight step is ~5e-3, so at lr 1e-3
        it crossed zero within a few epochs on digits and the run collapsed to chance.
        """
        # transformers < 5.2x has create_optimizer(self) without the model argument.
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        target = self.model if model is None else model
        steps = {id(m.step) for m in target.modules() if isinstance(m, LSQQuantizer) and m.step.requires_grad}
        opt = getattr(optimizer, "optimizer", optimizer)
        moved = []
        for group in opt.param_groups:
            moved += [p for p in group["params"] if id(p) in steps]
            group["params"] = [p for p in group["params"] if id(p) not in steps]
        if moved:
            base = opt.param_groups[0]
            opt.add_param_group(
                {
                    **{k: v for k, v in base.items() if k != "params"},
                    "params": moved,
                    "lr": self.args.learning_rate * self.qat_args.step_lr_scale,
                    "weight_decay": 0.0,
                }
            )
        return optimizer
