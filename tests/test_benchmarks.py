"""The accuracy benchmark's statistics, checked by hand, and one tiny paired run end to end."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def accuracy():
    return load("benchmark_accuracy")


def test_paired_interval_by_hand(accuracy):
    # diffs 1, 2, 3: mean 2, sd 1, t(0.975, 2 dof) = 4.302653 -> half width 4.302653 / sqrt(3) = 2.48414
    r = accuracy.paired([1.0, 2.0, 3.0])
    assert r["diff_mean"] == 2.0 and r["pairs"] == 3
    assert math.isclose(r["ci95_low"], 2 - 2.48414, abs_tol=1e-4) and math.isclose(
        r["ci95_high"], 2 + 2.48414, abs_tol=1e-4
    )
    assert r["verdict"] == "no difference established"
    assert accuracy.paired([1.0, 1.2, 0.9, 1.1])["verdict"] == "better"
    assert accuracy.paired([-1.0, -1.2, -0.9, -1.1])["verdict"] == "worse"


def test_summary_pairs_by_seed(accuracy):
    """Differences are taken seed by seed: a method 1 point above the baseline at every seed is
    "better" although the seeds spread far more than 1 point."""
    runs = []
    for seed, base in enumerate([60.0, 75.0, 90.0]):
        for method, acc in (("acs", base + 1), ("random_dynamic", base), ("random_static", base + 1)):
            runs.append(
                {"bits": 4, "fraction": 0.1, "method": method, "seed": seed, "accuracy": acc / 100, "seconds": 1}
            )
    cell = next(c for c in accuracy.summarize(runs) if c["method"] == "acs")
    assert (
        math.isclose(cell["vs_random_dynamic"]["diff_mean"], 1.0) and cell["vs_random_dynamic"]["verdict"] == "better"
    )
    assert math.isclose(cell["vs_random_static"]["diff_mean"], 0.0, abs_tol=1e-9)
    assert cell["top1_std"] > 10


@pytest.mark.slow
def test_tiny_paired_run_end_to_end(accuracy, tmp_path):
    out = tmp_path / "acc"
    argv = [
        "--bits", "4", "--fractions", "0.3", "--seeds", "0", "1", "--epochs", "1", "--selection_interval", "1",
        "--fp_epochs", "1", "--methods", "acs_mixed", "random_dynamic", "random_static", "--max_train_samples", "120",
        "--max_eval_samples", "60", "--model_name", "test_resnet", "--image_size", "16", "--output_dir", str(out),
    ]  # fmt: skip
    result = accuracy.main(argv)
    saved = json.loads((out / "accuracy.json").read_text())
    cell = next(c for c in saved["cells"] if c["method"] == "acs_mixed")
    assert cell["seeds"] == [0, 1] and {"ci95_low", "ci95_high", "verdict"} <= set(cell["vs_random_dynamic"])
    by = {(r["method"], r["seed"]): r["accuracy"] * 100 for r in result["runs"]}
    diffs = [by["acs_mixed", s] - by["random_dynamic", s] for s in (0, 1)]
    assert math.isclose(cell["vs_random_dynamic"]["diff_mean"], sum(diffs) / 2)
    assert saved["software"]["torch"] and saved["command"]
    assert (out / "accuracy.png").stat().st_size > 1000 and "vs random_dynamic" in (out / "accuracy.md").read_text()
    assert sorted(p.name for p in (out / "fp").glob("*.safetensors")) == ["seed0.safetensors", "seed1.safetensors"]
