"""The real data path of ``benchmark_speed.py --data jpeg``: ImageNet-like JPEGs in a ``datasets``
Image column, loaded by ``load_image_datasets`` / ``prepare_datasets``, decoded and transformed by
timm transforms in DataLoader workers, trained and scored by ACSTrainer exactly as ``run_acs.py``
does. Importable on its own; ``benchmark_speed.py`` calls :func:`bench_jpeg`.
"""

from __future__ import annotations

import copy
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from transformers import TrainingArguments

from acs_hf import ACSArguments, ACSTrainer, QuantConfig, create_selector, quantize_model
from acs_hf.data import load_image_datasets, prepare_datasets
from acs_hf.data.view_cache import ScoreViewCache

NUM_CLASSES = 10
JPEG_SIZE = (500, 375)  # ImageNet's typical width x height
JPEG_QUALITY = 90


def build_jpeg_dataset(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` training and ``n // 8`` validation JPEGs (500x375, quality 90) as Hub-style parquet
    shards; content depends on the class (colour, blob position, texture frequency) so that the
    scores differ. Built once per (n, seed) under ``root``."""
    import datasets
    from PIL import Image

    out = Path(root) / f"jpeg_{n}_{seed}"
    if (out / "done").is_file():
        return out
    rng = np.random.default_rng(seed)
    w, h = JPEG_SIZE
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"class_{c}" for c in range(NUM_CLASSES)])}
    )
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", n), ("validation", max(n // 8, NUM_CLASSES))):
        images, labels = [], []
        for i in range(rows):
            c = i % NUM_CLASSES
            cy, cx = 0.3 + 0.4 * rng.random(2)
            blob = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 + 0.01 * c)))
            texture = np.sin((xx * (5 + 3 * c) + yy * rng.uniform(2, 9)) * np.pi)
            hue = np.array([np.cos(c), np.sin(c), np.cos(2 * c)]) * 0.35 + 0.5
            img = hue[None, None] * (0.6 + 0.3 * blob[..., None]) + 0.1 * texture[..., None]
            img = img + rng.normal(0, 0.06, img.shape)  # sensor noise: JPEG sizes like photos'
            buf = io.BytesIO()
            Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(buf, "JPEG", quality=JPEG_QUALITY)
            images.append({"bytes": buf.getvalue(), "path": None})
            labels.append(c)
        part = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        part.to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))
    (out / "done").write_text(str(n))
    return out


def _rate(view, rows: int) -> float:
    """Images per second of one process reading ``view`` in batches of 32 (decode + transform)."""
    view.__getitems__(list(range(min(8, len(view)))))  # warm caches
    start = time.perf_counter()
    for i in range(0, rows, 32):
        view.__getitems__(list(range(i, min(rows, i + 32))))
    return rows / (time.perf_counter() - start)


def run_args(args, out: str, epochs: int) -> TrainingArguments:
    """TrainingArguments of the benchmark's wall-clock runs (shared with benchmark_speed.py)."""
    return TrainingArguments(
        output_dir=out,
        num_train_epochs=epochs,
        per_device_train_batch_size=args.wallclock_batch_size,
        per_device_eval_batch_size=args.wallclock_batch_size * 2,
        learning_rate=1e-4,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        dataloader_num_workers=args.num_workers,
        dataloader_pin_memory=args.device == "cuda",
        seed=0,
    )


def _trainer(method, fp, ds, args, out, epochs, interval, score_cache_dir=None) -> ACSTrainer:
    student = quantize_model(copy.deepcopy(fp), QuantConfig(4, 4, 8, compile_kernels=args.compile_in_runs))
    targs = run_args(args, out, epochs)
    acs = ACSArguments(
        selection_method=method,
        fraction=1.0 if create_selector(method).selects_all else 0.1,
        selection_interval=interval,
        teacher_cache_dir="memory",
        score_cache_dir=score_cache_dir,
    )
    return ACSTrainer(
        model=student,
        args=targs,
        train_dataset=ds.train_dataset,
        acs_args=acs,
        teacher_model=copy.deepcopy(fp),
        score_dataset=ds.score_dataset,
        data_fingerprint=ds.fingerprint,
        report_selection=False,
    )


def _timed_train(trainer: ACSTrainer, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_jpeg(args, device: torch.device) -> dict:
    """Per-stage throughput on JPEGs, the speed-up of cached scoring rounds, and ACS/full wall clock
    (f = 0.1, R = 5, 10 epochs: two rounds) against the cost model with decoding included."""
    n = args.jpeg_samples
    root = Path(args.jpeg_dir or tempfile.mkdtemp(prefix="acs_jpeg_"))
    t = time.perf_counter()
    data_dir = build_jpeg_dataset(root, n)
    build_seconds = time.perf_counter() - t
    raw = load_image_datasets(str(data_dir), cache_dir=str(root / "hf_cache"))
    torch.manual_seed(0)
    fp = timm.create_model(args.jpeg_model, num_classes=NUM_CLASSES)
    ds = prepare_datasets(raw, fp, image_size=args.image_size)
    fp = fp.to(device)
    if args.channels_last:
        fp = fp.to(memory_format=torch.channels_last)
    probe = min(n, 128)
    with tempfile.TemporaryDirectory() as pixels:
        cache = ScoreViewCache(ds.score_dataset, pixels)
        _rate(cache, probe)  # fills the cache
        cached_rate = _rate(cache, probe)
        cache.close()
    results = {
        "decode_images_per_s_per_worker": _rate(ds.score_dataset, probe),
        "cached_view_images_per_s_per_worker": cached_rate,
        "decode_train_images_per_s_per_worker": _rate(ds.train_dataset, probe),
        "jpeg_kb_mean": float(np.mean([len(r["bytes"]) for r in ds.score_dataset.dataset[:probe]["image"]]) / 1024),
    }
    epochs, interval = 10, 5
    with tempfile.TemporaryDirectory() as work:
        full = _trainer("full", fp, ds, args, f"{work}/full", 2, interval)
        t_full_epoch = _timed_train(full, device) / 2
        runs = {}
        for name, cache in (("plain", None), ("cached", f"{work}/pixels")):
            acs = _trainer("acs", fp, ds, args, f"{work}/{name}", epochs, interval, score_cache_dir=cache)
            runs[name] = (_timed_train(acs, device), [r["scoring_seconds"] for r in acs.history], acs.history)
    t_acs, rounds, history = runs["cached"]
    c_train = t_full_epoch / n
    c_first, c_later = rounds[0] / n, statistics.mean(rounds[1:]) / n
    c_later_plain = statistics.mean(runs["plain"][1][1:]) / n
    rounds_per_run = epochs / interval
    ideal = (0.1 * c_train * epochs + c_first + (rounds_per_run - 1) * c_later) / (c_train * epochs)
    results.update(
        train_images_per_s=1 / c_train,
        score_images_per_s_first=1 / c_first,
        score_images_per_s_later=1 / c_later,
        score_images_per_s_later_uncached=1 / c_later_plain,
        score_round_speedup_after_first=c_first / c_later,
        score_round_speedup_after_first_uncached=c_first / c_later_plain,
        score_data_share_first=history[0].get("data_seconds", 0.0) / rounds[0],
        acs_over_full_wallclock=t_acs / (epochs * t_full_epoch),
        acs_over_full_wallclock_uncached=runs["plain"][0] / (epochs * t_full_epoch),
        ideal_acs_over_full=ideal,
        jpeg_samples=n,
        jpeg_build_seconds=build_seconds,
        dominant_term="training" if 0.1 * c_train * epochs > c_first + c_later else "scoring",
    )
    return results
