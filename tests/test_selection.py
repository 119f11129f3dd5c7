import math

import pytest
import torch

from acs_hf import create_selector, disagreement_score, error_vector_score, evs_weight, select_coreset
from acs_hf.selection import (
    class_quotas,
    entropy_score,
    least_confidence_score,
    list_selectors,
    margin_score,
    selection_generator,
)


def softmax64(logits):
    z = logits.double()
    e = torch.exp(z - z.max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


@pytest.fixture
def logits():
    return torch.randn(64, 7) * 3


# ---------------------------------------------------------------- scores
def test_evs_against_float64(logits):
    labels = torch.randint(0, 7, (64,))
    p = softmax64(logits)
    onehot = torch.zeros_like(p)
    onehot[torch.arange(64), labels] = 1
    expected = ((p - onehot) ** 2).sum(1).sqrt()
    out = error_vector_score(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_evs_by_hand():
    # Uniform over 2 classes, label 0: ||(0.5-1, 0.5)|| = sqrt(0.5).
    assert error_vector_score(torch.zeros(1, 2), torch.tensor([0])).item() == pytest.approx(math.sqrt(0.5))


def test_ds_logits_and_probs(logits):
    t = torch.randn(64, 7)
    expected = ((softmax64(logits) - softmax64(t)) ** 2).sum(1).sqrt()
    torch.testing.assert_close(disagreement_score(logits, t).double(), expected, rtol=1e-5, atol=1e-6)
    from_probs = disagreement_score(logits, teacher_probs=softmax64(t).half())
    torch.testing.assert_close(from_probs.double(), expected, rtol=0, atol=2e-3)
    with pytest.raises(ValueError, match="exactly one"):
        disagreement_score(logits)


def test_uncertainty_scores(logits):
    p = softmax64(logits)
    ent = -(p * p.log()).sum(1)
    top = p.sort(1, descending=True).values
    torch.testing.assert_close(entropy_score(logits).double(), ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(margin_score(logits).double(), 1 - (top[:, 0] - top[:, 1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(least_confidence_score(logits).double(), 1 - top[:, 0], rtol=1e-5, atol=1e-6)


def test_scores_in_bf16_compute_in_float32(logits):
    lb = logits.bfloat16()
    labels = torch.randint(0, 7, (64,))
    out = error_vector_score(lb, labels)
    assert out.dtype == torch.float32
    # Same as the float64 formula on the bf16 values (not on bf16 arithmetic).
    p = softmax64(lb.double())
    onehot = torch.nn.functional.one_hot(labels, 7).double()
    torch.testing.assert_close(out.double(), (p - onehot).norm(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        disagreement_score(lb, lb.float() * 0.5).double(),
        (p - softmax64(lb.double() * 0.5)).norm(dim=1),
        rtol=1e-5,
        atol=1e-6,
    )


def test_score_input_errors():
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        error_vector_score(torch.randn(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie"):
        error_vector_score(torch.randn(2, 3), torch.tensor([0, 3]))


# ---------------------------------------------------------------- schedules
@pytest.mark.parametrize("t", [0, 10, 30, 60, 90, 120])
def test_schedules(t):
    E = 120
    assert evs_weight(t, E, "cosine") == pytest.approx(math.cos(math.pi * t / (2 * E)))
    assert evs_weight(t, E, "cosine_half") == pytest.approx(0.5 * (1 + math.cos(math.pi * t / E)))
    assert evs_weight(t, E, "linear") == pytest.approx(1 - t / E)
    assert evs_weight(t, E, "evs") == 1.0
    assert evs_weight(t, E, "ds") == 0.0


def test_schedule_values_by_hand():
    assert evs_weight(0, 120) == 1.0
    assert evs_weight(60, 120) == pytest.approx(math.sqrt(0.5))
    assert evs_weight(60, 120, "cosine_half") == pytest.approx(0.5)
    assert evs_weight(120, 120) == pytest.approx(0.0, abs=1e-12)


def test_schedule_errors():
    with pytest.raises(
        ValueError, match="evs_schedule='exp' is unknown; accepted: cosine, cosine_half, linear, evs, ds"
    ):
        evs_weight(0, 10, "exp")
    with pytest.raises(ValueError, match="epoch"):
        evs_weight(11, 10)
    with pytest.raises(ValueError, match="epoch"):
        evs_weight(-1, 10)


# ---------------------------------------------------------------- coreset
def make_classes(sizes):
    return torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.37])
def test_class_balanced_sizes_awkward(fraction):
    sizes = [50, 30, 17, 3]
    labels = make_classes(sizes)[torch.randperm(100)]
    scores = torch.rand(100)
    idx = select_coreset(scores, labels, fraction)
    total = math.floor(fraction * 100 + 0.5)
    assert idx.numel() == total
    assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == total
    counts = torch.bincount(labels[idx], minlength=4)
    for c, n in enumerate(sizes):
        assert math.floor(fraction * n + 1e-9) <= counts[c] <= math.ceil(fraction * n - 1e-9)
        # top-k within class: every kept sample outscores every dropped one of its class.
        mask = labels == c
        kept = torch.zeros(100, dtype=torch.bool)
        kept[idx] = True
        if counts[c] and counts[c] < n:
            assert scores[mask & kept].min() > scores[mask & ~kept].max()


def test_quotas_by_hand():
    # 0.25 * [50, 30, 17, 3] = [12.5, 7.5, 4.25, 0.75]; total 25; floors 12+7+4+0 = 23;
    # the two largest remainders (0.75 class 3, then 0.5 class 0 before class 1) get +1.
    assert class_quotas(torch.tensor([50, 30, 17, 3]), 0.25).tolist() == [13, 7, 4, 1]
    # 0.1 * [50, 30, 17, 3] = [5, 3, 1.7, 0.3]; total 10; floors [5, 3, 1, 0], and class 3 (3 images)
    # is raised to its floor of one: [5, 3, 1, 1] sums to 10, no slot left for class 2's remainder.
    assert class_quotas(torch.tensor([50, 30, 17, 3]), 0.1).tolist() == [5, 3, 1, 1]


def test_every_class_with_an_image_gets_a_slot_every_round():
    """A 1-image class at f = 0.3 used to get 0 slots in every round (its 0.3 lost to class 0's 0.7)."""
    # 0.3 * [9, 1] = [2.7, 0.3]; total 3; floors [2, 0] -> [2, 1]: class 1's floor of one takes the extra slot.
    assert class_quotas(torch.tensor([9, 1]), 0.3).tolist() == [2, 1]
    labels = torch.tensor([0] * 9 + [1])
    for seed in range(5):
        scores = torch.rand(10, generator=torch.Generator().manual_seed(seed))
        scores[9] = -1.0  # the lone image scores lowest of all
        assert 9 in select_coreset(scores, labels, 0.3).tolist()
        assert 9 in create_selector("random_dynamic").select(
            {"labels": labels}, 0, 10, 0.3, selection_generator(seed, 0)
        )
    # Empty classes stay at 0.
    assert class_quotas(torch.tensor([9, 0, 1]), 0.3).tolist() == [2, 0, 1]


def test_floor_of_one_overshoot_taken_from_the_most_over_served():
    # 0.3 * [10, 10, 1, 1, 1] = [3, 3, .3, .3, .3]; total round(6.9) = 7; floors and ones [3, 3, 1, 1, 1] = 9:
    # two slots too many. Classes 0 and 1 are equally over their share (3 - 3): the higher id (1) gives
    # first, then class 0 is the most over (3 - 3 against 2 - 3): [2, 2, 1, 1, 1].
    assert class_quotas(torch.tensor([10, 10, 1, 1, 1]), 0.3).tolist() == [2, 2, 1, 1, 1]
    # 0.3 * [20, 10, 1, 1] = [6, 3, .3, .3]; total round(9.6) = 10; [6, 3, 1, 1] = 11: one too many;
    # over their share: 6 - 6 = 0 and 3 - 3 = 0, a tie: class 1 gives it.
    assert class_quotas(torch.tensor([20, 10, 1, 1]), 0.3).tolist() == [6, 2, 1, 1]


def test_more_classes_than_slots_is_an_error():
    # 0.3 * 10 = 3 slots for 6 classes with images.
    with pytest.raises(ValueError, match="gives 3 slots per round for 6 classes with samples.*--class_balanced false"):
        class_quotas(torch.tensor([5, 1, 1, 1, 1, 1]), 0.3)


@pytest.mark.parametrize("seed", range(20))
def test_quota_rules_hold_for_random_class_sizes(seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 40, (12,), generator=g) * (torch.rand(12, generator=g) < 0.8)
    counts[0] = 1 + seed  # at least one class with images
    fraction = [0.1, 0.25, 0.3, 0.5, 0.77, 1.0][seed % 6]
    total = math.floor(fraction * int(counts.sum()) + 0.5)
    if int((counts > 0).sum()) > total:
        return
    q = class_quotas(counts, fraction)
    assert int(q.sum()) == total and (q <= counts).all()
    assert ((q >= 1) == (counts > 0)).all()
    if int(torch.clamp(torch.floor(counts * fraction + 1e-9), min=1).mul(counts > 0).sum()) <= total:
        # no overshoot of the floor of one: each quota is floor or ceil of its share, or the one
        assert (q >= torch.floor(counts * fraction + 1e-9)).all() and (
            q <= torch.ceil(counts * fraction - 1e-9).clamp(min=1)
        ).all()


def test_tie_rule_lower_index_first():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    labels = torch.zeros(6, dtype=torch.long)
    assert select_coreset(scores, labels, 0.5).tolist() == [1, 2, 3]
    assert select_coreset(scores, labels, 0.5, class_balanced=False).tolist() == [1, 2, 3]


def test_global_topk_when_not_balanced():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert select_coreset(scores, labels, 0.5, class_balanced=False).tolist() == [0, 1, 2]
    assert select_coreset(scores, labels, 0.5, class_balanced=True).tolist() == [0, 1, 5]


def test_deterministic_and_dtype_independent():
    scores = torch.rand(1000)
    labels = torch.randint(0, 10, (1000,))
    a = select_coreset(scores, labels, 0.3)
    assert torch.equal(a, select_coreset(scores.clone(), labels.clone(), 0.3))
    assert torch.equal(a, select_coreset(scores.double(), labels, 0.3))
    assert a.dtype == torch.long


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan"), "0.1", True])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        select_coreset(torch.rand(10), torch.zeros(10, dtype=torch.long), fraction)


def test_bad_inputs():
    labels = torch.zeros(10, dtype=torch.long)
    s = torch.rand(10)
    s[3], s[7] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="2 non-finite scores.*index 3"):
        select_coreset(s, labels, 0.5)
    with pytest.raises(ValueError, match="10 scores but 9 labels"):
        select_coreset(torch.rand(10), labels[:9], 0.5)
    with pytest.raises(ValueError, match="empty"):
        select_coreset(torch.rand(0), labels[:0], 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        select_coreset(torch.rand(10), labels - 1, 0.5)
    with pytest.raises(ValueError, match="selects no sample"):
        select_coreset(torch.rand(10), labels, 0.01)


def test_full_fraction_keeps_everything():
    labels = make_classes([5, 3])
    assert select_coreset(torch.rand(8), labels, 1.0).tolist() == list(range(8))


# ---------------------------------------------------------------- selectors
def stats_for(n=200, classes=4):
    g = torch.Generator().manual_seed(1)
    return {
        "labels": torch.randint(0, classes, (n,), generator=g),
        "evs": torch.rand(n, generator=g),
        "ds": torch.rand(n, generator=g),
        "entropy": torch.rand(n, generator=g),
        "margin": torch.rand(n, generator=g),
        "least_confidence": torch.rand(n, generator=g),
    }


def test_registry_lists_all_methods():
    expected = {
        "acs",
        "evs",
        "ds",
        "random_static",
        "random_dynamic",
        "entropy",
        "margin",
        "least_confidence",
        "full",
    }
    assert expected <= set(list_selectors())
    with pytest.raises(ValueError, match="registered: .*acs.*random_dynamic"):
        create_selector("glister")


def test_acs_mixes_evs_and_ds_by_schedule():
    stats = stats_for()
    sel = create_selector("acs", schedule="cosine")
    assert set(sel.required_stats) == {"evs", "ds"}
    for epoch in (0, 30, 60):
        beta = math.cos(math.pi * epoch / 240)
        expected = select_coreset(beta * stats["evs"] + (1 - beta) * stats["ds"], stats["labels"], 0.2)
        assert torch.equal(sel.select(stats, epoch, 120, 0.2), expected)
    # beta = 1 at t = 0: pure EVS.
    assert torch.equal(sel.select(stats, 0, 120, 0.2), create_selector("evs").select(stats, 0, 120, 0.2))
    assert create_selector("acs", schedule="evs").required_stats == ("evs",)


@pytest.mark.parametrize("name", ["evs", "ds", "entropy", "margin", "least_confidence"])
def test_stat_selectors(name):
    stats = stats_for()
    expected = select_coreset(stats[name], stats["labels"], 0.3, class_balanced=False)
    sel = create_selector(name, class_balanced=False)
    assert torch.equal(sel.select(stats, 5, 10, 0.3), expected)


def test_random_selectors():
    stats = {"labels": stats_for()["labels"]}
    dyn = create_selector("random_dynamic")
    a = dyn.select(stats, 0, 10, 0.25, selection_generator(7, 0))
    b = dyn.select(stats, 0, 10, 0.25, selection_generator(7, 0))
    c = dyn.select(stats, 10, 20, 0.25, selection_generator(7, 10))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.numel() == 50
    static = create_selector("random_static")
    s0 = static.select(stats, 0, 20, 0.25, selection_generator(7, 0))
    s1 = static.select(stats, 10, 20, 0.25, selection_generator(7, 10))
    assert torch.equal(s0, s1)
    restored = create_selector("random_static")
    restored.load_state_dict(static.state_dict())
    assert torch.equal(restored.select(stats, 10, 20, 0.25, selection_generator(7, 10)), s0)
    with pytest.raises(ValueError, match="Generator"):
        dyn.select(stats, 0, 10, 0.25, None)


def test_full_selector():
    stats = {"labels": torch.zeros(9, dtype=torch.long)}
    assert create_selector("full").select(stats, 0, 1, 1.0).tolist() == list(range(9))
    with pytest.raises(ValueError, match="fraction=1"):
        create_selector("full").select(stats, 0, 1, 0.5)


def test_selector_reports_missing_stats():
    with pytest.raises(ValueError, match="needs statistics"):
        create_selector("acs").select({"labels": torch.zeros(3, dtype=torch.long)}, 0, 1, 0.5)


def test_select_coreset_at_imagenet_size():
    """1.28M scores, 1000 classes: exact size and per-class quotas (its time is in the speed benchmark)."""
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.rand(1_281_167, generator=g), torch.randint(0, 1000, (1_281_167,), generator=g)
    idx = select_coreset(scores, labels, 0.1)
    assert idx.numel() == 128_117
    counts, kept = torch.bincount(labels, minlength=1000), torch.bincount(labels[idx], minlength=1000)
    assert ((kept - counts * 0.1).abs() < 1).all()


# ---------------------------------------------------------------- every registered selector
@pytest.mark.parametrize("name", list_selectors())
def test_every_selector_contract(name):
    """Size, uniqueness, sorted order, determinism and (where it applies) class balance, for each
    selector in the registry: a new selector is covered by registering it."""
    selector = create_selector(name)
    fraction = 1.0 if selector.selects_all else 0.3
    stats = stats_for(n=203, classes=5)
    labels = stats["labels"]

    def run(sel, epoch=2):
        return sel.select(stats, epoch, 10, fraction, selection_generator(3, epoch))

    subset = run(selector)
    assert subset.dtype == torch.long and subset.numel() == round(fraction * 203)
    assert torch.equal(subset, torch.sort(subset.unique()).values)  # unique and sorted
    assert torch.equal(run(create_selector(name)), subset)  # a fresh instance selects the same
    if not selector.selects_all:
        # Class-balanced: each class keeps floor or ceil of its share.
        counts, kept = torch.bincount(labels, minlength=5), torch.bincount(labels[subset], minlength=5)
        assert ((kept.double() - counts.double() * fraction).abs() < 1).all()
    else:
        assert subset.tolist() == list(range(203))
    assert set(selector.required_stats) <= set(stats)
    assert selector.needs_model == bool(selector.required_stats)


# ---------------------------------------------------------------- soft selectors and their limits
def inclusion_frequency(selector, stats, fraction, draws):
    hits = torch.zeros(stats["labels"].numel())
    for d in range(draws):
        hits[selector.select(stats, 2, 10, fraction, selection_generator(d, 2))] += 1
    return hits / draws


@pytest.mark.parametrize("name, kwargs", [("acs_gumbel", {"temperature": 0}), ("acs_mixed", {"share": 1})])
def test_soft_selectors_at_their_top_k_limit_are_acs(name, kwargs):
    stats = stats_for(n=203, classes=5)
    for balanced in (True, False):
        for epoch in (0, 4, 9):
            want = create_selector("acs", class_balanced=balanced).select(stats, epoch, 10, 0.3)
            got = create_selector(name, class_balanced=balanced, **kwargs).select(
                stats, epoch, 10, 0.3, selection_generator(1, epoch)
            )
            assert torch.equal(got, want)


@pytest.mark.parametrize("name, kwargs", [("acs_gumbel", {"temperature": math.inf}), ("acs_mixed", {"share": 0})])
def test_soft_selectors_at_their_random_limit_are_uniform(name, kwargs):
    """Strongly skewed scores, yet every sample is kept with probability f (here 0.25) within
    5 binomial standard deviations over 2000 draws, in each class."""
    n, draws = 40, 2000
    stats = {"labels": torch.arange(n) % 2, "evs": torch.linspace(0, 1, n) ** 4, "ds": torch.linspace(1, 0, n) ** 4}
    freq = inclusion_frequency(create_selector(name, **kwargs), stats, 0.25, draws)
    assert (freq - 0.25).abs().max() < 5 * math.sqrt(0.25 * 0.75 / draws)


def test_gumbel_draws_with_softmax_probabilities():
    """One sample out of 8 (no class balance): the Gumbel-max draw picks sample i with probability
    softmax(z / T)_i, z the standardised ACS score (here epoch 0: EVS alone)."""
    n, draws, temperature = 8, 4000, 0.7
    evs = torch.tensor([0.1, 0.5, 0.9, 0.2, 0.3, 1.3, 0.0, 0.6])
    stats = {"labels": torch.zeros(n, dtype=torch.long), "evs": evs, "ds": torch.zeros(n)}
    selector = create_selector("acs_gumbel", class_balanced=False, temperature=temperature)
    hits = torch.zeros(n)
    for d in range(draws):
        hits[selector.select(stats, 0, 10, 1 / n, selection_generator(d, 0))] += 1
    z = (evs.double() - evs.double().mean()) / evs.double().std(unbiased=False)
    p = torch.softmax(z / temperature, 0)
    assert ((hits / draws - p).abs() < 5 * torch.sqrt(p * (1 - p) / draws)).all()


def test_mixed_keeps_the_top_share_and_fills_at_random():
    """share 0.5, 25 per class, quota 10: the 5 best of each class always, 5 of its other 20 at random."""
    n = 50
    stats = {"labels": torch.arange(n) % 2, "evs": torch.arange(n, dtype=torch.float), "ds": torch.zeros(n)}
    selector = create_selector("acs_mixed", share=0.5)
    freq = inclusion_frequency(selector, stats, 0.4, 1500)
    top = torch.cat([torch.arange(n)[stats["labels"] == c][-5:] for c in (0, 1)])
    rest = torch.ones(n, dtype=torch.bool)
    rest[top] = False
    assert (freq[top] == 1).all()
    assert (freq[rest] - 5 / 20).abs().max() < 5 * math.sqrt(0.25 * 0.75 / 1500)


def test_soft_selector_arguments():
    from acs_hf import ACSArguments

    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        create_selector("acs_gumbel", temperature=-1)
    with pytest.raises(ValueError, match="share must be a number in \\[0, 1\\]"):
        ACSArguments(selection_method="acs_mixed", selection_share=1.5)
    selector = ACSArguments(selection_method="acs_gumbel", selection_temperature=0.25).create_selector()
    assert selector.temperature == 0.25 and selector.describe(0, 10)["temperature"] == 0.25
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        selector.select(stats_for(n=20, classes=2), 0, 10, 0.5)


def test_settings_list_only_the_knobs_of_the_selector_in_use():
    from acs_hf import ACSArguments

    gumbel = ACSArguments(selection_method="acs_gumbel", selection_temperature=0.25).settings()
    assert gumbel["selection_temperature"] == 0.25 and "selection_share" not in gumbel
    mixed = ACSArguments(selection_method="acs_mixed", selection_share=0.75).settings()
    assert mixed["selection_share"] == 0.75 and "selection_temperature" not in mixed
    plain = ACSArguments(selection_method="acs", fraction=0.2).settings()
    assert plain["fraction"] == 0.2 and plain["evs_schedule"] == "cosine"
    assert not {"selection_temperature", "selection_share", "score_batch_size"} & set(plain)  # unused; None
