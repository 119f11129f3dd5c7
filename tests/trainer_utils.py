"""Shared builders for the trainer tests (also imported by the 2-process script)."""

from __future__ import annotations

import copy
import math

import datasets
import numpy as np
import timm
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from acs_hf import ACSArguments, ACSTrainer, QuantConfig, quantize_model

NUM_CLASSES = 4


def tiny_dataset(n: int = 48, seed: int = 0) -> datasets.Dataset:
    """Class-dependent 16x16 images, so that there is something to learn."""
    g = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_CLASSES
    x = g.standard_normal((n, 3, 16, 16)).astype("float32") * 0.5
    x[:, 0] += labels[:, None, None] * 0.5
    return datasets.Dataset.from_dict({"pixel_values": x, "labels": labels, "index": np.arange(n)}).with_format("torch")


def write_parquet_dataset(root, splits: dict[str, int], num_classes: int = 3, bad_rows: dict | None = None) -> None:
    """A local dataset stored as the Hub stores image datasets: ``data/<split>-00000-of-00001.parquet``
    with an ``image`` (PNG bytes) and a ClassLabel ``label`` column. ``bad_rows`` maps a split to
    row numbers whose bytes are not an image."""
    import io
    from pathlib import Path

    from PIL import Image

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(num_classes)])}
    )
    data = Path(root) / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, n in splits.items():
        images = []
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (12, 10), color=(40 * (i % num_classes), i % 255, 0)).save(buf, format="PNG")
            bad = i in (bad_rows or {}).get(split, ())
            images.append({"bytes": b"not an image" if bad else buf.getvalue(), "path": None})
        ds = datasets.Dataset.from_dict({"image": images, "label": [i % num_classes for i in range(n)]}, features)
        ds.to_parquet(str(data / f"{split}-00000-of-00001.parquet"))


#: timm's test-sized ResNet (BasicBlock and Bottleneck, BatchNorm, deep stem): fast, and every
#: layer type the trainer handles in ResNet-18.
TINY_MODEL = "test_resnet"


def models(seed: int = 0, config: QuantConfig | None = None, family: str = "timm"):
    """A tiny FP teacher and its quantized copy: a timm model, or (``family="transformers"``) a
    transformers ViT for the same 16x16 inputs."""
    torch.manual_seed(seed)
    if family == "transformers":
        from transformers import ViTConfig, ViTForImageClassification

        vit = ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=NUM_CLASSES)  # fmt: skip
        teacher = ViTForImageClassification(vit)
    else:
        teacher = timm.create_model(TINY_MODEL, num_classes=NUM_CLASSES)
    student = quantize_model(copy.deepcopy(teacher), config or QuantConfig(weight_bits=4, act_bits=4))
    return student, teacher


class Recorder(TrainerCallback):
    """Which dataset indices each training epoch consumed."""

    def __init__(self):
        self.epoch = 0
        self.seen: dict[int, list[int]] = {}

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch = math.floor(state.epoch + 1e-6)

    def record(self, inputs):
        self.seen.setdefault(self.epoch, []).extend(inputs["index"].tolist())


class RecordingACSTrainer(ACSTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorder = Recorder()
        self.add_callback(self.recorder)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and "index" in inputs:
            self.recorder.record(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class RecordingPlainTrainer(Trainer):
    """A stock Trainer on the same data (timm models take a tensor, hence compute_loss)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorder = Recorder()
        self.add_callback(self.recorder)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.recorder.record(inputs)
        return F.cross_entropy(model(inputs["pixel_values"]), inputs["labels"])


def training_args(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        num_train_epochs=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=16,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def acs_trainer(
    out, acs_kwargs=None, args_kwargs=None, ds=None, seed=0, cls=RecordingACSTrainer, config=None, family="timm"
):
    ds = ds if ds is not None else tiny_dataset()
    student, teacher = models(seed, config, family)
    return cls(
        model=student,
        args=training_args(out, **(args_kwargs or {})),
        train_dataset=ds,
        acs_args=ACSArguments(**{"fraction": 0.25, "selection_interval": 2, **(acs_kwargs or {})}),
        teacher_model=teacher,
        score_dataset=ds,
    )
