"""Checkpoints that cannot be confused (issue 21): every save carries its run's identity, a resume
never writes into another save's checkpoint, a checkpoint whose two state files come from different
saves is incomplete, and --overwrite_output_dir moves the previous run out of the way."""

import hashlib
import json
from pathlib import Path

import pytest
from trainer_utils import acs_trainer
from transformers import TrainingArguments

from acs_hf import ACSTrainer
from acs_hf.run.checks import preflight, set_aside_previous_run
from acs_hf.training.checkpoints import PAIRING_KEY, is_complete_checkpoint, latest_complete_checkpoint

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEMO = str(RECIPES / "configs" / "digits_demo.yaml")
TINY_RUN = ["--model_name", "test_resnet", "--max_train_samples", "64", "--max_eval_samples", "32",
            "--fp_warmup_epochs", "1", "--fraction", "0.25", "--selection_interval", "1",
            "--num_train_epochs", "2", "--save_strategy", "epoch"]  # fmt: skip


class Killed(Exception):
    """Stands for the process being killed mid-save (an Exception, so pytest survives it)."""


def kill_at_save(monkeypatch, number: int) -> None:
    """Kill the ``number``-th save after the model and ACS state were written, before the trainer state."""
    original, calls = ACSTrainer._save_rng_state, []

    def save_rng_state(self, output_dir):
        calls.append(output_dir)
        if len(calls) == number:
            raise Killed(output_dir)
        return original(self, output_dir)

    monkeypatch.setattr(ACSTrainer, "_save_rng_state", save_rng_state)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def states(ckpt: Path) -> tuple[dict, dict]:
    return json.loads((ckpt / "acs_state.json").read_text()), json.loads((ckpt / "trainer_state.json").read_text())


@pytest.mark.slow
def test_resume_on_more_processes_never_saves_into_the_checkpoint_it_resumed_from(tmp_path, monkeypatch):
    """A checkpoint at the end of epoch 0 of a run with 6 steps per epoch on 2 processes, resumed
    where an epoch takes 3 steps: the first save of the resumed run would be step 6 again, the
    folder resumed from. Killed mid-save, that folder paired new state with old weights and looked
    complete. Now the resume is refused before training, and the folder is left as it was."""
    args = {"num_train_epochs": 1, "save_strategy": "epoch", "per_device_train_batch_size": 2}
    acs_trainer(tmp_path, args_kwargs=args).train()
    ckpt = tmp_path / "checkpoint-6"
    acs_state = json.loads((ckpt / "acs_state.json").read_text())
    acs_state["world_size"] = 2  # as if saved by 2 processes of 1 sample per step each
    (ckpt / "acs_state.json").write_text(json.dumps(acs_state))
    before = digest(ckpt)

    kill_at_save(monkeypatch, 1)
    resumed = acs_trainer(tmp_path, args_kwargs={"num_train_epochs": 2, "save_strategy": "epoch"})
    with pytest.raises(ValueError, match=r"over or among checkpoint-6 \(this run on 2 process\(es\).*--output_dir NEW"):
        resumed.train(resume_from_checkpoint=str(ckpt))
    assert digest(ckpt) == before and is_complete_checkpoint(ckpt)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6"]


def test_state_files_of_different_saves_make_an_incomplete_checkpoint(tmp_path):
    """A save killed after writing acs_state.json over an older checkpoint's: the two state files
    disagree on the step, or on the save, and the checkpoint no longer counts as complete."""
    args = {"num_train_epochs": 2, "save_strategy": "epoch"}
    trainer = acs_trainer(tmp_path, args_kwargs=args)
    trainer.train()
    first, last = tmp_path / "checkpoint-3", tmp_path / "checkpoint-6"
    acs_state, trainer_state = states(last)
    paired = trainer_state["stateful_callbacks"][PAIRING_KEY]["attributes"]
    assert acs_state["run_id"] == paired["run_id"] == trainer.run_id and acs_state["save_id"] == paired["save_id"]
    assert states(first)[0]["run_id"] == trainer.run_id and states(first)[0]["save_id"] != acs_state["save_id"]
    assert latest_complete_checkpoint(tmp_path) == last

    (last / "acs_state.json").write_text(json.dumps({**acs_state, "save_id": "another-save"}))  # same step
    assert not is_complete_checkpoint(last) and latest_complete_checkpoint(tmp_path) == first
    (last / "acs_state.json").write_bytes((first / "acs_state.json").read_bytes())  # another step
    assert not is_complete_checkpoint(last) and latest_complete_checkpoint(tmp_path) == first
    resumed = acs_trainer(tmp_path / "b", args_kwargs=args)
    with pytest.raises(ValueError, match=r"checkpoint-6 holds acs_state.json of step 3 .* but trainer_state.json of "
                                         r"step 6 .* different saves.*checkpoint-3"):  # fmt: skip
        resumed.train(resume_from_checkpoint=str(last))


