"""The README's multi-GPU command, on two gloo processes: the embedded default with its FP warm-up.

The warm-up trains under DDP, which leaves each process its own BatchNorm statistics; the run
must still score, cache and select with one model on every process (process 0's), and a resume
at an epoch boundary, on one or two processes, must select exactly the uninterrupted run's subsets.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "run_acs.py")
STOP_AFTER_CHECKPOINT = str(Path(__file__).with_name("stop_after_checkpoint.py"))
#: The command of the issue that found the bug (2 epochs, a selection every epoch, f = 0.3).
COMMAND = ["--use_cpu", "--num_train_epochs", "2", "--selection_interval", "1", "--fraction", "0.3"]


def launch(processes: int, *argv: str, script: str = RECIPE) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes N recipes/run_acs.py ...`` with this interpreter."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", "0", "--num_processes", str(processes)]  # fmt: skip
    if processes > 1:
        launcher.append("--multi_gpu")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([*launcher, script, *argv], env=env, capture_output=True, text=True, timeout=900)


def subsets(out: Path) -> dict[str, list[int]]:
    return {p.stem: np.load(p).tolist() for p in sorted((out / "selection").glob("epoch_*.npy"))}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "acs_selection.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def disk_run(tmp_path_factory):
    """The issue's command (teacher cache on disk), with a checkpoint at every epoch end."""
    out = tmp_path_factory.mktemp("two_process") / "out"
    proc = launch(2, *COMMAND, "--output_dir", str(out), "--save_strategy", "epoch")
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out


@pytest.mark.slow
def test_warmup_then_disk_cache_on_two_processes(disk_run):
    """Both processes scored with one teacher: one cache tag, two shards of it, nothing deleted."""
    out = disk_run
    assert (out / "model.safetensors").is_file() and (out / "fp_warmup" / "model.safetensors").is_file()
    assert [r["epoch"] for r in records(out)] == [0, 1] and all(r["world_size"] == 2 for r in records(out))
    shards = sorted(p.name for p in (out / "teacher_cache").glob("teacher_probs_*.npy"))
    assert len(shards) == 2 and len({name.split("_")[2] for name in shards}) == 1, shards
    assert all(len(s) == round(0.3 * 1437) for s in subsets(out).values())


@pytest.mark.slow
def test_memory_cache_selects_what_the_disk_cache_did(disk_run, tmp_path):
    """A sample's score no longer depends on which process scored it: the in-memory cache run
    (same seed) selects exactly the disk-cache run's subsets."""
    out = tmp_path / "memory"
    proc = launch(2, *COMMAND, "--output_dir", str(out), "--teacher_cache_dir", "memory")
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert subsets(out) == subsets(disk_run)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_epoch_boundary_resume_selects_the_uninterrupted_subsets(disk_run, tmp_path, processes):
    """Stopped after epoch 0 (the first checkpoint), resumed on 1 or 2 processes: the epoch-1
    round selects what the uninterrupted run selected (it loads process 0's saved warm-up)."""
    out = tmp_path / "resumed"
    first = min((p for p in disk_run.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))
    shutil.copytree(disk_run / "fp_warmup", out / "fp_warmup")
    shutil.copytree(disk_run / "teacher_cache", out / "teacher_cache")
    shutil.copytree(first, out / first.name)
    argv = [*COMMAND, "--output_dir", str(out), "--resume_from_checkpoint", "true"]
    if processes == 1:
        argv.remove("--use_cpu")
    proc = launch(processes, *argv)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert subsets(out)["epoch_0001"] == subsets(disk_run)["epoch_0001"]
    assert [r["epoch"] for r in records(out)] == [0, 1]  # the history carried over, one new round
    assert records(out)[1]["world_size"] == processes


#: Issue 31's command, smaller: training-pass scores reused, a pool of half the data, a round every epoch.
REUSE_COMMAND = [str(ROOT / "recipes" / "configs" / "digits_demo.yaml"), "--model_name", "test_resnet",
                 "--max_train_samples", "200", "--max_eval_samples", "32", "--fp_warmup_epochs", "1",
                 "--num_train_epochs", "2", "--selection_interval", "1", "--fraction", "0.25",
                 "--save_strategy", "epoch", "--reuse_training_scores", "true",
                 "--score_pool_fraction", "0.5"]  # fmt: skip


