"""Two real gloo processes on the CPU via `accelerate launch --multi_gpu --num_processes 2`, and
resumes across process counts (a 2-process checkpoint resumed on 1 process and the reverse)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_utils import acs_trainer, tiny_dataset, write_parquet_dataset

SCRIPT = Path(__file__).with_name("ddp_script.py")
ROOT = Path(__file__).resolve().parents[1]
N, K = 47, round(0.25 * 47)  # 12 samples per epoch: 3 steps of 2 x 2 on two processes, 3 of 4 on one


def launch(out: Path, jobs: list[dict], *flags: str) -> subprocess.CompletedProcess:
    """Launch ddp_script.py on two processes with this interpreter's accelerate (not whatever is on PATH)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(SCRIPT), str(out), json.dumps(jobs), *flags,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    started = all((out / f"started_rank{r}").exists() for r in (0, 1))
    # A script that cannot import the package or crashes early is a failure, never a skip.
    assert started, f"the two processes did not start:\n{proc.stderr[-4000:]}"
    return proc


def result(out: Path, run: str = "run", rank: int = 0) -> dict:
    return json.loads((out / f"{run}_rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One launch, four trainings of 3 epochs on 2 processes: "run" (a checkpoint after every step,
    3 steps per epoch), "resumed" (from run's end of epoch 0), "two" (from the end of epoch 0 of a
    1-process run made here first, with 6 steps per epoch), and last "diverged", where rank 1
    selects another subset: it must stop the launch with an error."""
    out = tmp_path_factory.mktemp("ddp")
    alone = acs_trainer(
        out / "one",
        {"fraction": 0.25, "selection_interval": 1},
        {"num_train_epochs": 3, "per_device_train_batch_size": 2, "save_strategy": "epoch"},
        ds=tiny_dataset(N),
    )
    alone.train()
    write_parquet_dataset(out / "parquet", {"train": 30, "validation": 9}, bad_rows={"train": [4], "validation": [2]})
    jobs = [
        {"run": "prepared", "prepare": str(out / "parquet")},
        {"run": "run", "save_steps": 1},
        {"run": "resumed", "resume": str(out / "run" / "checkpoint-3")},
        {"run": "two", "resume": str(out / "one" / "checkpoint-6")},
        {"run": "vit", "family": "transformers", "save_steps": 3},
        {"run": "diverged", "diverge": True},
    ]
    proc = launch(out, jobs)
    for job in jobs[:5]:  # the runs before the diverged one completed on both processes
        assert all((out / f"{job['run']}_rank{r}.json").is_file() for r in (0, 1)), (job, proc.stderr[-4000:])
    return out, [r["subset_hash"] for r in alone.history], proc


@pytest.mark.slow
def test_two_processes_train_a_transformers_student(two_process_run):
    """A transformers ViT student under DDP: both processes select the same coresets every epoch,
    split each epoch's batches between them, and write a checkpoint."""
    out, _, _ = two_process_run
    r0, r1 = result(out, "vit", 0), result(out, "vit", 1)
    assert r0["world_size"] == 2 and r0["hashes"] == r1["hashes"] and len(r0["hashes"]) == 3
    for epoch in ("0", "1", "2"):
        seen = r0["seen"][epoch] + r1["seen"][epoch]
        assert len(seen) == K and not set(r0["seen"][epoch]) & set(r1["seen"][epoch])
    assert (out / "vit" / "checkpoint-3" / "acs_state.json").is_file()


@pytest.mark.slow
def test_two_processes_prepare_the_data_once(two_process_run):
    """The local main process loads the parquet dataset and checks every image; rank 1 waits, then
    reuses the cached filter: 39 checks in all (30 + 9 rows), not 78, and the same data."""
    out, _, _ = two_process_run
    r0, r1 = result(out, "prepared", 0), result(out, "prepared", 1)
    assert r0 == r1 == {"num_skipped": 2, "train_rows": 29, "fingerprint": r0["fingerprint"]}
    checks = [len(p.read_text().splitlines()) for p in (out / "prepared_checks").iterdir()]
    assert sum(checks) == 30 + 9 and len(checks) == 1  # one process checked every image once


@pytest.mark.slow
def test_two_processes_agree_and_split_batches(two_process_run):
    out, _, _ = two_process_run
    r0, r1 = result(out, rank=0), result(out, rank=1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["hashes"] == r1["hashes"] and len(r0["hashes"]) == 3  # identical subsets, every round
    for epoch in ("0", "1", "2"):
        a, b = r0["seen"][epoch], r1["seen"][epoch]
        assert len(a) == len(b) == K // 2  # each rank trains on half the batches
        subset = np.load(out / "run" / "selection" / f"epoch_{int(epoch):04d}.npy").tolist()
        assert sorted(a + b) == sorted(subset)  # together exactly the subset
    records = [json.loads(line) for line in (out / "run" / "acs_selection.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in records] == [2, 2, 2]
    assert r0["global_step"] == 9


@pytest.mark.slow
def test_epoch_boundary_resume_on_two_processes_selects_the_same_subsets(two_process_run):
    """Ranks score with rank 0's BatchNorm statistics, so the resumed run (which loads rank 0's
    model) scores and selects exactly as the uninterrupted one did."""
    out, _, _ = two_process_run
    resumed, full = result(out, "resumed"), result(out)
    assert resumed["hashes"] == full["hashes"]
    assert set(resumed["seen"]) == {"1", "2"} and resumed["seen"]["1"] == full["seen"]["1"]
    assert resumed["global_step"] == 9


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_one_process(two_process_run, tmp_path):
    """The epoch-1 subset is the one the 2-process run chose, the remaining epochs are trained once, and
    the teacher cache written as two shards is read by one process (no teacher forward)."""
    out, _, _ = two_process_run
    full = result(out)
    trainer = acs_trainer(
        tmp_path,
        {"fraction": 0.25, "selection_interval": 1, "teacher_cache_dir": str(out / "run" / "teacher_cache")},
        {"num_train_epochs": 3, "per_device_train_batch_size": 2},
        ds=tiny_dataset(N),
    )
    calls = []  # teacher forwards of the scoring pass (distillation runs outside inference mode)
    trainer.teacher_model.register_forward_hook(
        lambda *a: calls.append(1) if torch.is_inference_mode_enabled() else None
    )
    trainer.train(resume_from_checkpoint=str(out / "run" / "checkpoint-3"))
    assert trainer.history[1]["subset_hash"] == full["hashes"]["1"]
    assert sorted(trainer.recorder.seen) == [1, 2] and all(len(v) == K for v in trainer.recorder.seen.values())
    assert trainer.state.global_step == 3 * 6  # 6 steps per epoch on one process
    assert calls == []  # teacher probabilities came from the 2-process cache


@pytest.mark.slow
def test_mid_epoch_checkpoint_of_another_process_count_refused(two_process_run, tmp_path):
    out, _, _ = two_process_run
    trainer = acs_trainer(tmp_path, {"fraction": 0.25, "selection_interval": 1}, {"num_train_epochs": 3},
                          ds=tiny_dataset(N))  # fmt: skip
    message = r"checkpoint-4 was saved inside an epoch by 2 process\(es\); this run has 1.*resume from .*checkpoint-3"
    with pytest.raises(ValueError, match=message):
        trainer.train(resume_from_checkpoint=str(out / "run" / "checkpoint-4"))


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_processes(two_process_run):
    """Step 6 ends epoch 0 on one process; on two, the Trainer alone would count it as 2 epochs."""
    out, alone_hashes, _ = two_process_run
    two = result(out, "two")
    assert two["hashes"]["1"] == alone_hashes[1]
    assert set(two["seen"]) == {"1", "2"} and two["global_step"] == 9  # epochs 1 and 2, 3 steps each


@pytest.mark.slow
def test_diverged_selection_stops_the_run(two_process_run):
    out, _, proc = two_process_run
    assert proc.returncode != 0
    assert "ACS selection diverged across processes: ranks [0] vs [1]" in proc.stderr
    assert not (out / "diverged_rank0.json").exists()


@pytest.mark.slow
def test_two_processes_without_use_cpu_refused(tmp_path):
    proc = launch(tmp_path, [{"run": "run"}], "--no_use_cpu")
    assert proc.returncode != 0
    assert "pass --use_cpu" in proc.stderr
    assert not (tmp_path / "run_rank0.json").exists()
