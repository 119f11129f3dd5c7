import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from acs_hf.data.batch import INDEX_KEY
from acs_hf.selection import disagreement_score, entropy_score, error_vector_score
from acs_hf.training.scoring_pass import scoring_pass
from acs_hf.training.teacher_cache import TeacherCache

N, C = 37, 5


class ListDataset(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 3, 4, 4, generator=g)
        self.y = torch.randint(0, C, (N,), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i], INDEX_KEY: i}


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, C))


class Counter:
    def __init__(self, model):
        self.calls = 0
        model.register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))


@pytest.fixture
def setup():
    ds = ListDataset()
    accelerator = Accelerator(cpu=True)
    # Unshuffled, with a last partial batch: the shard order must not matter.
    loader = accelerator.prepare(DataLoader(ds, batch_size=8))
    student, teacher = make_model(0).train(), make_model(1).train()
    return ds, accelerator, loader, student, teacher


def reference(ds, student, teacher):
    """A plain loop over the dataset, one sample at a time, eval mode."""
    student.eval(), teacher.eval()
    with torch.no_grad():
        s = torch.cat([student(ds[i]["pixel_values"][None]) for i in range(N)])
        t = torch.cat([teacher(ds[i]["pixel_values"][None]) for i in range(N)])
    return {
        "evs": error_vector_score(s, ds.y),
        "ds": disagreement_score(s, t),
        "entropy": entropy_score(s),
    }


def test_scores_match_plain_loop(setup):
    ds, accelerator, loader, student, teacher = setup
    out = scoring_pass(student, loader, accelerator, ["evs", "ds", "entropy"], N, teacher=teacher)
    assert student.training and teacher.training  # modes restored
    ref = reference(ds, student, teacher)
    assert torch.equal(out["labels"], ds.y)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-6)


def test_teacher_cache_skips_teacher_on_later_rounds(setup, tmp_path):
    ds, accelerator, loader, student, teacher = setup
    ref = reference(ds, student, teacher)
    student.train(), teacher.train()
    counter = Counter(teacher)
    cache = TeacherCache(N, directory=tmp_path)
    first = scoring_pass(student, loader, accelerator, ["evs", "ds"], N, teacher=teacher, teacher_cache=cache)
    assert counter.calls == len(loader) == 5
    assert cache.complete and len(cache) == N and cache.nbytes == N * C * 2
    second = scoring_pass(student, loader, accelerator, ["evs", "ds"], N, teacher=teacher, teacher_cache=cache)
    assert counter.calls == 5  # no teacher forward in round 2
    torch.testing.assert_close(second["ds"], ref["ds"], rtol=0, atol=2e-3)  # float16 teacher probabilities
    torch.testing.assert_close(first["ds"], second["ds"])
    # A new cache object over the same directory (a resumed run) reuses the memory-mapped file.
    reopened = TeacherCache(N, directory=tmp_path)
    assert reopened.complete
    third = scoring_pass(student, loader, accelerator, ["ds"], N, teacher=None, teacher_cache=reopened)
    assert counter.calls == 5
    torch.testing.assert_close(third["ds"], second["ds"])


def test_in_memory_cache(setup):
    ds, accelerator, loader, student, teacher = setup
    counter = Counter(teacher)
    cache = TeacherCache(N)
    for _ in range(3):
        scoring_pass(student, loader, accelerator, ["ds"], N, teacher=teacher, teacher_cache=cache)
    assert counter.calls == 5


def test_missing_samples_and_teacher_are_errors(setup):
    ds, accelerator, loader, student, teacher = setup
    with pytest.raises(RuntimeError, match="never scored"):
        scoring_pass(student, loader, accelerator, ["evs"], N + 3)
    with pytest.raises(ValueError, match="teacher"):
        scoring_pass(student, loader, accelerator, ["ds"], N)


def test_cache_of_other_data_or_teacher_is_rebuilt(setup, tmp_path):
    ds, accelerator, loader, student, teacher = setup
    cache = TeacherCache(N, directory=tmp_path, fingerprint="teacher-a")
    scoring_pass(student, loader, accelerator, ["ds"], N, teacher=teacher, teacher_cache=cache)
    assert TeacherCache(N, directory=tmp_path, fingerprint="teacher-a").complete
    assert not TeacherCache(N + 1, directory=tmp_path, fingerprint="teacher-a").complete  # other N: ignored
    fresh = TeacherCache(N, directory=tmp_path, fingerprint="teacher-b")
    assert not fresh.complete and len(fresh) == 0
    other_teacher = make_model(5)
    counter = Counter(other_teacher)
    out = scoring_pass(student, loader, accelerator, ["ds"], N, teacher=other_teacher, teacher_cache=fresh)
    assert counter.calls == 5  # every row recomputed with the new teacher
    ref = reference(ds, student, other_teacher)
    torch.testing.assert_close(out["ds"], ref["ds"], rtol=0, atol=2e-3)
    assert not TeacherCache(N, directory=tmp_path, fingerprint="teacher-a").complete  # old build removed
    assert all("rank" not in p.name or fresh._tag in p.name for p in tmp_path.iterdir())


