#!/usr/bin/env python
"""ImageNet scale without ImageNet: every O(N) step of an ACS run at up to 1,281,167 samples.

A synthetic dataset (1,000 classes, 4x4 PNG images, stored as the Hub stores ImageNet: parquet
shards with an Image and a ClassLabel column) goes through the recipe's own path:
``load_image_datasets`` -> ``prepare_datasets`` -> ACSTrainer (ACS, f = 0.1, a selection every
epoch, teacher cache on disk, a checkpoint every epoch) with a tiny model, so that decoding and
the forward pass are cheap and what is left is the cost that grows with N.

    python recipes/benchmark_scale.py --data_dir /tmp/acs_scale --output_json benchmarks/scale_cpu.json
    python recipes/benchmark_scale.py --quick ...        # N = 10k and 100k only

Per round it reports the time outside the forward pass (teacher-cache lookups, gather, selection,
records, sampler, checkpointed ACS state), the forward pass itself (batches + student), and the
peak RSS beyond the prepared dataset and the teacher cache; plus the one-off start-up (arrow
conversion, preparation, the teacher-cache build). With ``--processes 2`` the size given by
``--distributed_size`` also runs on two gloo processes. The last table gives each part's growth
factor per 10x of N.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn
from transformers import TrainingArguments
from transformers.utils import logging as hf_logging

from acs_hf import ACSArguments, ACSTrainer, QuantConfig, SelectionReporter, atomic_write_json, quantize_model
from acs_hf.data import load_image_datasets, prepare_datasets
from acs_hf.training.sampler import CoresetSampler

NUM_CLASSES = 1000
PAPER_N = 1_281_167
OUTSIDE = ("teacher_seconds", "gather_seconds", "select_seconds", "record_seconds", "sampler_seconds", "state_seconds")


def build_dataset(root: Path, n: int, shard_rows: int = 200_000) -> Path:
    """Parquet shards of n rows (cached: rebuilt only when missing). Image content depends on the
    class, so the scores are not all equal."""
    import datasets
    from PIL import Image

    out = root / f"synthetic_{n}"
    if (out / "done").is_file():
        return out
    rng = np.random.default_rng(0)
    pngs = []
    for c in range(NUM_CLASSES):  # one 4x4 picture per class, jittered per row below
        buf = io.BytesIO()
        Image.fromarray(((rng.random((4, 4, 3)) * 0.5 + c / NUM_CLASSES / 2) * 255).astype(np.uint8)).save(buf, "PNG")
        pngs.append(buf.getvalue())
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"n{c:08d}" for c in range(NUM_CLASSES)])}
    )
    splits = {"train": n, "validation": 2 * NUM_CLASSES}
    for split, rows in splits.items():
        shards = math.ceil(rows / shard_rows)
        for s in range(shards):
            idx = np.arange(s * shard_rows, min(rows, (s + 1) * shard_rows))
            labels = (idx * 7919) % NUM_CLASSES
            images = [{"bytes": pngs[c], "path": None} for c in labels]
            part = datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)
            (out / "data").mkdir(parents=True, exist_ok=True)
            part.to_parquet(str(out / "data" / f"{split}-{s:05d}-of-{shards:05d}.parquet"))
    (out / "done").write_text(str(n))
    return out


class PeakRSS:
    """Peak memory of this process and its loader workers while the block runs, as the sum of
    their proportional set sizes (RSS would count the pages a forked worker shares N times)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        total = 0
        proc = psutil.Process()
        for p in (proc, *proc.children(recursive=True)):
            try:
                total += p.memory_full_info().pss
            except psutil.Error:  # a worker that just exited
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


class TimedReporter(SelectionReporter):
    """SelectionReporter that times its writing (the JSONL log and the subset of every round)."""

    def __init__(self) -> None:
        super().__init__(plot=True)
        self.seconds: list[float] = []

    def on_selection(self, *args, **kwargs):
        start = time.perf_counter()
        super().on_selection(*args, **kwargs)
        self.seconds.append(time.perf_counter() - start)

    def on_train_end(self, *args, **kwargs):
        start = time.perf_counter()
        super().on_train_end(*args, **kwargs)
        self.plot_seconds = time.perf_counter() - start


