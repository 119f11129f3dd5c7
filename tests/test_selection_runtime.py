"""The selection runtime built directly, without a Trainer: the plain state and its round trip, a round
run from a hand-made context and checked against the paper's formulas, the callback's schedule, the
one route of the on_selection event, and the selection files of a checkpoint."""

import json
import math
import types

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from acs_hf import ACSArguments, evs_weight
from acs_hf.layout import RunLayout
from acs_hf.training.callback import SelectionCallback, dispatch_selection
from acs_hf.training.checkpoint_state import SelectionCheckpointer
from acs_hf.training.checkpoints import PAIRING_KEY
from acs_hf.training.round_context import RoundContext
from acs_hf.training.rounds import RoundRunner
from acs_hf.training.selection_state import SelectionState

N, CLASSES, FEATURES = 40, 4, 6


class Rows(torch.utils.data.Dataset):
    """Feature rows as image-classification examples, with the ``labels`` array label-only code reads."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        self.x, self.labels = x, labels.numpy()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": int(self.labels[i]), "index": i}


@pytest.fixture
def setup():
    x = torch.randn(N, FEATURES)
    labels = torch.arange(N) % CLASSES
    student, teacher = nn.Linear(FEATURES, CLASSES), nn.Linear(FEATURES, CLASSES)
    accelerator = Accelerator(cpu=True)
    context = RoundContext(
        accelerator=accelerator,
        student=lambda: student,
        teacher=teacher,
        make_loader=lambda dataset: DataLoader(dataset, batch_size=7),
        teacher_cache_dir=None,
    )
    return types.SimpleNamespace(x=x, labels=labels, student=student, teacher=teacher, context=context)


def _runner(setup, **acs) -> RoundRunner:
    args = ACSArguments(**{"fraction": 0.25, "selection_interval": 2, **acs})
    return RoundRunner(setup.context, args, args.create_selector(), Rows(setup.x, setup.labels), N, "data")


# ---------------------------------------------------------------------- the state
def test_a_round_is_due_at_the_first_epoch_then_every_interval_for_a_dynamic_selector():
    state = SelectionState()
    assert state.is_due(0, interval=2, dynamic=True) and state.is_due(3, interval=2, dynamic=True)
    state.take(torch.tensor([1, 2]), epoch=0, record={"round": 1})
    assert [e for e in range(6) if state.is_due(e, 2, True)] == [2, 4]
    assert [e for e in range(6) if state.is_due(e, 2, False)] == []  # static: chosen once
    state.take(torch.tensor([3, 4]), epoch=2, record={"round": 2})
    assert not state.is_due(2, 2, True)  # a resume inside epoch 2 keeps its restored subset


def test_the_state_takes_rounds_and_round_trips_through_its_state_dict():
    state = SelectionState()
    sampler = state.make_sampler(num_selected=2, seed=0)
    state.take(torch.tensor([5, 9]), epoch=0, record={"round": 1, "epoch": 0})
    state.take(torch.tensor([1, 7]), epoch=2, record={"round": 2, "epoch": 2})
    assert state.selection_round == 2 and state.selected_epoch == 2
    assert [r["round"] for r in state.history] == [1, 2]
    sampler.set_epoch(2)
    assert sorted(sampler) == [1, 7]  # the sampler followed the state

    restored = SelectionState()
    restored_sampler = restored.make_sampler(num_selected=2, seed=0)  # built before the restore, as in a resume
    restored.load_state_dict(state.state_dict())
    assert torch.equal(restored.subset, torch.tensor([1, 7]))
    assert (restored.selected_epoch, restored.selection_round, restored.history) == (2, 2, state.history)
    restored_sampler.set_epoch(2)
    assert list(restored_sampler) == list(sampler)  # same subset, same seed: the same order


# ---------------------------------------------------------------------- a round, from a hand-made context
def test_a_round_selects_the_top_acs_scores_of_each_class_by_the_papers_formulas(setup):
    runner = _runner(setup)
    state = SelectionState()
    subset, record = runner.run(epoch=0, num_epochs=8, state=state)

    with torch.no_grad():  # EVS, DS and the cosine schedule written out (paper, Eq. 3-5)
        p_s, p_t = F.softmax(setup.student(setup.x), 1), F.softmax(setup.teacher(setup.x), 1)
    evs = (p_s - F.one_hot(setup.labels, CLASSES).float()).norm(dim=1)
    ds = (p_s - p_t).norm(dim=1)
    beta = 0.5 * (1 + math.cos(math.pi * 0 / 8))
    assert beta == pytest.approx(evs_weight(0, 8, "cosine"))
    score = beta * evs + (1 - beta) * ds
    quotas = [3, 3, 2, 2]  # f * 10 = 2.5 per class: floors of 2, the two remainders to the lower class ids
    members = [[j for j in range(N) if setup.labels[j] == c] for c in range(CLASSES)]
    expected = sorted(
        j for c in range(CLASSES) for j in sorted(members[c], key=lambda j: -float(score[j]))[: quotas[c]]
    )
    assert sorted(subset.tolist()) == expected

    assert record["round"] == 1 and record["epoch"] == 0 and record["num_selected"] == 10
    assert record["class_counts"] == quotas
    assert record["overlap_with_previous"] is None and record["world_size"] == 1
    assert record["evs_mean"] == pytest.approx(float(evs.mean()), abs=1e-6)
    # DS reads the teacher cache, which keeps probabilities in float16
    assert record["ds_selected_mean"] == pytest.approx(float(ds[subset].mean()), abs=1e-3)
    assert state.selection_round == 0 and state.subset is None  # the runner reads the state, never writes it

    state.take(subset, 0, record)
    with torch.no_grad():
        setup.student.weight.add_(torch.randn_like(setup.student.weight))  # training moved on
    second, record = runner.run(epoch=2, num_epochs=8, state=state)
    assert record["round"] == 2
    overlap = len(set(second.tolist()) & set(subset.tolist())) / 10
    assert record["overlap_with_previous"] == pytest.approx(overlap)


def test_a_label_only_selector_runs_no_model(setup):
    setup.context.student = lambda: pytest.fail("a label-only round ran the student")
    setup.context.make_loader = lambda dataset: pytest.fail("a label-only round decoded an image")
    runner = _runner(setup, selection_method="random_dynamic")
    subset, record = runner.run(epoch=0, num_epochs=4, state=SelectionState())
    assert subset.numel() == 10 and record["class_counts"] == [3, 3, 2, 2]  # quotas of 10/10/10/10 at f = 0.25


def test_a_selection_its_inputs_cannot_make_is_refused_at_construction(setup):
    setup.context.teacher = None
    with pytest.raises(ValueError, match=r"selection_method='acs' .* needs teacher_model"):
        _runner(setup)
    with pytest.raises(ValueError, match="fraction=0.025 of 40 samples gives 1 slots per round for 4 classes"):
        _runner(setup, selection_method="random_dynamic", fraction=0.025)  # 1 slot, 4 classes
    args = ACSArguments(selection_method="random_dynamic", fraction=0.25)
    with pytest.raises(ValueError, match="score_dataset has 39 examples, train_dataset 40"):
        RoundRunner(setup.context, args, args.create_selector(), Rows(setup.x[:39], setup.labels[:39]), N)


# ---------------------------------------------------------------------- the callback and the event
def test_the_callback_runs_due_rounds_and_publishes_each_once(setup):
    runner = _runner(setup, selection_method="random_dynamic")
    state = SelectionState()
    state.make_sampler(runner.num_selected, seed=0)
    published = []
    callback = SelectionCallback(state, runner, lambda record, subset: published.append((record["epoch"], subset)))
    for epoch in (0.0, 0.0, 1.0, 2.0, 3.0):  # the second 0.0: the Trainer's epoch begins once, but resumes re-enter
        callback.on_epoch_begin(None, types.SimpleNamespace(epoch=epoch, num_train_epochs=4), None)
    assert [e for e, _ in published] == [0, 2]
    assert [r["epoch"] for r in state.history] == [0, 2] and state.selected_epoch == 2
    assert torch.equal(published[-1][1], state.subset) and sorted(state.sampler) == sorted(state.subset.tolist())


def test_on_selection_reaches_every_callback_that_defines_it():
    heard = []

    class Listener:
        def on_selection(self, args, state, control, **event):
            heard.append((args, sorted(event)))

    class Deaf:  # a Trainer callback without on_selection is skipped
        pass

    event = {"record": {"round": 1}, "subset": torch.tensor([1]), "history": [{"round": 1}]}
    dispatch_selection([Listener(), Deaf(), Listener()], "args", "state", "control", **event)
    assert heard == [("args", ["history", "record", "subset"])] * 2


# ---------------------------------------------------------------------- checkpoint files
def test_the_checkpoint_files_restore_the_state_and_refuse_other_data(setup, tmp_path):
    runner = _runner(setup, selection_method="random_static")  # a stateful selector: its subset is saved too
    state = SelectionState()
    subset, record = runner.run(epoch=0, num_epochs=4, state=state)
    state.take(subset, 0, record)
    checkpointer = SelectionCheckpointer("random_static", 0.25, N, "data", run_id="run1", steps_per_epoch=5)
    folder = RunLayout(tmp_path).checkpoint(5)
    identity = checkpointer.save(folder, state, runner.selector, None, global_step=5, world_size=1)
    trainer_state = {"global_step": 5, "stateful_callbacks": {PAIRING_KEY: {"args": {}, "attributes": identity}}}
    (folder / RunLayout.TRAINER_STATE).write_text(json.dumps(trainer_state))
    saved = json.loads((folder / RunLayout.ACS_STATE).read_text())
    assert saved["at_epoch_boundary"] is True and saved["run_id"] == "run1" and saved["selection_round"] == 1

    restored, selector = SelectionState(), ACSArguments(selection_method="random_static").create_selector()
    records, resume_epochs = checkpointer.restore(folder, 1, restored, selector)
    assert records is None and resume_epochs is None
    assert torch.equal(restored.subset, state.subset) and restored.history == state.history
    assert torch.equal(selector.state_dict()["subset"], runner.selector.state_dict()["subset"])
    other = SelectionCheckpointer("random_static", 0.25, N, "other data")
    with pytest.raises(ValueError, match="was trained on other data"):
        other.restore(folder, 1, SelectionState(), selector)


def test_the_checkpoint_records_the_quantization_settings_and_refuses_others(setup, tmp_path):
    """Issue 37: a resume with other quantization settings than the checkpoint's is refused, naming each."""
    from acs_hf import QuantConfig
    from acs_hf.training.checkpoint_state import quantization_settings

    runner = _runner(setup, selection_method="random_static")
    state = SelectionState()
    subset, record = runner.run(epoch=0, num_epochs=4, state=state)
    state.take(subset, 0, record)
    w4a4 = quantization_settings(QuantConfig(weight_bits=4, act_bits=4))
    checkpointer = SelectionCheckpointer("random_static", 0.25, N, "data", run_id="r", quantization=w4a4)
    folder = RunLayout(tmp_path).checkpoint(5)
    identity = checkpointer.save(folder, state, runner.selector, None, global_step=5, world_size=1)
    trainer_state = {"global_step": 5, "stateful_callbacks": {PAIRING_KEY: {"args": {}, "attributes": identity}}}
    (folder / RunLayout.TRAINER_STATE).write_text(json.dumps(trainer_state))
    assert json.loads((folder / RunLayout.ACS_STATE).read_text())["quantization"] == w4a4
    selector = ACSArguments(selection_method="random_static").create_selector()
    w8a8 = quantization_settings(QuantConfig(weight_bits=8, act_bits=8))
    other = SelectionCheckpointer("random_static", 0.25, N, "data", quantization=w8a8)
    with pytest.raises(ValueError, match="weight_bits: 4 in the checkpoint, 8 in this run; act_bits: 4 in"):
        other.restore(folder, 1, SelectionState(), selector)
    SelectionCheckpointer("random_static", 0.25, N, "data", quantization=w4a4).restore(
        folder, 1, SelectionState(), selector
    )
