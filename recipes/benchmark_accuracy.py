#!/usr/bin/env python
"""Accuracy of coreset QAT against the baselines, as paired comparisons with 95% intervals.

For every seed s one FP model is trained (seed s); then every method at seed s starts from that FP
model, the same calibration and the same data-order generator, with the same epochs, optimizer and
schedule: only the training data differs. Each cell reports the mean and standard deviation over
seeds and, against ``random_dynamic`` and ``random_static``, the mean paired difference with its
95% t-interval; the verdict ("better", "worse", "no difference established") comes from the
interval, never from the means.

    python recipes/benchmark_accuracy.py                          # digits, W2A2 + W4A4, f 0.1 + 0.3, 5 seeds
    python recipes/benchmark_accuracy.py --dataset_name uoft-cs/cifar100 --model_name resnet18 --image_size 32
    python recipes/benchmark_accuracy.py --train_dir data/train --validation_dir data/val
    python recipes/benchmark_accuracy.py --model_name cifar_resnet20 --pretrained_weights resnet20.th \
        --dataset_name path/to/cifar10 --bits 2 --float_activations   # QAT from a pretrained network

With ``--pretrained_weights`` every seed starts from that one network (and distils from it); its
accuracy is measured on the evaluation split first.

Writes ``<output_dir>/accuracy.json`` (every run; per cell the means and, per random baseline,
``diff_mean``, ``ci95_low``, ``ci95_high`` and the verdict; the command, seeds and software
versions), ``accuracy.md`` (the tables) and ``accuracy.png`` (top-1 and paired differences against
fraction). Finished runs are logged to ``runs.jsonl``: an interrupted benchmark resumes there.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import transformers
from safetensors.torch import load_file, save_file
from scipy import stats as scipy_stats
from transformers import TrainingArguments

from acs_hf import (
    ACSArguments,
    ACSTrainer,
    ImageClassificationTrainer,
    QuantConfig,
    atomic_write_json,
    create_selector,
    list_selectors,
    load_weights,
    quantize_model,
)
from acs_hf.data import ImageView, load_image_datasets, prepare_datasets, score_transform
from acs_hf.metrics import make_compute_metrics, preprocess_logits_for_metrics

#: Compared by default; any registered selector can be passed with --methods.
DEFAULT_METHODS = ["acs", "acs_gumbel", "acs_mixed", "random_dynamic", "random_static", "full"]
BASELINES = ("random_dynamic", "random_static")


#: Settings a method spec may carry after "@": ``acs@pool=0.3,reuse=1``, ``random_dynamic@f=0.25,kd=0``.
VARIANT_KEYS = {
    "pool": "score_pool_fraction",
    "reuse": "reuse_training_scores",
    "kd": "kd_alpha",
    "f": "fraction",
    "R": "selection_interval",
    "res": "score_image_size",
    "ig": "integer_graph",
}
INTEGER_KEYS = ("R", "res")
BOOL_KEYS = ("reuse", "ig")
#: Settings of the model or data, not of ACSArguments.
NON_ACS_SETTINGS = ("score_image_size", "integer_graph")


def parse_method(spec: str) -> tuple[str, dict]:
    """``"acs@pool=0.3,kd=0"`` -> ``("acs", {"score_pool_fraction": 0.3, "kd_alpha": 0.0})``."""
    name, _, rest = spec.partition("@")
    if name not in list_selectors():
        raise ValueError(f"method {spec!r}: unknown selector {name!r}; registered: {', '.join(list_selectors())}")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in VARIANT_KEYS or not value:
            raise ValueError(f"method {spec!r}: setting {item!r} is not KEY=VALUE with KEY in {sorted(VARIANT_KEYS)}")
        kind = (lambda v: bool(int(v))) if key in BOOL_KEYS else int if key in INTEGER_KEYS else float
        settings[VARIANT_KEYS[key]] = kind(value)
    return name, settings


def selects_all(method: str) -> bool:
    return create_selector(parse_method(method)[0]).selects_all


def is_random(method: str) -> bool:
    return not create_selector(parse_method(method)[0]).needs_model


def run_fraction(method: str, fraction: float) -> float:
    """The fraction a method spec trains on at the grid fraction ``fraction``."""
    return 1.0 if selects_all(method) else parse_method(method)[1].get("fraction", fraction)


def compute_units(run: dict) -> float:
    """Compute of a run in forward-pass equivalents of one image: a training step costs 3
    (forward + backward), a teacher forward for distillation 1, a scoring forward 1 (times the
    squared resolution ratio when the scoring view is smaller)."""
    training = 3 * run["train_images"] + run["train_teacher_forwards"]
    return training + run.get("score_forward_cost", 1.0) * (run["score_forwards"] + run["score_teacher_forwards"])


def training_args(out: Path, epochs: float, lr: float, seed: int, batch_size: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=256,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
    )


def pretrained_fp(ds, args) -> tuple[torch.nn.Module, float]:
    """The network in ``--pretrained_weights`` and its accuracy on the evaluation split (measured once,
    kept in ``<output_dir>/fp/pretrained.json``)."""
    model = load_weights(timm.create_model(args.model_name, num_classes=len(ds.id2label)), args.pretrained_weights)
    saved = args.output_dir / "fp" / "pretrained.json"
    if saved.is_file():
        measured = json.loads(saved.read_text())
        if measured.get("weights") != str(args.pretrained_weights):
            raise SystemExit(f"{args.output_dir} holds runs from {measured.get('weights')}, not "
                             f"{args.pretrained_weights}: give another --output_dir")  # fmt: skip
        return model, measured["accuracy"]
    trainer = ImageClassificationTrainer(
        model=model,
        args=training_args(args.output_dir / "fp", 1, args.lr, 0, args.batch_size),
        eval_dataset=ds.eval_dataset,
        compute_metrics=make_compute_metrics(k=5),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    accuracy = trainer.evaluate()["eval_accuracy"]
    atomic_write_json(saved, {"accuracy": accuracy, "weights": str(args.pretrained_weights)})
    return model, accuracy


def train_fp(ds, args, seed: int) -> tuple[torch.nn.Module, float]:
    """The FP model of seed ``seed``, trained once and kept in ``<output_dir>/fp/`` for resumes."""
    torch.manual_seed(seed)
    model = timm.create_model(args.model_name, num_classes=len(ds.id2label))
    saved = args.output_dir / "fp" / f"seed{seed}.safetensors"
    if saved.is_file():
        model.load_state_dict(load_file(saved))
        return model, json.loads(saved.with_suffix(".json").read_text())["accuracy"]
    trainer = ImageClassificationTrainer(
        model=model,
        args=training_args(args.output_dir / "fp", args.fp_epochs, args.fp_lr, seed, args.batch_size),
        train_dataset=ds.train_dataset,
        eval_dataset=ds.eval_dataset,
        compute_metrics=make_compute_metrics(k=5),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    trainer.train()
    accuracy = trainer.evaluate()["eval_accuracy"]
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix(".tmp")  # then renamed: a resume never loads a half-written model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, saved)
    atomic_write_json(saved.with_suffix(".json"), {"accuracy": accuracy})
    return model, accuracy


def run_cell(fp, ds, args, bits: int, fraction: float, method: str, seed: int) -> dict:
    torch.manual_seed(seed)
    name, settings = parse_method(method)
    score_size = settings.pop("score_image_size", None)
    integer_graph = settings.pop("integer_graph", False)
    score_view = ds.score_dataset
    if score_size is not None:  # the same rows under the eval transform at another resolution
        view = ds.score_dataset
        score_view = ImageView(view.dataset, score_transform(ds.data_config, score_size), view.image_column,
                               view.label_column, view.split)  # fmt: skip
    act_bits = None if args.float_activations else bits
    config = QuantConfig(weight_bits=bits, act_bits=act_bits, first_last_bits=8, integer_graph=integer_graph)
    student = quantize_model(copy.deepcopy(fp), config)
    acs = ACSArguments(
        selection_method=name,
        selection_seed=seed,
        selection_temperature=args.temperature,
        selection_share=args.share,
        teacher_cache_dir="memory",
        score_cache_dir=args.score_cache_dir,
        **{"selection_interval": args.selection_interval, **settings, "fraction": run_fraction(method, fraction)},
    )
    trainer = ACSTrainer(
        model=student,
        args=training_args(
            args.output_dir / "runs" / f"w{bits}-{method}-f{fraction}-s{seed}",
            args.epochs,
            args.lr,
            seed,
            args.batch_size,
        ),
        train_dataset=ds.train_dataset,
        eval_dataset=ds.eval_dataset,
        acs_args=acs,
        teacher_model=copy.deepcopy(fp),
        score_dataset=score_view,
        compute_metrics=make_compute_metrics(k=5),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    train_images = trainer.num_selected * args.epochs
    result = {
        "act_bits": act_bits,
        "accuracy": trainer.evaluate()["eval_accuracy"],
        "seconds": seconds,
        "scoring_seconds": sum(r.get("scoring_seconds", 0.0) for r in trainer.history),
        "train_images": train_images,
        "train_teacher_forwards": train_images if acs.kd_alpha > 0 else 0,
        "score_forwards": sum(r.get("scored_samples", 0) for r in trainer.history),
        "score_teacher_forwards": sum(r.get("teacher_forwards", 0) for r in trainer.history),
        "score_forward_cost": ((score_size or args.image_size) / args.image_size) ** 2,
    }
    result["compute_units"] = compute_units(result)
    return result


def paired(diffs: list[float]) -> dict:
    """Mean paired difference with its two-sided 95% t-interval and the verdict it supports."""
    n = len(diffs)
    mean = statistics.mean(diffs)
    if n < 2:
        return {"diff_mean": mean, "ci95_low": None, "ci95_high": None, "pairs": n, "verdict": "too few seeds"}
    half = scipy_stats.t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    low, high = mean - half, mean + half
    verdict = "better" if low > 0 else "worse" if high < 0 else "no difference established"
    return {"diff_mean": mean, "ci95_low": low, "ci95_high": high, "pairs": n, "verdict": verdict}


def _kd(method: str) -> float:
    return parse_method(method)[1].get("kd_alpha", 1.0)


def _ig(method: str) -> bool:
    return parse_method(method)[1].get("integer_graph", False)


def _baseline(method: str, name: str, methods: set[str]) -> str | None:
    """The spec of baseline ``name`` that matches ``method``'s distillation and quantizer placement, at the
    grid fraction."""
    for m in sorted(methods):
        base, settings = parse_method(m)
        if base == name and set(settings) <= {"kd_alpha", "integer_graph"} and _kd(m) == _kd(method):
            if _ig(m) == _ig(method):
                return m
    return None


def _without_integer_graph(method: str) -> str:
    """``acs@reuse=1,ig=1`` -> ``acs@reuse=1``: the same run with the paper's quantizer placement."""
    name, _, rest = method.partition("@")
    rest = ",".join(item for item in rest.split(",") if item and item.partition("=")[0] != "ig")
    return f"{name}@{rest}" if rest else name


