"""Argument dataclasses, readable by ``transformers.HfArgumentParser`` (command line or YAML)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .selection import SCHEDULES, SELECTORS, Selector, check_schedule, create_selector, list_selectors

__all__ = ["QATArguments", "ACSArguments", "ModelArguments", "DataArguments", "RunArguments", "check_number"]


#: Resize interpolations timm's transforms accept.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming", "random")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_number(
    name: str,
    value: object,
    low: float,
    high: float | None = None,
    *,
    low_open: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """Refuse ``value`` unless it is a finite number (an int when ``integer``) in ``[low, high]``
    (``(low, high]`` when ``low_open``; no upper bound when ``high`` is None), or None when
    ``optional``. The error names the argument, the value and what is accepted."""
    if value is None and optional:
        return
    kind_ok = isinstance(value, int) and not isinstance(value, bool) if integer else _finite(value)
    if kind_ok and (value > low if low_open else value >= low) and (high is None or value <= high):
        return
    kind = "an integer" if integer else "a finite number"
    if high is None:
        accepted = f"{'>' if low_open else '>='} {low}"
    else:
        accepted = f"in {'(' if low_open else '['}{low}, {high}]"
    raise ValueError(f"{name} must be {kind} {accepted}{' or unset' if optional else ''}, got {value!r}")


@dataclass
class QATArguments:
    """How the quantized student learns: distillation, LSQ step-size learning rate, calibration."""

    kd_temperature: float = field(default=1.0, metadata={"help": "Distillation temperature T (> 0)."})
    kd_alpha: float = field(
        default=1.0,
        metadata={"help": "Weight of the distillation loss; 1 - kd_alpha goes to cross-entropy (1 = paper)."},
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

    def __post_init__(self) -> None:
        check_number("kd_temperature", self.kd_temperature, 0, low_open=True)
        check_number("kd_alpha", self.kd_alpha, 0, 1)
        check_number("step_lr_scale", self.step_lr_scale, 0, low_open=True)
        check_number("calibration_batches", self.calibration_batches, 1, integer=True)


@dataclass
class ACSArguments(QATArguments):
    """How the coreset is chosen (plus the :class:`QATArguments` of the student's training).

    Each value is validated once, by the code that owns its meaning: the selector registry checks
    the method, its schedule and the fraction it accepts; this class only what it alone defines.
    """

    selection_method: str = field(
        default="acs",
        metadata={"help": "Coreset method, one of acs_hf.list_selectors(): " + ", ".join(list_selectors()) + "."},
    )
    fraction: float = field(default=0.1, metadata={"help": "Share of the training set per round, in (0, 1]."})
    selection_interval: int = field(
        default=10, metadata={"help": "R: re-select every R epochs (at epochs 0, R, 2R, ...)."}
    )
    evs_schedule: str = field(
        default="cosine",
        metadata={"help": "beta(t) weighting EVS against DS: " + ", ".join(SCHEDULES) + " (cosine: paper)."},
    )
    class_balanced: bool = field(default=True, metadata={"help": "Each class keeps its top share."})
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
    score_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Cache the decoded scoring view (uint8 at the score resolution) in a temporary folder here, "
            "so that scoring rounds after the first decode no image. Same scores; removed when training ends. "
            "Needs N x H x W x 3 bytes of local disk (ImageNet at 224: 193 GB across all processes)."
        },
    )
    selection_seed: int = field(default=0, metadata={"help": "Seed of the random selectors."})
    selection_temperature: float = field(
        default=1.0,
        metadata={"help": "acs_gumbel: sampling temperature on the standardised ACS score (0: top-k, inf: uniform)."},
    )
    selection_share: float = field(
        default=0.5, metadata={"help": "acs_mixed: share of each quota taken by ACS top-k; the rest is random."}
    )
    score_pool_fraction: float = field(
        default=1.0,
        metadata={
            "help": "p in [fraction, 1]: each round scores only a fresh class-balanced random pool of p*N samples "
            "and keeps the top fraction*N within it (1 = the paper: score every sample). Scoring costs p of a full "
            "pass."
        },
    )
    reuse_training_scores: bool = field(
        default=False,
        metadata={
            "help": "Samples trained on since the last round take their scores from the training pass (the "
            "student's logits on its training view, and the distillation teacher's for DS) at no extra forward; "
            "they join the candidate pool first, and the scoring pass covers only the rest of the pool."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.create_selector().check_fraction(self.fraction)
        check_number("selection_interval", self.selection_interval, 1, integer=True)
        check_number("score_batch_size", self.score_batch_size, 1, integer=True, optional=True)
        self._check_score_source()

    def _check_score_source(self) -> None:
        p = self.score_pool_fraction
        if not (_finite(p) and 0 < p <= 1 and p >= self.fraction):
            raise ValueError(f"score_pool_fraction must be a number in [fraction, 1] = [{self.fraction}, 1], got {p!r}")
        if p == 1 and not self.reuse_training_scores:
            return
        selector = self.create_selector()
        what = f"score_pool_fraction={p}" if p < 1 else "reuse_training_scores=true"
        if not selector.needs_model or selector.selects_all:
            raise ValueError(f"{what} acts only on selectors that score samples, not {self.selection_method!r}")
        if not selector.supports_candidates:
            raise ValueError(f"{what} is not supported by {self.selection_method!r} (it needs every sample's score)")

    def create_selector(self) -> Selector:
        """The registered selector these arguments name, built with the settings it declares
        (raises on an unknown method, or a bad value of any selector setting)."""
        if self.selection_method not in list_selectors():
            raise ValueError(
                f"selection_method={self.selection_method!r} is unknown; accepted: {', '.join(list_selectors())}"
            )
        cls = SELECTORS[self.selection_method]
        if "schedule" not in cls.settings:
            check_schedule(self.evs_schedule)  # a typo must not pass silently because no schedule is used
        kwargs = {keyword: getattr(self, field) for keyword, field in cls.settings.items()}
        return create_selector(self.selection_method, class_balanced=self.class_balanced, **kwargs)

    def settings(self) -> dict[str, Any]:
        """The set values that act on this run's selector, as a dict (for model cards): only the
        selector's own settings, no teacher cache without a teacher, no scoring setting for a
        selector that scores nothing, no interval for a static one."""
        selector = self.create_selector()
        own = set(selector.settings.values())
        unused = {f for cls in SELECTORS.values() for f in cls.settings.values()} - own
        if not selector.needs_teacher:
            unused |= {"cache_teacher_outputs", "teacher_cache_dir"}
        if not selector.needs_model:
            unused |= {"score_batch_size", "score_cache_dir", "score_pool_fraction", "reuse_training_scores"}
        if not selector.dynamic:
            unused.add("selection_interval")
        if selector.selects_all:
            unused |= {"fraction", "class_balanced", "selection_seed"}
        return {k: v for k, v in asdict(self).items() if v is not None and k not in unused}


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
        check_number("fp_warmup_epochs", self.fp_warmup_epochs, 0)
        check_number("fp_warmup_learning_rate", self.fp_warmup_learning_rate, 0, low_open=True, optional=True)
        check_number("image_size", self.image_size, 8, integer=True, optional=True)


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
            if len(lo_hi) != 2 or not all(_finite(v) and v > 0 for v in lo_hi) or not lo_hi[0] <= lo_hi[1] <= upper:
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
            "help": "Also write model.onnx beside the checkpoint: QuantizeLinear/DequantizeLinear around every "
            "quantized layer, integer weights (int4 for 2-4 bits), for ONNX Runtime (pip install 'acs_hf[onnx]')."
        },
    )