def tiny_model() -> nn.Module:
    """A conv, a pool and a 1000-way classifier: every layer kind quantization handles, at ~no cost."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, NUM_CLASSES)
    )


def run_size(n: int, args, work: Path) -> dict:
    """One ACS run of 2 epochs (2 rounds) at N = n; every part's seconds and the memory."""
    data_dir = build_dataset(Path(args.data_dir), n)
    rss0 = PeakRSS.rss()
    start = time.perf_counter()
    raw = load_image_datasets(str(data_dir), cache_dir=str(Path(args.data_dir) / "hf_cache"))
    load_seconds = time.perf_counter() - start
    torch.manual_seed(0)
    fp = tiny_model()
    start = time.perf_counter()
    ds = prepare_datasets(raw, fp, image_size=8)
    labels = ds.score_dataset.labels
    prepare_seconds = time.perf_counter() - start
    trainer = scale_trainer(n, args, work, fp, ds)
    reporter = TimedReporter()
    trainer.add_callback(reporter)
    state_seconds = time_state_saves(trainer)
    rss_prepared = PeakRSS.rss()
    with PeakRSS() as peak:
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
    sampler = CoresetSampler(trainer.num_selected, seed=0)
    t = time.perf_counter()
    sampler.set_subset(trainer.subset)
    order = list(iter(sampler))
    sampler_seconds = time.perf_counter() - t
    cache_mb = trainer.teacher_cache.nbytes / 2**20 if trainer.teacher_cache is not None else 0.0
    rounds = round_parts(trainer, reporter, sampler_seconds, state_seconds)
    trainer.end()
    return {
        "n": n,
        "rank": int(os.environ.get("RANK", "0")),
        "world_size": trainer.accelerator.num_processes,
        "selected": len(order),
        "labels_checked": int(labels.size),
        "load_dataset_seconds": load_seconds,
        "prepare_seconds": prepare_seconds,
        "teacher_cache_build_seconds": rounds[0]["teacher_seconds"],
        "plot_seconds": getattr(reporter, "plot_seconds", 0.0),
        "train_seconds": train_seconds,
        "rounds": rounds,
        "teacher_cache_mb": cache_mb,
        "rss_before_mb": rss0 / 2**20,
        "rss_prepared_mb": rss_prepared / 2**20,
        "peak_rss_mb": peak.peak / 2**20,
        "peak_beyond_data_and_cache_mb": (peak.peak - rss_prepared) / 2**20 - cache_mb,
    }


def scale_trainer(n: int, args, work: Path, fp, ds) -> ACSTrainer:
    """The W4A4 ACS trainer of one size: 2 epochs, a round each, f = 0.1, checkpoints every epoch."""
    student = quantize_model(copy.deepcopy(fp), QuantConfig(4, 4, 8))
    targs = TrainingArguments(
        output_dir=str(work / f"run_{n}"),
        num_train_epochs=2,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        save_strategy="epoch",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=args.num_workers,
        seed=0,
    )
    acs = ACSArguments(selection_method="acs", fraction=0.1, selection_interval=1)
    return ACSTrainer(
        model=student,
        args=targs,
        train_dataset=ds.train_dataset,
        acs_args=acs,
        teacher_model=fp,
        score_dataset=ds.score_dataset,
        data_fingerprint=ds.fingerprint,
        report_selection=False,
    )


def time_state_saves(trainer: ACSTrainer) -> list[float]:
    """Times each save of ``trainer``'s selection state into the returned list (this trainer only)."""
    state_seconds: list[float] = []
    save_state = trainer.checkpointer.save

    def timed_save(*a, **kw):
        t = time.perf_counter()
        identity = save_state(*a, **kw)
        state_seconds.append(time.perf_counter() - t)
        return identity

    trainer.checkpointer.save = timed_save  # this trainer's selection state only
    return state_seconds


def round_parts(trainer: ACSTrainer, reporter, sampler_seconds: float, state_seconds: list[float]) -> list[dict]:
    """Each round's seconds by part, and their sum outside the forward passes."""
    rounds = []
    for i, record in enumerate(trainer.history):
        part = {k: record.get(k, 0.0) for k in ("data_seconds", "student_seconds", "wait_seconds", *OUTSIDE[:3])}
        part.update(
            record_seconds=reporter.seconds[i] if i < len(reporter.seconds) else 0.0,
            sampler_seconds=sampler_seconds,
            state_seconds=state_seconds[i] if i < len(state_seconds) else 0.0,
        )
        part["outside_forward_seconds"] = sum(part[k] for k in OUTSIDE)
        rounds.append(part)
    return rounds