def equal_compute_accuracy(ladder: list[tuple[float, float]], units: float) -> float | None:
    """Accuracy of ``random_dynamic`` at ``units`` of compute, linearly interpolated between the
    (units, accuracy) runs of its fraction ladder; None outside the ladder (no extrapolation)."""
    ladder = sorted(ladder)
    for (u0, a0), (u1, a1) in zip(ladder, ladder[1:]):
        if u0 <= units <= u1:
            return a0 if u1 == u0 else a0 + (a1 - a0) * (units - u0) / (u1 - u0)
    return ladder[0][1] if len(ladder) == 1 and math.isclose(ladder[0][0], units, rel_tol=1e-9) else None


def _equal_compute(runs: list[dict], cell_runs: list[dict], method: str) -> dict | None:
    diffs = []
    for r in cell_runs:
        ladder = [
            (q["compute_units"], q["accuracy"] * 100) for q in runs
            if "compute_units" in q and (q["bits"], q["fraction"], q["seed"]) == (r["bits"], r["fraction"], r["seed"])
            and parse_method(q["method"])[0] == "random_dynamic" and _kd(q["method"]) == _kd(method)
            and _ig(q["method"]) == _ig(method)
        ]  # fmt: skip
        baseline = equal_compute_accuracy(ladder, r["compute_units"]) if "compute_units" in r else None
        if baseline is not None:
            diffs.append(r["accuracy"] * 100 - baseline)
    return paired(diffs) if diffs else None


