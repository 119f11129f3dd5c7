"""The selector registry: one class per coreset method, all with the same interface.

A selector declares which per-sample statistics it needs (``required_stats``, names produced by
the scoring pass: ``evs``, ``ds``, ``entropy``, ``margin``, ``least_confidence``; ``labels`` is
always given) and maps them to a sorted LongTensor of dataset indices with
``select(stats, epoch, num_epochs, fraction, generator)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .coreset import check_fraction, select_coreset
from .schedules import check_schedule, evs_weight

__all__ = [
    "Selector",
    "register_selector",
    "create_selector",
    "list_selectors",
    "selection_generator",
    "SELECTORS",
]

SELECTORS: dict[str, type[Selector]] = {}


def register_selector(cls: type[Selector]) -> type[Selector]:
    """Class decorator: make ``cls`` available to :func:`create_selector` under ``cls.name``."""
    SELECTORS[cls.name] = cls
    return cls


def list_selectors() -> list[str]:
    return sorted(SELECTORS)


def create_selector(name: str, **kwargs: Any) -> Selector:
    """Build the selector registered as ``name`` (e.g. ``create_selector("acs", schedule="cosine")``)."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selection method {name!r}; registered: {', '.join(list_selectors())}")
    return SELECTORS[name](**kwargs)


def selection_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch): every process draws the same random subset."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))
    return g


class Selector:
    """Base class. Subclasses set ``name`` and ``required_stats`` and implement :meth:`scores`."""

    name: ClassVar[str]
    #: The coreset changes at every selection round (False: chosen once for the whole run).
    dynamic: ClassVar[bool] = True
    #: Trains on every sample in the Trainer's own order: no coreset, no scoring pass.
    selects_all: ClassVar[bool] = False

    def __init__(self, class_balanced: bool = True) -> None:
        self.class_balanced = class_balanced

    @property
    def required_stats(self) -> tuple[str, ...]:
        return ()

    @property
    def needs_model(self) -> bool:
        """Whether a round needs model outputs (False: the labels are enough)."""
        return bool(self.required_stats)

    def check_fraction(self, fraction: float) -> None:
        """Raise ``ValueError`` if this selector cannot select ``fraction`` of the data."""
        check_fraction(fraction)

    def scores(self, stats: dict[str, torch.Tensor], epoch: int, num_epochs: int, generator) -> torch.Tensor:
        raise NotImplementedError

    def select(
        self,
        stats: dict[str, torch.Tensor],
        epoch: int,
        num_epochs: int,
        fraction: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        self.check_fraction(fraction)
        missing = [k for k in ("labels", *self.required_stats) if k not in stats]
        if missing:
            raise ValueError(f"selector {self.name!r} needs statistics {missing}; got {sorted(stats)}")
        scores = self.scores(stats, epoch, num_epochs, generator)
        return select_coreset(scores, stats["labels"], fraction, class_balanced=self.class_balanced)

    def describe(self, epoch: int, num_epochs: int) -> dict[str, Any]:
        """Numbers worth logging for a round (e.g. ACS's beta)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class _StatSelector(Selector):
    stat: ClassVar[str]

    @property
    def required_stats(self) -> tuple[str, ...]:
        return (self.stat,)

    def scores(self, stats, epoch, num_epochs, generator):
        return stats[self.stat]


@register_selector
class ACSSelector(Selector):
    """Adaptive Coreset Selection: beta(t) * EVS + (1 - beta(t)) * DS (Huang et al., 2024)."""

    name = "acs"

    def __init__(self, class_balanced: bool = True, schedule: str = "cosine") -> None:
        super().__init__(class_balanced)
        check_schedule(schedule)
        self.schedule = schedule

    @property
    def required_stats(self) -> tuple[str, ...]:
        return {"evs": ("evs",), "ds": ("ds",)}.get(self.schedule, ("evs", "ds"))

    def scores(self, stats, epoch, num_epochs, generator):
        beta = evs_weight(epoch, num_epochs, self.schedule)
        if beta == 1.0:
            return stats["evs"].float()
        if beta == 0.0:
            return stats["ds"].float()
        return beta * stats["evs"].float() + (1 - beta) * stats["ds"].float()

    def describe(self, epoch, num_epochs):
        return {"beta": evs_weight(epoch, num_epochs, self.schedule)}


#: Selectors that keep the top of one statistic of the scoring pass.
STAT_SELECTORS = {
    "evs": "Error vector score only: ||p_q - onehot(y)||.",
    "ds": "Disagreement score only: ||p_q - p_fp||.",
    "entropy": "Predictive entropy of the student.",
    "margin": "1 - (top-1 minus top-2 probability) of the student.",
    "least_confidence": "1 - top-1 probability of the student.",
}
for _stat, _doc in STAT_SELECTORS.items():
    register_selector(type(f"{_stat.title().replace('_', '')}Selector", (_StatSelector,), {
        "name": _stat, "stat": _stat, "__doc__": _doc, "__module__": __name__,
    }))  # fmt: skip


def _random_scores(stats, generator) -> torch.Tensor:
    if generator is None:
        raise ValueError("random selectors need an explicit torch.Generator (see selection_generator)")
    return torch.rand(stats["labels"].numel(), generator=generator, dtype=torch.float64)


@register_selector
class RandomDynamicSelector(Selector):
    """A fresh random subset at every round: the fair baseline for a dynamic method like ACS."""

    name = "random_dynamic"

    def scores(self, stats, epoch, num_epochs, generator):
        return _random_scores(stats, generator)


@register_selector
class RandomStaticSelector(Selector):
    """One random subset, drawn at the first round and kept for the whole run."""

    name = "random_static"
    dynamic = False

    def __init__(self, class_balanced: bool = True) -> None:
        super().__init__(class_balanced)
        self.subset: torch.Tensor | None = None

    def scores(self, stats, epoch, num_epochs, generator):
        return _random_scores(stats, generator)

    def select(self, stats, epoch, num_epochs, fraction, generator=None):
        if self.subset is None:
            self.subset = super().select(stats, epoch, num_epochs, fraction, generator)
        return self.subset.clone()

    def state_dict(self):
        return {"subset": self.subset}

    def load_state_dict(self, state):
        self.subset = state.get("subset")


@register_selector
class FullSelector(Selector):
    """All data (plain QAT); ``fraction`` must be 1."""

    name = "full"
    dynamic = False
    selects_all = True

    def check_fraction(self, fraction: float) -> None:
        if fraction != 1:
            raise ValueError(f"selection_method='full' trains on all data and needs fraction=1, got {fraction!r}")

    def select(self, stats, epoch, num_epochs, fraction, generator=None):
        self.check_fraction(fraction)
        return torch.arange(stats["labels"].numel())