@pytest.mark.slow
def test_a_resume_continues_its_run_and_replaces_its_own_later_checkpoints(tmp_path):
    """Resumed from its first checkpoint, a run keeps its id, and its save of step 6 replaces the
    old checkpoint-6 (same run, same step numbers) instead of writing into it; another run gets
    another id."""
    args = {"num_train_epochs": 2, "save_strategy": "epoch"}
    first = acs_trainer(tmp_path, args_kwargs=args)
    first.train()
    old_save = states(tmp_path / "checkpoint-6")[0]["save_id"]
    resumed = acs_trainer(tmp_path, args_kwargs=args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    acs_state, _ = states(tmp_path / "checkpoint-6")
    assert resumed.run_id == first.run_id == acs_state["run_id"] and acs_state["save_id"] != old_save
    assert is_complete_checkpoint(tmp_path / "checkpoint-6")
    other = acs_trainer(tmp_path / "other", args_kwargs={"num_train_epochs": 1})
    other.train()
    assert other.run_id != first.run_id


def fake_checkpoint(folder: Path, step: int, run_id: str) -> None:
    folder.mkdir(parents=True)
    pairing = {"run_id": run_id, "save_id": f"{run_id}-{step}"}
    (folder / "acs_state.json").write_text(json.dumps({"global_step": step, **pairing}))
    trainer_state = {"global_step": step, "stateful_callbacks": {PAIRING_KEY: {"args": {}, "attributes": pairing}}}
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state))


def test_resume_true_refuses_a_folder_with_checkpoints_of_two_runs(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint-3", 3, "aaa")
    fake_checkpoint(tmp_path / "checkpoint-9", 9, "bbb")
    args = TrainingArguments(output_dir=str(tmp_path), resume_from_checkpoint="true", report_to=[])
    with pytest.raises(ValueError, match=r"checkpoints of 2 runs \(run aaa: checkpoint-3; run bbb: checkpoint-9\)"):
        preflight(args, None, push=False, overwrite=False)


def test_overwrite_refuses_to_resume_from_the_folder_it_clears(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint-3", 3, "aaa")
    args = TrainingArguments(output_dir=str(tmp_path), resume_from_checkpoint="true", report_to=[])
    with pytest.raises(ValueError, match="drop --overwrite_output_dir to continue that run"):
        preflight(args, None, push=False, overwrite=True)


def test_overwrite_moves_the_previous_runs_onnx_export_aside(tmp_path):
    """A run with --export_onnx leaves model.onnx (and, for large models, model.onnx.data) beside its
    checkpoint: an overwrite moves them aside with the rest, and leaves files no run writes."""
    run_files = ["model.safetensors", "config.json", "README.md", "model.onnx", "model.onnx.data",
                 "acs_selection.jsonl", "all_results.json"]  # fmt: skip
    for name in [*run_files, "notes.txt"]:
        (tmp_path / name).write_text(name)
    (tmp_path / "selection").mkdir()
    (tmp_path / "checkpoint-1").mkdir()
    aside = set_aside_previous_run(TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    assert sorted(p.name for p in tmp_path.iterdir() if p != aside) == ["notes.txt"]
    assert sorted(p.name for p in aside.iterdir()) == sorted([*run_files, "selection", "checkpoint-1"])


@pytest.mark.slow
def test_overwritten_run_interrupted_then_resumed_continues_only_the_new_run(recipe, tmp_path, monkeypatch):
    """Run A finishes; run B with --overwrite_output_dir is killed while saving its epoch-1
    checkpoint; --resume_from_checkpoint true must continue B from its epoch-0 checkpoint. Before,
    nothing was removed: B's killed save went into A's checkpoint-2, which looked complete, and the
    resume trained 0 steps and published A's model, with selection files of both runs."""
    argv = [DEMO, "--output_dir", str(tmp_path), *TINY_RUN]
    recipe.main(argv)
    a_files = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert {"checkpoint-1", "checkpoint-2", "selection", "model.safetensors", "teacher_cache"} <= set(a_files)
    a_selection = digest(tmp_path / "selection")

    kill_at_save(monkeypatch, 2)
    b_argv = [*argv, "--learning_rate", "0.01"]  # another run: another model after the first epoch
    with pytest.raises(Killed):
        recipe.main([*b_argv, "--overwrite_output_dir", "true"])
    replaced = list(tmp_path.glob(".replaced-*"))
    assert len(replaced) == 1, "--overwrite_output_dir did not move run A's files aside"
    aside = replaced[0]
    assert sorted(p.name for p in aside.iterdir()) == a_files and digest(aside / "selection") == a_selection
    assert not is_complete_checkpoint(tmp_path / "checkpoint-2")  # B's killed save, in a folder of its own
    b_run = states(tmp_path / "checkpoint-1")[0]["run_id"]

    monkeypatch.undo()
    resumed_from = []
    load = ACSTrainer._load_from_checkpoint
    monkeypatch.setattr(
        ACSTrainer,
        "_load_from_checkpoint",
        lambda self, path, model=None: resumed_from.append(path) or load(self, path, model),
    )
    recipe.main([*b_argv, "--resume_from_checkpoint", "true"])
    assert resumed_from == [str(tmp_path / "checkpoint-1")]
    acs_state, trainer_state = states(tmp_path / "checkpoint-2")
    assert acs_state["run_id"] == b_run and trainer_state["global_step"] == 2  # epoch 1 trained by the resume
    records = [json.loads(line) for line in (tmp_path / "acs_selection.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "selection").iterdir()) == ["epoch_0000.npy", "epoch_0001.npy"]