def summarize(runs: list[dict]) -> list[dict]:
    """Per (bits, fraction, method) cell: top-1 mean and std over seeds, compute, and the paired
    differences against the random baselines at equal epochs (``vs_random_dynamic``,
    ``vs_random_static``) and against ``random_dynamic`` at equal compute (``vs_random_equal_compute``)."""
    by_key = {(r["bits"], r["fraction"], r["method"], r["seed"]): r["accuracy"] * 100 for r in runs}
    methods = {r["method"] for r in runs}
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        cells.setdefault((r["bits"], r["fraction"], r["method"]), []).append(r)
    out = []
    for (bits, fraction, method), cell_runs in sorted(cells.items()):
        values = [r["accuracy"] * 100 for r in cell_runs]
        cell = {
            "bits": bits, "fraction": fraction, "method": method, "seeds": sorted(r["seed"] for r in cell_runs),
            "train_fraction": run_fraction(method, fraction),
            "top1_mean": statistics.mean(values), "top1_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seconds_mean": statistics.mean(r["seconds"] for r in cell_runs),
            "act_bits": cell_runs[0].get("act_bits", bits),
        }  # fmt: skip
        if all("compute_units" in r for r in cell_runs):
            cell["compute_units_mean"] = statistics.mean(r["compute_units"] for r in cell_runs)
            cell["scoring_seconds_mean"] = statistics.mean(r["scoring_seconds"] for r in cell_runs)
        if _ig(method):  # what the integer-graph placement costs, paired by seed
            plain = _without_integer_graph(method)
            pairs = [(by_key[(bits, fraction, method, r["seed"])], by_key.get((bits, fraction, plain, r["seed"])))
                     for r in cell_runs]  # fmt: skip
            pairs = [(a, b) for a, b in pairs if b is not None]
            if pairs:
                cell["vs_paper_placement"] = {"baseline": plain, **paired([a - b for a, b in pairs])}
        if is_random(method) or selects_all(method):
            out.append(cell)
            continue
        for name in BASELINES:
            base = _baseline(method, name, methods)
            pairs = [(by_key[(bits, fraction, method, r["seed"])], by_key.get((bits, fraction, base, r["seed"])))
                     for r in cell_runs]  # fmt: skip
            pairs = [(a, b) for a, b in pairs if b is not None]
            if base and pairs:
                cell[f"vs_{name}"] = {"baseline": base, **paired([a - b for a, b in pairs])}
        equal = _equal_compute(runs, cell_runs, method)
        if equal:
            cell["vs_random_equal_compute"] = equal
        out.append(cell)
    return out


