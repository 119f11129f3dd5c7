"""Cheaper scoring: a random candidate pool per round, and scores taken from the training pass.

Expected values come from a second computation: the scores of every sample by a separate forward
of the same weights, then the top of each class's quota inside the pool, chosen here by hand.
"""

import copy

import pytest
import torch
from trainer_utils import NUM_CLASSES, acs_trainer, tiny_dataset

from acs_hf import ACSArguments
from acs_hf.selection import class_quotas, draw_pool, error_vector_score, select_coreset, selection_generator

N = 48


def test_candidate_mask_of_all_samples_changes_nothing():
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.rand(200, generator=g), torch.randint(0, 7, (200,), generator=g)
    for balanced in (True, False):
        everything = torch.ones(200, dtype=torch.bool)
        assert torch.equal(
            select_coreset(scores, labels, 0.15, balanced), select_coreset(scores, labels, 0.15, balanced, everything)
        )


def test_selection_inside_a_pool_by_hand():
    """Class quotas come from all samples; each class keeps its best candidates; NaN outside the pool is fine."""
    labels = torch.tensor([0] * 6 + [1] * 4)
    scores = torch.tensor([9.0, 1, 2, 3, 4, 5, 8, 7, 6, 5])
    pool = torch.tensor([0, 1, 1, 1, 0, 0, 0, 1, 1, 0], dtype=torch.bool)  # class 0: {1,2,3}, class 1: {7,8}
    scores = torch.where(pool, scores, torch.nan)
    # f = 0.5: quotas 3 and 2 -> class 0 keeps 3, 2, 1 (its whole pool), class 1 keeps 7, 8.
    assert select_coreset(scores, labels, 0.5, True, pool).tolist() == [1, 2, 3, 7, 8]
    # f = 0.3: quotas 2 (1.8) and 1 (1.2) -> class 0 keeps 3 and 2, class 1 keeps 7.
    assert select_coreset(scores, labels, 0.3, True, pool).tolist() == [2, 3, 7]


def test_pool_is_class_balanced_and_keeps_known_samples_first():
    labels = torch.arange(100) % 4
    g = torch.Generator().manual_seed(3)
    keep = torch.zeros(100, dtype=torch.bool)
    keep[[0, 1, 5]] = True
    pool = draw_pool(labels, 0.2, g, keep=keep)
    assert int(pool.sum()) == 20 and keep[pool].sum() == 3 and pool[[0, 1, 5]].all()
    assert torch.bincount(labels[pool]).tolist() == class_quotas(torch.bincount(labels), 0.2).tolist()


def test_pool_fraction_validated():
    with pytest.raises(ValueError, match=r"score_pool_fraction must be a number in \[fraction, 1\]"):
        ACSArguments(fraction=0.3, score_pool_fraction=0.2)
    with pytest.raises(ValueError, match="acts only on selectors that score samples, not 'random_dynamic'"):
        ACSArguments(selection_method="random_dynamic", score_pool_fraction=0.5)
    with pytest.raises(ValueError, match="not supported by 'acs_mixed'"):
        ACSArguments(selection_method="acs_mixed", reuse_training_scores=True)