def test_cache_grows_and_drops_padding_duplicates():
    cache = TeacherCache(3000)
    probs = torch.rand(3000, 4)
    first = torch.arange(0, 1500)
    cache.put(torch.cat([first, first[:7]]), torch.cat([probs[first], probs[:7] + 1]))  # padding repeats
    cache.put(torch.arange(1500, 3000), probs[1500:])
    assert len(cache) == 3000 and cache._new.shape[0] >= 3000  # grew past the first 1024-row allocation
    got = cache.get(torch.tensor([2999, 0, 6, 1500]))
    torch.testing.assert_close(got, probs[[2999, 0, 6, 1500]].half())  # first occurrence kept


def test_cache_does_not_depend_on_the_process_layout(tmp_path):
    """Two processes write a shard each; one process (any rank) later reads every row."""
    probs = torch.rand(N, C)
    halves = torch.arange(N).chunk(2)
    writers = [TeacherCache(N, tmp_path, rank=r, fingerprint="x") for r in (0, 1)]
    for cache, idx in zip(writers, halves):
        cache.put(idx, probs[idx])
        cache._write_shard()
    writers[0]._write_meta()
    alone = TeacherCache(N, tmp_path, rank=0, fingerprint="x")
    assert alone.complete and len(alone) == N
    torch.testing.assert_close(alone.get(torch.arange(N)), probs.half())


def test_corrupt_cache_names_the_file(setup, tmp_path):
    ds, accelerator, loader, student, teacher = setup
    cache = TeacherCache(N, directory=tmp_path)
    scoring_pass(student, loader, accelerator, ["ds"], N, teacher=teacher, teacher_cache=cache)
    rows = next(tmp_path.glob("teacher_probs_*.npy"))
    rows.write_bytes(rows.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{rows.name}.*delete .* to rebuild"):
        TeacherCache(N, directory=tmp_path)


def test_labels_only_pass_runs_no_model(setup):
    ds, accelerator, loader, student, teacher = setup
    counter = Counter(student)
    out = scoring_pass(student, loader, accelerator, [], N)
    assert counter.calls == 0 and set(out) == {"labels"} and torch.equal(out["labels"], ds.y)


def test_gather_keeps_the_latest_entry_of_a_repeated_index():
    """An index that comes more than once (as from two processes that trained it in different
    epochs) keeps the entry with the largest order, whatever its position; checked against the
    values written by hand."""
    from acs_hf.training.consistency import ORDER_KEY, gather_statistics

    accelerator = Accelerator(cpu=True)
    local = {  # index 2 three times (orders 5, 1, 9), index 0 twice (orders 7, 3), index 4 once
        INDEX_KEY: [torch.tensor([2, 0, 2]), torch.tensor([4, 0, 2])],
        ORDER_KEY: [torch.tensor([5, 7, 1]), torch.tensor([2, 3, 9])],
        "evs": [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.4, 0.5, 0.6])],
        "labels": [torch.tensor([1, 1, 1]), torch.tensor([1, 1, 1])],
    }
    out = gather_statistics(local, 5, accelerator, expected=torch.zeros(5, dtype=torch.bool))
    expected = torch.tensor([0.2, float("nan"), 0.6, float("nan"), 0.4])
    torch.testing.assert_close(out["evs"], expected, equal_nan=True)
    assert ORDER_KEY not in out


def test_training_scores_keep_each_samples_latest_record():
    """A sample trained on twice keeps the statistics of its later batch (EVS by formula)."""
    from acs_hf.training.training_pass import TrainingScores

    scores = TrainingScores(["evs"])
    first, later = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 3.0]])
    scores.record(torch.tensor([3]), first, torch.tensor([0]), None)
    scores.record(torch.tensor([1, 3]), torch.cat([first, later]), torch.tensor([0, 0]), None)
    stats, seen = scores.collect(5, Accelerator(cpu=True))
    assert seen.tolist() == [False, True, False, True, False]
    expected = torch.linalg.vector_norm(torch.softmax(later, 1) - torch.tensor([[1.0, 0.0, 0.0]]), dim=1)
    torch.testing.assert_close(stats["evs"][3:4], expected)


def test_training_scores_restored_from_a_checkpoint_count_as_older_records():
    """Issue 31: what a checkpoint keeps of the records (state_dict) comes back on resume; a record
    made after the resume wins over a restored one, and a process that keeps none adds none."""
    from acs_hf.training.training_pass import TrainingScores

    def evs(logits: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(torch.softmax(logits, 1) - torch.tensor([[1.0, 0.0, 0.0]]), dim=1)

    accelerator = Accelerator(cpu=True)
    first, later = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 3.0]])
    saved = TrainingScores(["evs"])
    saved.record(torch.tensor([1, 3]), first, torch.tensor([0, 0]), None)
    state = saved.state_dict(5, accelerator)
    assert state["index"].tolist() == [1, 3]
    torch.testing.assert_close(state["evs"], evs(first))

    resumed = TrainingScores(["evs"])
    resumed.load_state_dict(state)
    resumed.record(torch.tensor([3]), later, torch.tensor([0]), None)
    stats, seen = resumed.collect(5, accelerator)
    assert seen.tolist() == [False, True, False, True, False]
    torch.testing.assert_close(stats["evs"][[1, 3]], torch.cat([evs(first)[:1], evs(later)]))

    elsewhere = TrainingScores(["evs"])
    elsewhere.load_state_dict(state, keep=False)
    assert not elsewhere.collect(5, accelerator)[1].any()
    with pytest.raises(ValueError, match=r"training-pass scores lack \['ds'\]"):
        TrainingScores(["evs", "ds"]).load_state_dict(state)