def width(bits: int, rows: list[dict]) -> str:
    """``W4A4``, or ``W2A32`` where the runs of ``bits`` kept float activations (``act_bits`` None)."""
    acts = {r.get("act_bits", bits) for r in rows if r["bits"] == bits}
    if len(acts) > 1:
        raise ValueError(
            f"runs of {bits}-bit weights mix activation widths {sorted(map(str, acts))}: use one output_dir each"
        )
    return f"W{bits}A{acts.pop() if acts and None not in acts else 32}"


def _interval(c: dict | None) -> str:
    if not c or c.get("ci95_low") is None:
        return ""
    return f"{c['diff_mean']:+.2f} [{c['ci95_low']:+.2f}, {c['ci95_high']:+.2f}] {c['verdict']}"


def markdown(cells: list[dict], fractions: list[float], fp_accuracy: float, methods: list[str]) -> str:
    lines = [f"FP models top-1 (mean over seeds): {fp_accuracy * 100:.2f}", ""]
    methods = methods + sorted({c["method"] for c in cells} - set(methods))
    for bits in sorted({c["bits"] for c in cells}):
        lines += [f"{width(bits, cells)}: top-1 mean ± std over seeds; compute in millions of image forward "
                  "equivalents (training step 3, distillation teacher 1, scoring forward 1); paired difference, "
                  "mean [95% interval] and verdict, against random_dynamic at equal epochs (same distillation) "
                  "and at equal compute (random_dynamic's fraction ladder interpolated to the run's compute)",
                  ""]  # fmt: skip
        lines.append(
            "| method | f | top-1 | compute (M) | vs random_dynamic | vs random, equal compute | vs random_static "
            "| vs paper placement |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for method in methods:
            for f in [1.0] if selects_all(method) else fractions:
                c = next((c for c in cells if (c["bits"], c["fraction"], c["method"]) == (bits, f, method)), None)
                if c is None:
                    continue
                compute = f"{c['compute_units_mean'] / 1e6:.2f}" if "compute_units_mean" in c else ""
                lines.append(
                    f"| {method} | {c['train_fraction']:g} | {c['top1_mean']:.2f} ± {c['top1_std']:.2f} | {compute} | "
                    f"{_interval(c.get('vs_random_dynamic'))} | {_interval(c.get('vs_random_equal_compute'))} | "
                    f"{_interval(c.get('vs_random_static'))} | {_interval(c.get('vs_paper_placement'))} |"
                )
        lines.append("")
    return "\n".join(lines)


def plot_compute(runs: list[dict], path: Path) -> None:
    """Top-1 against compute, one point per run, one colour per method, one panel per bit width."""
    from matplotlib.figure import Figure

    runs = [r for r in runs if "compute_units" in r]
    all_bits = sorted({r["bits"] for r in runs})
    if not runs:
        return
    fig = Figure(figsize=(6.5 * len(all_bits), 4.8))
    axes = fig.subplots(1, len(all_bits), squeeze=False)[0]
    methods = sorted({r["method"] for r in runs})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, bits in zip(axes, all_bits):
        for m in methods:
            rs = [r for r in runs if r["bits"] == bits and r["method"] == m]
            if rs:
                ax.scatter([r["compute_units"] / 1e6 for r in rs], [r["accuracy"] * 100 for r in rs],
                           color=colours[m], label=m, s=18, marker="o" if is_random(m) else "^")  # fmt: skip
        ax.set(title=width(bits, runs), xlabel="compute (M image forward equivalents)", ylabel="top-1 (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot(cells: list[dict], path: Path) -> None:
    """Top-1 against fraction (mean ± std) and, below, the paired difference against
    random_dynamic with its 95% interval, one column per bit width."""
    from matplotlib.figure import Figure

    all_bits = sorted({c["bits"] for c in cells})
    fig = Figure(figsize=(6 * len(all_bits), 7.5))
    axes = fig.subplots(2, len(all_bits), squeeze=False)
    for col, bits in enumerate(all_bits):
        top, bottom = axes[0][col], axes[1][col]
        for method in sorted({c["method"] for c in cells}):
            cs = sorted((c for c in cells if c["bits"] == bits and c["method"] == method), key=lambda c: c["fraction"])
            if not cs:
                continue
            if selects_all(method):
                top.axhline(cs[0]["top1_mean"], color="k", linestyle="--", label="full data")
                continue
            xs = [c["fraction"] for c in cs]
            top.errorbar(xs, [c["top1_mean"] for c in cs], yerr=[c["top1_std"] for c in cs], marker="o", capsize=3,
                         label=method)  # fmt: skip
            points = [(c["fraction"], c["vs_random_dynamic"]) for c in cs
                      if c.get("vs_random_dynamic", {}).get("ci95_low") is not None]  # fmt: skip
            if points:
                mean = [d["diff_mean"] for _, d in points]
                err = [[m - d["ci95_low"] for m, (_, d) in zip(mean, points)],
                       [d["ci95_high"] - m for m, (_, d) in zip(mean, points)]]  # fmt: skip
                bottom.errorbar([f for f, _ in points], mean, yerr=err, marker="o", capsize=3, label=method)
        top.set(title=width(bits, cells), xlabel="fraction of training data per round", ylabel="top-1 (%)")
        top.legend(fontsize=8)
        bottom.axhline(0, color="k", linewidth=0.8)
        bottom.set(xlabel="fraction", ylabel="top-1 minus random_dynamic (points, 95% CI)")
        if bottom.lines[1:]:
            bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; every method and its settings checked before any run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", default="digits", help="digits (offline), a Hub id or a local dataset folder")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--train_dir", default=None, help="local image folder of the training split")
    parser.add_argument("--validation_dir", default=None, help="local image folder of the validation split")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--model_name", default="resnet18")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--float_activations",
        action="store_true",
        help="quantize weights only (--bits), activations stay float (the paper's CIFAR setting)",
    )
    parser.add_argument(
        "--pretrained_weights",
        type=Path,
        default=None,
        help="start every seed from this weights file (safetensors or torch checkpoint) instead of "
        "training FP models; it is also the teacher",
    )
    parser.add_argument(
        "--scale",
        type=float,
        nargs=2,
        default=[0.08, 1.0],
        help="random-resized-crop area range of the training view (timm's default)",
    )
    parser.add_argument("--color_jitter", type=float, default=0.4, help="colour jitter strength (timm's default)")
    parser.add_argument(
        "--score_cache_dir", default=None, help="cache the decoded scoring view here (ACSArguments.score_cache_dir)"
    )
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                        help="selectors, each optionally with settings after @: acs@pool=0.3,reuse=1 (score pool "
                        "fraction, training-pass scores), random_dynamic@f=0.25 (its own fraction), acs@kd=0 "
                        "(kd_alpha), acs@R=5 (selection interval), acs@res=24 (scoring resolution), "
                        "random_dynamic@ig=1 (QuantConfig integer_graph placement); "
                        "registered: " + ", ".join(list_selectors()))  # fmt: skip
    parser.add_argument("--temperature", type=float, default=1.0, help="acs_gumbel's temperature")
    parser.add_argument("--share", type=float, default=0.5, help="acs_mixed's top-k share")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=float, default=12)
    parser.add_argument("--selection_interval", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--fp_epochs", type=float, default=8)
    parser.add_argument("--fp_lr", type=float, default=2e-3)
    parser.add_argument(
        "--fp_seed",
        type=int,
        default=None,
        help="train one FP model (this seed) for every seed; default: one FP model per seed",
    )
    parser.add_argument("--summarize_only", action="store_true",
                        help="run nothing: summarize every run in <output_dir>/runs.jsonl")  # fmt: skip
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/benchmark_accuracy"))
    args = parser.parse_args(argv)
    for f in args.fractions:
        if not 0 < f < 1:
            parser.error(f"--fractions must lie in (0, 1), got {f}")
    for m in args.methods:
        try:
            name, settings = parse_method(m)
            for key in NON_ACS_SETTINGS:  # settings of the data view or the model, checked where they are used
                settings.pop(key, None)
            ACSArguments(selection_method=name, **{"fraction": 1.0 if selects_all(m) else min(args.fractions),
                                                    **settings})  # fmt: skip
        except ValueError as e:
            parser.error(f"--methods {m}: {e}")
    if "random_dynamic" not in args.methods:
        parser.error("--methods must include the baseline random_dynamic (the paired intervals are taken against it)")
    ACSArguments(selection_method="acs_gumbel", selection_temperature=args.temperature, selection_share=args.share)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()

    args.output_dir.mkdir(parents=True, exist_ok=True)
    log = args.output_dir / "runs.jsonl"
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    started = time.perf_counter()
    if args.summarize_only:
        if not runs:
            raise SystemExit(f"--summarize_only: {log} holds no runs to summarize")
        grid = runs
        fp_accuracies = {p.stem: json.loads(p.read_text())["accuracy"] for p in (args.output_dir / "fp").glob("*.json")}
    else:
        ds = load_data(args)
        fp_accuracies = run_grid(args, ds, runs, log)
        # This invocation's grid only: runs.jsonl may hold other cells (another --bits/--fractions run).
        grid = [
            r for r in runs
            if r["seed"] in args.seeds and r["bits"] in args.bits and r["method"] in args.methods
            and (r["fraction"] in args.fractions or selects_all(r["method"]))
        ]  # fmt: skip
    return write_report(args, grid, fp_accuracies, time.perf_counter() - started)


def load_data(args):
    dataset = None if args.train_dir else args.dataset_name
    raw = load_image_datasets(dataset, args.dataset_config_name, args.train_dir, args.validation_dir)
    probe = timm.create_model(args.model_name, num_classes=2)
    augmentation = {"scale": tuple(args.scale), "color_jitter": args.color_jitter}
    return prepare_datasets(raw, probe, image_size=args.image_size, max_train_samples=args.max_train_samples,
                            max_eval_samples=args.max_eval_samples, augmentation=augmentation)  # fmt: skip


def run_grid(args, ds, runs: list[dict], log: Path) -> dict:
    """Every (seed, bits, method, fraction) run not yet in ``runs``, each appended to ``log`` at once."""
    act_bits = {b: None if args.float_activations else b for b in args.bits}
    done = {(r["bits"], r.get("act_bits", r["bits"]), r["fraction"], r["method"], r["seed"]) for r in runs}
    if done:
        print(f"resuming: {len(done)} runs already in {log}", flush=True)
    fp_accuracies = {}
    for seed in args.seeds:
        if args.pretrained_weights:
            fp, fp_accuracies["pretrained"] = pretrained_fp(ds, args)
            print(f"seed {seed}: pretrained FP model top-1 {fp_accuracies['pretrained'] * 100:.2f}", flush=True)
        else:
            fp_seed = seed if args.fp_seed is None else args.fp_seed
            fp, fp_accuracies[f"seed{fp_seed}"] = train_fp(ds, args, fp_seed)
            print(f"seed {seed}: FP model (seed {fp_seed}) top-1 {fp_accuracies[f'seed{fp_seed}'] * 100:.2f}",
                  flush=True)  # fmt: skip
        for bits in args.bits:
            for method in args.methods:
                for fraction in [1.0] if selects_all(method) else args.fractions:
                    if (bits, act_bits[bits], fraction, method, seed) in done:
                        continue
                    r = run_cell(fp, ds, args, bits, fraction, method, seed)
                    runs.append({"bits": bits, "fraction": fraction, "method": method, "seed": seed, **r})
                    with open(log, "a") as f:  # each finished run at once: a resume starts after it
                        f.write(json.dumps(runs[-1]) + "\n")
                    print(f"W{bits} {method:28s} f={fraction:<4} seed={seed}: top-1 {r['accuracy'] * 100:6.2f} "
                          f"({r['seconds']:.0f}s, {r['compute_units'] / 1e6:.2f}M units)", flush=True)  # fmt: skip
    return fp_accuracies


def write_report(args, runs: list[dict], fp_accuracies: dict, seconds: float) -> dict:
    cells = summarize(runs)
    fp_accuracy = statistics.mean(fp_accuracies.values()) if fp_accuracies else float("nan")
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "software": {"python": platform.python_version(),
                     **{m.__name__: m.__version__ for m in (torch, transformers, timm)}},
        "compute_units": "image forward equivalents: 3 per training image, 1 per distillation teacher forward, "
                         "1 per scoring forward (student or teacher)",
        "fp_accuracy": fp_accuracy, "fp_accuracy_per_model": fp_accuracies,
        "runs": runs, "cells": cells, "total_seconds": seconds,
    }  # fmt: skip
    atomic_write_json(args.output_dir / "accuracy.json", result)  # never a half-written JSON
    fractions = sorted({r["fraction"] for r in runs if not selects_all(r["method"])})
    table = markdown(cells, fractions, fp_accuracy, list(dict.fromkeys(r["method"] for r in runs)))
    (args.output_dir / "accuracy.md").write_text(table)
    plot(cells, args.output_dir / "accuracy.png")
    plot_compute(runs, args.output_dir / "accuracy_compute.png")
    print("\n" + table)
    print(f"wrote {args.output_dir}/accuracy.json, accuracy.md, accuracy.png, accuracy_compute.png")
    return result


if __name__ == "__main__":
    main()
