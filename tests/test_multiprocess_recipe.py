"""The README's multi-GPU command, on two gloo processes: the embedded default with its FP warm-up.

The warm-up trains under DDP, which leaves each process its own BatchNorm statistics; the run
must still score, cache and select with one model on every process (process 0's), and a resume
at an epoch boundary, on one or two processes, must select exactly the uninterrupted run's subsets.
"""

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
#: The command of the issue that found the bug (2 epochs, a selection every epoch, f = 0.3).
COMMAND = ["--use_cpu", "--num_train_epochs", "2", "--selection_interval", "1", "--fraction", "0.3"]


def launch(processes: int, *argv: str) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes N recipes/run_acs.py ...`` with this interpreter."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", "0", "--num_processes", str(processes)]  # fmt: skip
    if processes > 1:
        launcher.append("--multi_gpu")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([*launcher, RECIPE, *argv], env=env, capture_output=True, text=True, timeout=900)


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


def test_warmup_then_disk_cache_on_two_processes(disk_run):
    """Both processes scored with one teacher: one cache tag, two shards of it, nothing deleted."""
    out = disk_run
    assert (out / "model.safetensors").is_file() and (out / "fp_warmup" / "model.safetensors").is_file()
    assert [r["epoch"] for r in records(out)] == [0, 1] and all(r["world_size"] == 2 for r in records(out))
    shards = sorted(p.name for p in (out / "teacher_cache").glob("teacher_probs_*.npy"))
    assert len(shards) == 2 and len({name.split("_")[2] for name in shards}) == 1, shards
    assert all(len(s) == round(0.3 * 1437) for s in subsets(out).values())


def test_memory_cache_selects_what_the_disk_cache_did(disk_run, tmp_path):
    """A sample's score no longer depends on which process scored it: the in-memory cache run
    (same seed) selects exactly the disk-cache run's subsets."""
    out = tmp_path / "memory"
    proc = launch(2, *COMMAND, "--output_dir", str(out), "--teacher_cache_dir", "memory")
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert subsets(out) == subsets(disk_run)


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