def selection_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "selection").glob("*.npy"))}


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_epoch_boundary_resume_with_training_pass_scores_selects_the_uninterrupted_subsets(tmp_path, processes):
    """Issue 31: killed right after the epoch-0 checkpoint and resumed, a run that reuses training-pass
    scores selects the uninterrupted run's subsets. Before, the records of epoch 0's training were not
    in the checkpoint: the resumed round at epoch 1 reused none and scored a fresh pool instead."""
    argv = [*REUSE_COMMAND, *(["--use_cpu", "true"] if processes > 1 else [])]
    whole = launch(processes, *argv, "--output_dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-6000:]
    out = tmp_path / "resumed"
    killed = launch(processes, *argv, "--output_dir", str(out), script=STOP_AFTER_CHECKPOINT)
    assert killed.returncode != 0 and not (out / "model.safetensors").exists(), killed.stderr[-6000:]
    assert sorted(selection_digests(out)) == ["epoch_0000.npy"]
    resumed = launch(processes, *argv, "--output_dir", str(out), "--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert selection_digests(out) == selection_digests(tmp_path / "whole")
    assert [r["reused_samples"] for r in records(out)] == [r["reused_samples"] for r in records(tmp_path / "whole")]
    assert sorted(selection_digests(out)) == ["epoch_0000.npy", "epoch_0001.npy"]


def reevaluated_accuracy(out: Path) -> float:
    """Top-1 of the saved model (``load_quantized``) on the validation split, preprocessed as the run did."""
    import torch

    from acs_hf import load_quantized
    from acs_hf.data import digits_dataset, prepare_datasets

    model = load_quantized(out).eval()
    ds = prepare_datasets(digits_dataset(), model, image_size=32, seed=0)
    x = torch.stack([ds.eval_dataset[i]["pixel_values"] for i in range(len(ds.eval_dataset))])
    y = torch.tensor([ds.eval_dataset[i]["labels"] for i in range(len(ds.eval_dataset))])
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.slow
def test_two_process_eval_accuracy_is_the_saved_models(tmp_path):
    """Issue 37: training leaves each process its own BatchNorm statistics; the final evaluation
    scored each process's shard with its own, so eval_results.json (0.4528) was not the saved model's
    accuracy (0.4556). Every process now evaluates process 0's model, the one saved."""
    out = tmp_path / "out"
    proc = launch(2, *COMMAND, "--fp_warmup_epochs", "3", "--max_train_samples", "600", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-6000:]
    reported = json.loads((out / "eval_results.json").read_text())["eval_accuracy"]
    assert reevaluated_accuracy(out) == pytest.approx(reported, abs=1e-6)


#: A short run whose teacher is an FP warm-up, checkpointed at every epoch end.
WARMUP_COMMAND = [str(ROOT / "recipes" / "configs" / "digits_demo.yaml"), "--model_name", "test_resnet",
                  "--max_train_samples", "200", "--max_eval_samples", "32", "--fp_warmup_epochs", "1",
                  "--num_train_epochs", "2", "--selection_interval", "1", "--fraction", "0.25",
                  "--save_strategy", "epoch"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_resume_into_a_new_folder_keeps_the_interrupted_runs_warmup(tmp_path, processes):
    """Issue 37: resumed into a new --output_dir (what the refusal to resume in place recommends), a run
    trained the FP warm-up again: another teacher, other coresets. It now loads the interrupted run's."""
    argv = [*WARMUP_COMMAND, *(["--use_cpu", "true"] if processes > 1 else [])]
    whole = launch(processes, *argv, "--output_dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-6000:]
    old, new = tmp_path / "old", tmp_path / "new"
    killed = launch(processes, *argv, "--output_dir", str(old), script=STOP_AFTER_CHECKPOINT)
    assert killed.returncode != 0 and not (old / "model.safetensors").exists(), killed.stderr[-6000:]
    (checkpoint,) = old.glob("checkpoint-*")
    assert json.loads((checkpoint / "acs_state.json").read_text())["quantization"]["weight_bits"] == 4
    resumed = launch(processes, *argv, "--output_dir", str(new), "--resume_from_checkpoint", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert "FP warm-up:" not in resumed.stderr, "the warm-up was trained again"
    warmup = Path("fp_warmup") / "model.safetensors"
    assert (new / warmup).read_bytes() == (old / warmup).read_bytes()  # kept for a later resume from new/
    assert selection_digests(new) == {
        k: v for k, v in selection_digests(tmp_path / "whole").items() if k != "epoch_0000.npy"
    }
