"""Argument dataclasses, readable by ``transformers.HfArgumentParser`` (command line or YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .selection import SCHEDULES, list_selectors

__all__ = ["ACSArguments"]


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
        default=0.1, metadata={"help": "Learning-rate multiplier of the activation step sizes (paper: 0.1)."}
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
