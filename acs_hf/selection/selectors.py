"""The selector registry: one class per coreset method, all with the same interface.

A selector declares which per-sample statistics it needs (``required_stats``, names produced by
the scoring pass: ``evs``, ``ds``, ``entropy``, ``margin``, ``least_confidence``; ``labels`` is
always given) and maps them to a sorted LongTensor of dataset indices with
``select(stats, epoch, num_epochs, fraction, generator)``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from .coreset import check_fraction, class_quotas, coreset_size, rank_within_class, select_coreset
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
    #: Can select from a scored candidate pool (``select(..., candidates=mask)``).
    supports_candidates: ClassVar[bool] = True
    #: The selector's own settings: constructor keyword -> name of the user-facing argument
    #: (``ACSArguments`` field) that sets it. Builders pass exactly these; cards list only these.
    settings: ClassVar[dict[str, str]] = {}
    #: Part of the Adaptive Coreset Selection family (the paper's scores): tags and cards cite it.
    acs_family: ClassVar[bool] = False

    def __init__(self, class_balanced: bool = True) -> None:
        self.class_balanced = class_balanced

    @property
    def required_stats(self) -> tuple[str, ...]:
        return ()

    @property
    def needs_model(self) -> bool:
        """Whether a round needs model outputs (False: the labels are enough)."""
        return bool(self.required_stats)

    @property
    def needs_teacher(self) -> bool:
        """Whether a round needs the FP teacher's outputs (the disagreement score)."""
        return "ds" in self.required_stats

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
        candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The coreset: ``round(fraction * N)`` sorted indices.

        With ``candidates`` (an [N] bool mask, see :func:`~acs_hf.selection.coreset.draw_pool`)
        only those samples' statistics are read (the others may be NaN): the selector scores the
        candidates alone and keeps the top of each class's quota among them.
        """
        self.check_fraction(fraction)
        missing = [k for k in ("labels", *self.required_stats) if k not in stats]
        if missing:
            raise ValueError(f"selector {self.name!r} needs statistics {missing}; got {sorted(stats)}")
        if candidates is None:
            scores = self.scores(stats, epoch, num_epochs, generator)
        else:
            if not self.supports_candidates:
                raise ValueError(f"selector {self.name!r} cannot select from a candidate pool; score all samples")
            idx = candidates.reshape(-1).nonzero().flatten()
            scores = torch.full((stats["labels"].numel(),), math.nan, dtype=torch.float64)
            scores[idx] = self.scores({k: v[idx] for k, v in stats.items()}, epoch, num_epochs, generator).double()
        return select_coreset(scores, stats["labels"], fraction, self.class_balanced, candidates)

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
    settings = {"schedule": "evs_schedule"}
    acs_family = True

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


def _gumbel(n: int, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        raise ValueError("sampling selectors need an explicit torch.Generator (see selection_generator)")
    u = torch.rand(n, generator=generator, dtype=torch.float64).clamp_(1e-300, 1.0)
    return -torch.log(-torch.log(u))


@register_selector
class ACSGumbelSelector(ACSSelector):
    """ACS sampled instead of cut: the coreset is drawn without replacement, each sample with
    probability proportional to ``exp(z / temperature)``, ``z`` the round's ACS score standardised
    (zero mean, unit deviation, so one temperature means the same on every round and dataset).
    Gumbel top-k: keep the top of ``z / temperature + Gumbel noise``, class-balanced and of exact
    size like ``acs``. ``temperature=0`` is the paper's top-k (``acs``), ``inf`` a uniform draw
    (``random_dynamic``); hard top-k over-weights outliers at small fractions, sampling keeps some
    of the easier data (cf. InfoBatch, ICLR 2024; RS2, ICLR 2024)."""

    name = "acs_gumbel"
    settings = {**ACSSelector.settings, "temperature": "selection_temperature"}

    def __init__(self, class_balanced: bool = True, schedule: str = "cosine", temperature: float = 1.0) -> None:
        super().__init__(class_balanced, schedule)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0 (0: top-k, inf: uniform), got {temperature!r}")
        self.temperature = float(temperature)

    def scores(self, stats, epoch, num_epochs, generator):
        score = super().scores(stats, epoch, num_epochs, generator).double()
        if self.temperature == 0:
            return score
        noise = _gumbel(score.numel(), generator)
        if math.isinf(self.temperature):
            return noise
        z = (score - score.mean()) / score.std(unbiased=False).clamp_min(1e-12)
        return z / self.temperature + noise

    def describe(self, epoch, num_epochs):
        return {**super().describe(epoch, num_epochs), "temperature": self.temperature}


@register_selector
class ACSMixedSelector(ACSSelector):
    """A share of the budget by ACS top-k, the rest drawn uniformly from the remaining samples.

    Per class (class-balanced) or overall: of a quota ``q`` the ``round(share * q)`` highest ACS
    scores are kept, and ``q - round(share * q)`` samples are drawn at random from the others, so
    the size is exact. ``share=1`` is ``acs``, ``share=0`` a uniform draw (``random_dynamic``).
    """

    name = "acs_mixed"
    settings = {**ACSSelector.settings, "share": "selection_share"}
    supports_candidates = False  # its random share is drawn from all non-top samples

    def __init__(self, class_balanced: bool = True, schedule: str = "cosine", share: float = 0.5) -> None:
        super().__init__(class_balanced, schedule)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise ValueError(f"share must be a number in [0, 1], got {share!r}")
        self.share = float(share)

    def select(self, stats, epoch, num_epochs, fraction, generator=None, candidates=None):
        self.check_fraction(fraction)
        if candidates is not None:
            return super().select(stats, epoch, num_epochs, fraction, generator, candidates)  # raises
        if "labels" not in stats or any(k not in stats for k in self.required_stats):
            return super().select(stats, epoch, num_epochs, fraction, generator)  # raises, naming what is missing
        score = self.scores(stats, epoch, num_epochs, generator).double()
        labels = stats["labels"].long().cpu()
        n = score.numel()
        groups = labels if self.class_balanced else torch.zeros(n, dtype=torch.long)
        counts = torch.bincount(groups)
        quotas = class_quotas(counts, fraction) if self.class_balanced else torch.tensor([coreset_size(n, fraction)])
        kept = torch.floor(quotas.double() * self.share + 0.5).long()  # round half up, like coreset_size
        # Rank inside each group by descending score (ties: lower index), as select_coreset ranks.
        order, rank_sorted = rank_within_class(score, groups, counts)
        rank = torch.empty(n, dtype=torch.long)
        rank[order] = rank_sorted
        keys = _gumbel(n, generator) if self.share < 1 else torch.zeros(n, dtype=torch.float64)
        top = rank < kept[groups]  # kept first; the rest of each quota goes to the largest random keys
        keys = torch.where(top, torch.finfo(torch.float64).max, keys)
        return select_coreset(keys, labels, fraction, self.class_balanced)

    def describe(self, epoch, num_epochs):
        return {**super().describe(epoch, num_epochs), "share": self.share}


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

    def select(self, stats, epoch, num_epochs, fraction, generator=None, candidates=None):
        if self.subset is None:
            self.subset = super().select(stats, epoch, num_epochs, fraction, generator, candidates)
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

    def select(self, stats, epoch, num_epochs, fraction, generator=None, candidates=None):
        self.check_fraction(fraction)
        return torch.arange(stats["labels"].numel())
