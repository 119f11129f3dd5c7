"""The recipe's argument dataclasses (model, data, run), readable by ``transformers.HfArgumentParser``.

The trainer's own (:class:`~acs_hf.QATArguments`, :class:`~acs_hf.ACSArguments`) live in
:mod:`acs_hf.training.arguments` and are importable from here too, so one import serves a script.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..integrations.weights import check_weights_file, file_digest, has_downloadable_weights
from ..layout import RunLayout
from ..training.arguments import ACSArguments, QATArguments, check_number, is_finite_number

__all__ = ["ModelArguments", "DataArguments", "RunArguments", "ACSArguments", "QATArguments", "check_number"]

#: Resize interpolations timm's transforms accept.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming", "random")


@dataclass
class ModelArguments:
    """Which model to quantize and which FP model teaches it."""

    model_name: str = field(
        default="resnet18",
        metadata={
            "help": "timm model id (resnet18, vit_tiny_patch16_224, ...), 'hf-hub:<repo>', a transformers Hub id "
            "('org/name', AutoModelForImageClassification) or a local folder (timm or transformers)."
        },
    )
    pretrained: bool = field(
        default=False, metadata={"help": "Start from the model's pretrained weights (timm or transformers; downloads)."}
    )
    teacher_model_name: str | None = field(
        default=None,
        metadata={
            "help": "FP teacher (timm id, hf-hub: id, transformers id or folder; pretrained). Default: a frozen "
            "copy of the FP model the student starts from."
        },
    )
    pretrained_weights: str | None = field(
        default=None,
        metadata={
            "help": "Local weights file the FP model starts from: safetensors, or a torch checkpoint (a state dict, "
            "or a dict holding one under 'state_dict' / 'model'; a DataParallel 'module.' prefix is removed). "
            "Every tensor must match the model; it is also the teacher unless --teacher_model_name is given."
        },
    )
    teacher_pretrained_weights: str | None = field(
        default=None,
        metadata={
            "help": "Local weights file for --teacher_model_name (same formats as --pretrained_weights), instead "
            "of the teacher's Hub weights."
        },
    )
    image_size: int | None = field(default=None, metadata={"help": "Input resolution (default: the model's)."})
    fp_warmup_epochs: float = field(
        default=0,
        metadata={
            "help": "Train the FP model this many epochs on all data before QAT (for users without "
            "pretrained weights); it then becomes the teacher and the QAT starting point."
        },
    )
    fp_warmup_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the FP warm-up (default: --learning_rate)."}
    )

    def __post_init__(self) -> None:
        if self.pretrained_weights and self.pretrained:
            raise ValueError(
                f"pretrained=True and pretrained_weights={self.pretrained_weights!r} both choose the starting "
                "weights: give one of them"
            )
        if self.teacher_pretrained_weights and not self.teacher_model_name:
            raise ValueError(
                f"teacher_pretrained_weights={self.teacher_pretrained_weights!r} needs --teacher_model_name (without "
                "it the teacher is the FP model, which --pretrained_weights sets)"
            )
        for name in ("pretrained_weights", "teacher_pretrained_weights"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{name}={path!r} is not a file (a .safetensors or torch checkpoint file)")
        check_number("fp_warmup_epochs", self.fp_warmup_epochs, 0)
        check_number("fp_warmup_learning_rate", self.fp_warmup_learning_rate, 0, low_open=True, optional=True)
        check_number("image_size", self.image_size, 8, integer=True, optional=True)

    def start_settings(self) -> dict[str, Any]:
        """Where the FP model and the teacher come from, as a checkpoint records it (files by digest)."""
        return {
            "pretrained": self.pretrained,
            "teacher_model_name": self.teacher_model_name,
            "pretrained_weights": self.pretrained_weights and file_digest(self.pretrained_weights),
            "teacher_pretrained_weights": self.teacher_pretrained_weights
            and file_digest(self.teacher_pretrained_weights),
        }

    def check_start_weights(self) -> None:
        """Each weights file fits its model (names and shapes; the class count is checked once the data is
        loaded), and a timm model asked for its pretrained weights has some to download."""
        for argument, name in (("pretrained_weights", self.model_name),
                               ("teacher_pretrained_weights", self.teacher_model_name)):  # fmt: skip
            if getattr(self, argument):
                check_weights_file(name, getattr(self, argument), self.image_size, argument)
        wants = [("pretrained_weights", self.model_name)] if self.pretrained else []
        if self.teacher_model_name and not self.teacher_pretrained_weights:  # the teacher is pretrained
            wants.append(("teacher_pretrained_weights", self.teacher_model_name))
        for argument, name in wants:
            if not has_downloadable_weights(name):
                raise ValueError(
                    f"{name!r} has no pretrained weights to download (timm knows no URL or Hub repo for it); "
                    f"give a local weights file with --{argument}"
                )


@dataclass
class DataArguments:
    """Where the images come from. With neither dataset_name nor train_dir: the embedded digits."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id (ILSVRC/imagenet-1k, uoft-cs/cifar100, ...) or 'digits' (embedded)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder of the training split."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder of the validation split."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (auto-detected)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (auto-detected)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})
    score_image_size: int | None = field(
        default=None,
        metadata={
            "help": "Resolution of the scoring view (default: the eval resolution). Lower is cheaper per scoring "
            "forward (about the squared ratio), for models that take any input size (CNNs)."
        },
    )
    skip_bad_images: bool = field(
        default=False,
        metadata={
            "help": "Decode every image once and drop (and count) those that fail. Without it, image folders get a "
            "header-only check that fails, before training, listing the files that are not images."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache directory."})
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={
            "help": "Processes for the image checks (default: every core for 20,000 rows or more). They run "
            "once per node, on the local main process, and datasets caches it for the other ranks and resumes."
        },
    )

    # timm's augmentation controls (timm train.py's names, underscored); defaults are timm's.
    hflip: float = field(default=0.5, metadata={"help": "Horizontal flip probability (0 for digits, text, scans)."})
    vflip: float = field(default=0.0, metadata={"help": "Vertical flip probability."})
    scale: list[float] = field(
        default_factory=lambda: [0.08, 1.0], metadata={"help": "Random-resized-crop area range (two numbers)."}
    )
    ratio: list[float] = field(
        default_factory=lambda: [3 / 4, 4 / 3], metadata={"help": "Random-resized-crop aspect range (two numbers)."}
    )
    color_jitter: float = field(default=0.4, metadata={"help": "Colour jitter strength (0: none)."})
    auto_augment: str | None = field(
        default=None, metadata={"help": "timm AutoAugment/RandAugment policy, e.g. rand-m9-mstd0.5-inc1."}
    )
    reprob: float = field(default=0.0, metadata={"help": "Random erasing probability."})
    interpolation: str | None = field(
        default=None, metadata={"help": "Resize interpolation: " + ", ".join(INTERPOLATIONS) + " (default: model's)."}
    )
    crop_pct: float | None = field(
        default=None, metadata={"help": "Eval centre-crop share of the resized image, in (0, 1] (default: model's)."}
    )

    def __post_init__(self) -> None:
        for name, low in (("max_train_samples", 1), ("max_eval_samples", 1), ("preprocessing_num_workers", 1),
                          ("score_image_size", 8)):  # fmt: skip
            check_number(name, getattr(self, name), low, integer=True, optional=True)
        for name in ("hflip", "vflip", "reprob"):
            check_number(name, getattr(self, name), 0, 1)
        check_number("color_jitter", self.color_jitter, 0)
        for name, upper in (("scale", 1.0), ("ratio", math.inf)):
            lo_hi = list(getattr(self, name))
            if (
                len(lo_hi) != 2
                or not all(is_finite_number(v) and v > 0 for v in lo_hi)
                or not lo_hi[0] <= lo_hi[1] <= upper
            ):
                raise ValueError(
                    f"{name} must be two numbers 0 < low <= high{' <= 1' if upper == 1 else ''}, got {lo_hi!r}"
                )
        if self.interpolation is not None and self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        check_number("crop_pct", self.crop_pct, 0, 1, low_open=True, optional=True)
        if self.auto_augment:
            from timm.data import create_transform

            try:  # timm parses the policy string; a typo fails here, not in a loader worker
                create_transform(32, is_training=True, auto_augment=self.auto_augment)
            except Exception as e:  # timm raises assertions and value errors for bad policies
                raise ValueError(f"auto_augment={self.auto_augment!r} is not a timm policy ({e})") from e

    def augmentation(self) -> dict:
        """Keyword arguments for :func:`acs_hf.data.prepare_datasets` ``augmentation``."""
        return {
            "hflip": self.hflip, "vflip": self.vflip, "scale": tuple(self.scale), "ratio": tuple(self.ratio),
            "color_jitter": self.color_jitter, "auto_augment": self.auto_augment, "re_prob": self.reprob,
            "interpolation": self.interpolation, "crop_pct": self.crop_pct,
        }  # fmt: skip


@dataclass
class RunArguments:
    """How a run treats its output folder (transformers 5 dropped ``overwrite_output_dir``)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Write into an output_dir that holds another run's results (they are moved aside into a hidden "
            "<output_dir>/.replaced-* folder first). Without it such a folder is refused unless "
            "--resume_from_checkpoint continues that run."
        },
    )
    export_onnx: bool = field(
        default=False,
        metadata={
            "help": f"Also write {RunLayout.ONNX} beside the checkpoint: QuantizeLinear/DequantizeLinear around every "
            "quantized layer, integer weights (int4 for 2-4 bits), for ONNX Runtime (pip install 'acs_hf[onnx]'); "
            "its validation accuracy in ONNX Runtime and agreement with PyTorch go to eval_results.json."
        },
    )
