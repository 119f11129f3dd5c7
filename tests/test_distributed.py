"""Two real gloo processes on the CPU via `accelerate launch --multi_gpu --num_processes 2`."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("ddp_script.py")
ROOT = Path(__file__).resolve().parents[1]


def launch(out: Path, *flags: str) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate launcher is not on PATH")
    cmd = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(SCRIPT), str(out), *flags,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if not all((out / f"started_rank{r}").exists() for r in (0, 1)):
        pytest.skip(f"two processes could not be started here:\n{proc.stderr[-2000:]}")
    return proc


def test_two_processes_agree_and_split_batches(tmp_path):
    proc = launch(tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["hashes"] == r1["hashes"] and len(r0["hashes"]) == 3  # identical subsets, every round
    k = round(0.25 * 48)
    for epoch in ("0", "1", "2"):
        a, b = r0["seen"][epoch], r1["seen"][epoch]
        assert len(a) == len(b) == k // 2  # each rank trains on half the batches
        subset = np.load(tmp_path / "run" / "selection" / f"epoch_{int(epoch):04d}.npy").tolist()
        assert sorted(a + b) == sorted(subset)  # together exactly the subset
    records = [json.loads(line) for line in (tmp_path / "run" / "acs_selection.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in records] == [2, 2, 2]


def test_diverged_selection_stops_the_run(tmp_path):
    proc = launch(tmp_path, "--diverge")
    assert proc.returncode != 0
    assert "ACS selection diverged across processes: ranks [0] vs [1]" in proc.stderr


def test_two_processes_without_use_cpu_refused(tmp_path):
    proc = launch(tmp_path, "--no_use_cpu")
    assert proc.returncode != 0
    assert "pass --use_cpu" in proc.stderr
    assert not (tmp_path / "rank0.json").exists()
