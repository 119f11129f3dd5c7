#!/usr/bin/env python
"""Accuracy of coreset QAT against the baselines: one FP model, then QAT per (bits, fraction, method,
seed) cell with the same epochs, optimizer and schedule; only the training data differs.

    python recipes/benchmark_accuracy.py --dataset digits --bits 2 4 --fractions 0.1 0.3 --seeds 0 1 2

Writes ``<output_dir>/accuracy.json`` (every run, and mean/std per cell), ``accuracy.md`` (a table)
and ``accuracy.png`` (top-1 against fraction, one line per method, like the paper's figures).
``--dataset`` takes ``digits`` (offline), a Hub dataset id or a local image folder with
``train``/``validation`` sub-folders.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path

import timm
import torch
import transformers
from transformers import TrainingArguments

from acs_hf import (
    ACSArguments,
    ACSTrainer,
    ImageClassificationTrainer,
    QuantConfig,
    atomic_write_json,
    create_selector,
    list_selectors,
    quantize_model,
)
from acs_hf.data import load_image_datasets, prepare_datasets
from acs_hf.metrics import make_compute_metrics, preprocess_logits_for_metrics

#: Compared by default; any registered selector can be passed with --methods.
DEFAULT_METHODS = ["acs", "random_dynamic", "random_static", "evs", "ds", "full"]


def selects_all(method: str) -> bool:
    return create_selector(method).selects_all


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


def train_fp(ds, args) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(0)
    model = timm.create_model(args.model_name, num_classes=len(ds.id2label))
    trainer = ImageClassificationTrainer(
        model=model,
        args=training_args(args.output_dir / "fp", args.fp_epochs, args.fp_lr, 0, args.batch_size),
        train_dataset=ds.train_dataset,
        eval_dataset=ds.eval_dataset,
        compute_metrics=make_compute_metrics(k=5),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    trainer.train()
    return model, trainer.evaluate()["eval_accuracy"]


def run_cell(fp, ds, args, bits: int, fraction: float, method: str, seed: int) -> dict:
    torch.manual_seed(seed)
    student = quantize_model(copy.deepcopy(fp), QuantConfig(weight_bits=bits, act_bits=bits, first_last_bits=8))
    acs = ACSArguments(
        selection_method=method,
        fraction=1.0 if selects_all(method) else fraction,
        selection_interval=args.selection_interval,
        selection_seed=seed,
        teacher_cache_dir="memory",
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
        score_dataset=ds.score_dataset,
        compute_metrics=make_compute_metrics(k=5),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"accuracy": trainer.evaluate()["eval_accuracy"], "seconds": seconds}


def summarize(runs: list[dict]) -> list[dict]:
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        cells.setdefault((r["bits"], r["fraction"], r["method"]), []).append(r)
    out = []
    for (bits, fraction, method), rs in sorted(cells.items()):
        acc = [r["accuracy"] * 100 for r in rs]
        out.append({
            "bits": bits, "fraction": fraction, "method": method, "seeds": len(rs),
            "top1_mean": statistics.mean(acc), "top1_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "seconds_mean": statistics.mean(r["seconds"] for r in rs),
        })  # fmt: skip
    return out


def markdown(cells: list[dict], fractions: list[float], fp_accuracy: float) -> str:
    lines = [f"FP model top-1: {fp_accuracy * 100:.2f}", ""]
    for bits in sorted({c["bits"] for c in cells}):
        lines += [f"W{bits}A{bits} top-1 (mean ± std over seeds; seconds per run)", ""]
        lines.append("| method | " + " | ".join(f"f = {f}" for f in fractions) + " |")
        lines.append("|---|" + "---|" * len(fractions))
        for method in DEFAULT_METHODS + sorted({c["method"] for c in cells} - set(DEFAULT_METHODS)):
            row = []
            for f in fractions:
                c = next((c for c in cells if c["bits"] == bits and c["method"] == method
                          and (c["fraction"] == f or selects_all(method))), None)  # fmt: skip
                row.append(f"{c['top1_mean']:.2f} ± {c['top1_std']:.2f} ({c['seconds_mean']:.0f}s)" if c else "")
            if any(row):
                lines.append(f"| {method} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_bits = sorted({c["bits"] for c in cells})
    fig, axes = plt.subplots(1, len(all_bits), figsize=(6 * len(all_bits), 4), squeeze=False)
    for ax, bits in zip(axes[0], all_bits):
        for method in sorted({c["method"] for c in cells}):
            cs = sorted((c for c in cells if c["bits"] == bits and c["method"] == method), key=lambda c: c["fraction"])
            if not cs:
                continue
            if selects_all(method):
                ax.axhline(cs[0]["top1_mean"], color="k", linestyle="--", label="full data")
                continue
            ax.errorbar([c["fraction"] for c in cs], [c["top1_mean"] for c in cs], yerr=[c["top1_std"] for c in cs],
                        marker="o", capsize=3, label=method)  # fmt: skip
        ax.set(title=f"W{bits}A{bits}", xlabel="fraction of training data per round", ylabel="top-1 (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model_name", default="resnet18")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list_selectors())
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=12)
    parser.add_argument("--selection_interval", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--fp_epochs", type=float, default=8)
    parser.add_argument("--fp_lr", type=float, default=2e-3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/benchmark_accuracy"))
    args = parser.parse_args(argv)
    for f in args.fractions:
        if not 0 < f < 1:
            parser.error(f"--fractions must lie in (0, 1), got {f}")
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()

    path = Path(args.dataset)
    if path.is_dir():
        raw = load_image_datasets(train_dir=str(path / "train"), validation_dir=str(path / "validation"))
    else:
        raw = load_image_datasets(args.dataset)
    probe = timm.create_model(args.model_name, num_classes=2)
    ds = prepare_datasets(raw, probe, image_size=args.image_size)
    started = time.perf_counter()
    fp, fp_accuracy = train_fp(ds, args)
    print(f"FP model: top-1 {fp_accuracy * 100:.2f} ({time.perf_counter() - started:.0f}s)", flush=True)
    # Each finished run is appended to runs.jsonl at once: an interrupted benchmark resumes where it stopped.
    args.output_dir.mkdir(parents=True, exist_ok=True)
    log = args.output_dir / "runs.jsonl"
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    done = {(r["bits"], r["fraction"], r["method"], r["seed"]) for r in runs}
    if done:
        print(f"resuming: {len(done)} runs already in {log}", flush=True)
    for bits in args.bits:
        for method in args.methods:
            for fraction in [1.0] if selects_all(method) else args.fractions:
                for seed in args.seeds:
                    if (bits, fraction, method, seed) in done:
                        continue
                    r = run_cell(fp, ds, args, bits, fraction, method, seed)
                    runs.append({"bits": bits, "fraction": fraction, "method": method, "seed": seed, **r})
                    with open(log, "a") as f:
                        f.write(json.dumps(runs[-1]) + "\n")
                    print(f"W{bits} {method:15s} f={fraction:<4} seed={seed}: top-1 {r['accuracy'] * 100:6.2f} "
                          f"({r['seconds']:.0f}s)", flush=True)  # fmt: skip
    cells = summarize(runs)
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "fp_accuracy": fp_accuracy, "runs": runs, "cells": cells,
              "total_seconds": time.perf_counter() - started}  # fmt: skip
    atomic_write_json(args.output_dir / "accuracy.json", result)  # never a half-written JSON
    table = markdown(cells, args.fractions, fp_accuracy)
    (args.output_dir / "accuracy.md").write_text(table)
    plot(cells, args.output_dir / "accuracy.png")
    print("\n" + table)
    print(f"wrote {args.output_dir}/accuracy.json, accuracy.md, accuracy.png")
    return result


if __name__ == "__main__":
    main()
