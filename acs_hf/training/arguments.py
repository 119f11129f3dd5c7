"""The trainer's argument dataclasses (QAT, ACS), readable by ``transformers.HfArgumentParser`` (CLI or YAML)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..selection import SCHEDULES, SELECTORS, Selector, check_schedule, create_selector, list_selectors

__all__ = ["QATArguments", "ACSArguments", "check_number", "is_finite_number"]


def is_finite_number(value: object) -> bool:
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
    kind_ok = isinstance(value, int) and not isinstance(value, bool) if integer else is_finite_number(value)
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
        selector = self.create_selector()  # validates the method and every selector setting
        selector.check_fraction(self.fraction)
        check_number("selection_interval", self.selection_interval, 1, integer=True)
        check_number("score_batch_size", self.score_batch_size, 1, integer=True, optional=True)
        self._check_score_source(selector)

    def _check_score_source(self, selector: Selector) -> None:
        p = self.score_pool_fraction
        if not (is_finite_number(p) and 0 < p <= 1 and p >= self.fraction):
            raise ValueError(f"score_pool_fraction must be a number in [fraction, 1] = [{self.fraction}, 1], got {p!r}")
        if p == 1 and not self.reuse_training_scores:
            return
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

    def settings(self, selector: Selector | None = None) -> dict[str, Any]:
        """The set values that act on this run's selector, as a dict (for model cards): only the
        selector's own settings, no teacher cache without a teacher, no scoring setting for a
        selector that scores nothing, no interval for a static one."""
        selector = selector or self.create_selector()
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