def growth(results: list[dict], key) -> dict[str, float]:
    """Growth factor per 10x of N between consecutive sizes (10.0 = linear)."""
    out = {}
    for a, b in zip(results, results[1:]):
        va, vb = key(a), key(b)
        if va > 0 and vb > 0:
            out[f"{a['n']}->{b['n']}"] = (vb / va) ** (1 / math.log10(b["n"] / a["n"]))
    return out


def launch_distributed(args, n: int, work: Path) -> list[dict]:
    """The same run on ``--processes`` gloo processes; each rank writes its own JSON."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        __file__, "--worker_size", str(n), "--worker_out", str(work), "--data_dir", args.data_dir,
        "--batch_size", str(args.batch_size), "--num_workers", str(args.num_workers),
    ]  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    subprocess.run(cmd, check=True, env=env)
    return [json.loads((work / f"worker_{n}_rank{r}.json").read_text()) for r in range(args.processes)]


def print_table(results: list[dict]) -> None:
    parts = ("data_seconds", "student_seconds", "wait_seconds", *OUTSIDE, "outside_forward_seconds")
    print(
        f"\n{'part (last round, s)':28s}" + "".join(f"{r['n']:>11d}{'x' + str(r['world_size']):>4s}" for r in results)
    )
    for p in parts:
        print(f"{p:28s}" + "".join(f"{r['rounds'][-1][p]:15.3f}" for r in results))
    one_off = ("load_dataset_seconds", "prepare_seconds", "teacher_cache_build_seconds", "plot_seconds")
    for key in (*one_off, "teacher_cache_mb"):
        print(f"{key:28s}" + "".join(f"{r[key]:15.3f}" for r in results))
    for key in ("peak_rss_mb", "peak_beyond_data_and_cache_mb"):
        print(f"{key[:28]:28s}" + "".join(f"{r[key]:15.1f}" for r in results))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="where the synthetic datasets are built and cached")
    parser.add_argument("--output_json", type=Path, default=Path("benchmark_scale.json"))
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help=f"N values (default 10k 100k {PAPER_N})")
    parser.add_argument("--quick", action="store_true", help="N = 10k and 100k only")
    parser.add_argument("--processes", type=int, default=2, help="gloo processes of the distributed run (1: none)")
    parser.add_argument("--distributed_size", type=int, default=100_000)
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--num_workers", type=int, default=1, help="DataLoader workers per process")
    parser.add_argument("--worker_size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    if args.worker_size:  # one rank of launch_distributed
        result = run_size(args.worker_size, args, args.worker_out)
        atomic_write_json(args.worker_out / f"worker_{args.worker_size}_rank{result['rank']}.json", result)
        return result
    sizes = args.sizes or ([10_000, 100_000] if args.quick else [10_000, 100_000, PAPER_N])
    results = []
    with tempfile.TemporaryDirectory() as work:
        for n in sorted(sizes):
            t = time.perf_counter()
            results.append(run_size(n, args, Path(work)))
            print(f"[N={n}: {time.perf_counter() - t:.1f}s]", flush=True)
        distributed = None
        if args.processes > 1:  # its own folder: the single-process run's teacher cache must not be reused
            ranks = launch_distributed(args, args.distributed_size, Path(work) / "distributed")
            distributed = ranks[0]
            distributed["max_outside_forward_seconds_over_ranks"] = max(
                r["rounds"][-1]["outside_forward_seconds"] for r in ranks
            )
    print_table(results + ([distributed] if distributed else []))
    growth_factors = {
        p: growth(results, lambda r, p=p: r["rounds"][-1][p]) for p in (*OUTSIDE, "outside_forward_seconds")
    }
    growth_factors["prepare_seconds"] = growth(results, lambda r: r["prepare_seconds"])
    growth_factors["peak_rss_mb"] = growth(results, lambda r: r["peak_rss_mb"])
    print("\ngrowth per 10x of N (10 = linear):")
    for p, g in growth_factors.items():
        print(f"  {p:28s} " + "  ".join(f"{k}: {v:6.2f}" for k, v in g.items()))
    out = {
        "sizes": results,
        "distributed": distributed,
        "growth_per_10x": growth_factors,
        "meta": {"torch": torch.__version__, "cores": os.cpu_count(), "command": " ".join(sys.argv)},
    }
    args.output_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output_json, out)
    print(f"\nwrote {args.output_json}")
    return out


if __name__ == "__main__":
    main()