def _all_scores(trainer) -> torch.Tensor:
    """EVS of every sample under the student's current weights, by a separate eval-mode forward."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    ds = trainer.score_dataset
    x = torch.stack([ds[i]["pixel_values"] for i in range(N)])
    y = torch.tensor([int(ds[i]["labels"]) for i in range(N)])
    mode = model.training
    model.eval()
    with torch.no_grad():
        evs = error_vector_score(model(x), y)
    model.train(mode)
    return evs, y


def test_pool_scores_only_the_pool_and_keeps_its_top(tmp_path):
    trainer = acs_trainer(
        tmp_path, {"selection_method": "evs", "score_pool_fraction": 0.5}, {"num_train_epochs": 1}, ds=tiny_dataset(N)
    )
    trainer.calibrate()
    forwards = []
    student = trainer.accelerator.unwrap_model(trainer.model)
    student.register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0]))
    subset = trainer.select(0, 1)
    scored = sum(forwards)
    evs, labels = _all_scores(trainer)
    pool = draw_pool(labels, 0.5, selection_generator(0, 0))  # the trainer's draw, made again
    assert scored == N // 2 == int(pool.sum())  # the pass scored the pool alone
    assert subset.tolist() == select_coreset(torch.where(pool, evs, torch.nan), labels, 0.25, True, pool).tolist()
    record = trainer.history[-1]
    assert record["scored_samples"] == N // 2 and record["reused_samples"] == 0


@pytest.mark.slow
def test_pool_of_one_gives_the_papers_subsets(tmp_path):
    """p = 1 (the default) selects exactly the top of all samples' scores, round after round."""
    default = acs_trainer(tmp_path / "a", {"selection_interval": 1}, {"num_train_epochs": 3}, ds=tiny_dataset(N))
    explicit = acs_trainer(
        tmp_path / "b", {"selection_interval": 1, "score_pool_fraction": 1.0}, {"num_train_epochs": 3},
        ds=tiny_dataset(N),
    )  # fmt: skip
    default.train()
    explicit.train()
    assert [r["subset_hash"] for r in default.history] == [r["subset_hash"] for r in explicit.history]
    assert all(r["scored_samples"] == N for r in explicit.history)


@pytest.mark.parametrize("kd_alpha", [1.0, 0.0])
def test_training_pass_scores_equal_a_separate_pass(tmp_path, kd_alpha):
    """What a training step records equals EVS and DS recomputed from the same weights and inputs:
    the student in train mode on the batch, and the teacher's probabilities (its distillation
    forward, or without distillation the teacher cache of the eval view)."""
    trainer = acs_trainer(
        tmp_path, {"reuse_training_scores": True, "kd_alpha": kd_alpha, "teacher_cache_dir": "memory"},
        {"num_train_epochs": 1}, ds=tiny_dataset(N),
    )  # fmt: skip
    trainer.calibrate()
    trainer.select(0, 1)  # fills the teacher cache
    student = trainer.accelerator.unwrap_model(trainer.model).train()
    rows = [3, 10, 17, 44]
    batch = {k: torch.stack([trainer.train_dataset[i][k] for i in rows]) for k in ("pixel_values", "labels", "index")}
    reference = copy.deepcopy(student)  # the same weights and BatchNorm state before the step
    trainer.compute_loss(student, batch)
    stats, seen = trainer.rounds.statistics.training_scores.collect(N, trainer.accelerator)
    assert seen.nonzero().flatten().tolist() == rows
    with torch.no_grad():
        p_s = torch.softmax(reference(batch["pixel_values"]).float(), 1)
        if kd_alpha > 0:
            p_t = torch.softmax(trainer.teacher_model(batch["pixel_values"]).float(), 1)
        else:
            p_t = torch.softmax(trainer.teacher_model.eval()(batch["pixel_values"]).float(), 1).half().float()
    onehot = torch.nn.functional.one_hot(batch["labels"], NUM_CLASSES).float()
    torch.testing.assert_close(stats["evs"][rows], (p_s - onehot).norm(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["ds"][rows], (p_s - p_t).norm(dim=1), rtol=1e-4, atol=1e-5)
    assert torch.isnan(stats["evs"][~seen]).all()


@pytest.mark.slow
def test_reused_scores_join_the_pool_and_skip_the_pass(tmp_path):
    """Round 2 scores by forward only the pool samples that were not trained on in round 1."""
    trainer = acs_trainer(
        tmp_path, {"selection_interval": 1, "reuse_training_scores": True, "score_pool_fraction": 0.5},
        {"num_train_epochs": 2}, ds=tiny_dataset(N),
    )  # fmt: skip
    trainer.train()
    first, second = trainer.history
    k = round(0.25 * N)
    assert first["scored_samples"] == N // 2 and first["reused_samples"] == 0
    assert second["reused_samples"] == k and second["scored_samples"] == N // 2 - k
    assert second["num_selected"] == k
