"""Argument dataclasses, readable by ``transformers.HfArgumentParser`` (command line or YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .selection import SCHEDULES, list_selectors

__all__ = ["ACSArguments", "ModelArguments", "DataArguments", "QuantArguments"]


@dataclass
class ACSArguments:
    """How the coreset is chosen and how the student learns from it."""

    selection_method: str = field(
        default="acs",
        metadata={
            "help": "Coreset method: acs, evs, ds, random_static, random_dynamic, entropy, margin, "
            "least_confidence, full."
        },
    )
    fraction: float = field(default=0.1, metadata={"help": "Share of the training set per round, in (0, 1]."})
    selection_interval: int = field(
        default=10, metadata={"help": "R: re-select every R epochs (at epochs 0, R, 2R, ...)."}
    )
    evs_schedule: str = field(
        default="cosine",
        metadata={"help": "beta(t) weighting EVS against DS: cosine (paper), cosine_half, linear, evs, ds."},
    )
    class_balanced: bool = field(default=True, metadata={"help": "Each class keeps its top share."})
    kd_temperature: float = field(default=1.0, metadata={"help": "Distillation temperature T (> 0)."})
    kd_alpha: float = field(
        default=1.0,
        metadata={"help": "Weight of the distillation loss; 1 - kd_alpha goes to cross-entropy (1 = paper)."},
    )
    score_batch_size: int | None = field(
        default=None,
        metadata={"help": "Per-device batch size of the scoring pass (default: eval batch size)."},
    )
    cache_teacher_outputs: bool = field(
        default=True, metadata={"help": "Compute teacher probabilities once and reuse them every round."}
    )
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Memory-map the teacher cache here (default: <output_dir>/teacher_cache when "
            "caching; 'memory' keeps it in RAM)."
        },
    )
    step_lr_scale: float = field(
        default=0.1,
        metadata={
            "help": "Learning-rate multiplier of the LSQ step sizes (paper: 0.1 for activation steps; "
            "applied to weight steps too, which Adam otherwise drives through zero)."
        },
    )
    calibration_batches: int = field(
        default=4, metadata={"help": "Batches of the un-augmented view used to calibrate quantizers."}
    )
    selection_seed: int = field(default=0, metadata={"help": "Seed of the random selectors."})

    def __post_init__(self) -> None:
        methods = list_selectors()
        if self.selection_method not in methods:
            raise ValueError(f"selection_method={self.selection_method!r} is unknown; accepted: {', '.join(methods)}")
        if isinstance(self.fraction, bool) or not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if self.selection_method == "full" and self.fraction != 1:
            raise ValueError(f"selection_method='full' trains on all data and needs fraction=1, got {self.fraction}")
        if self.selection_interval < 1:
            raise ValueError(f"selection_interval must be >= 1 epoch, got {self.selection_interval!r}")
        if self.evs_schedule not in SCHEDULES:
            raise ValueError(f"evs_schedule={self.evs_schedule!r} is unknown; accepted: {', '.join(SCHEDULES)}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature!r}")
        if not 0 <= self.kd_alpha <= 1:
            raise ValueError(f"kd_alpha must be in [0, 1], got {self.kd_alpha!r}")
        if self.score_batch_size is not None and self.score_batch_size < 1:
            raise ValueError(f"score_batch_size must be >= 1, got {self.score_batch_size!r}")
        if not self.step_lr_scale > 0:
            raise ValueError(f"step_lr_scale must be > 0, got {self.step_lr_scale!r}")
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {self.calibration_batches!r}")


@dataclass
class ModelArguments:
    """Which model to quantize and which FP model teaches it."""

    model_name: str = field(
        default="resnet18",
        metadata={"help": "timm model id (resnet18, vit_tiny_patch16_224, ...), 'hf-hub:<repo>' or a local folder."},
    )
    pretrained: bool = field(default=False, metadata={"help": "Start from timm's pretrained weights (downloads)."})
    teacher_model_name: str | None = field(
        default=None,
        metadata={
            "help": "FP teacher (timm id, hf-hub: id or folder; pretrained). Default: a frozen copy of the "
            "FP model the student starts from."
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
        if self.fp_warmup_epochs < 0:
            raise ValueError(f"fp_warmup_epochs must be >= 0, got {self.fp_warmup_epochs}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")


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
    skip_bad_images: bool = field(
        default=False, metadata={"help": "Drop (and count) images that cannot be decoded instead of failing."}
    )
    streaming: bool = field(default=False, metadata={"help": "Not supported (coresets need a map-style dataset)."})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache directory."})


@dataclass
class QuantArguments:
    """LSQ settings (see acs_hf.QuantConfig)."""

    weight_bits: int = field(default=4, metadata={"help": "Weight bits, 2..8."})
    act_bits: int | None = field(default=4, metadata={"help": "Activation bits, 2..8; None: weights only."})
    first_last_bits: int | None = field(
        default=8, metadata={"help": "Bits of the first layer and the classifier; None keeps them FP."}
    )
    per_channel_weights: bool = field(default=False, metadata={"help": "One weight step per output channel."})
    exclude: list[str] = field(default_factory=list, metadata={"help": "Module-name patterns kept in FP."})
    compile_kernels: bool = field(default=False, metadata={"help": "torch.compile-fused LSQ kernels."})

    def __post_init__(self) -> None:
        self.to_config()  # validate now, before any data or model is loaded

    def to_config(self):
        from .quantization import QuantConfig

        return QuantConfig(
            weight_bits=self.weight_bits,
            act_bits=self.act_bits,
            first_last_bits=self.first_last_bits,
            per_channel_weights=self.per_channel_weights,
            exclude=list(self.exclude),
            compile_kernels=self.compile_kernels,
        )
