#!/usr/bin/env python
"""Speed and size benchmark of acs_hf: prints a table and writes JSON.

Every time ratio comes from alternating A/B pairs (median of the per-pair ratios), so a noisy,
shared machine slows both sides of a pair alike instead of biasing one of them.

    python recipes/benchmark_speed.py --quick --output_json speed.json
    python recipes/benchmark_speed.py --device cuda --image_size 224 --batch_size 256 --bf16 --channels_last

Keys (targets in brackets):
    qat_over_fp_step        W4A4 ResNet-18 train step over the FP one, fused LSQ kernels [<= 1.25]
    qat_over_fp_step_eager  the same with the plain (unfused) PyTorch kernels
    checkpoint_compression  fp32 state-dict bytes over packed 4-bit checkpoint bytes [>= 7]
    checkpoint_compression_2bit                   ... over packed 2-bit bytes [>= 12]
    select_seconds_1m       select_coreset on 1.28M scores, 1000 classes
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from acs_hf import QuantConfig, calibrate_quantizers, quantize_model, save_quantized, select_coreset


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def ab_pairs(fn_a: Callable[[], None], fn_b: Callable[[], None], pairs: int, device: torch.device) -> dict:
    """Median of per-pair time(b)/time(a), plus each side's median seconds."""
    ta, tb = [], []
    for _ in range(pairs):
        ta.append(timed(fn_a, device))
        tb.append(timed(fn_b, device))
    return {
        "ratio": statistics.median(b / a for a, b in zip(ta, tb)),
        "a_seconds": statistics.median(ta),
        "b_seconds": statistics.median(tb),
    }


def make_train_step(model, x, y, bf16: bool):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def bench_qat_step(args, device: torch.device) -> dict:
    """Train-step time of a W4A4 ResNet-18 (eager and fused LSQ kernels) against the FP model."""
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    fp = timm.create_model("resnet18", num_classes=1000).to(device).to(memory_format=fmt).train()
    results = {}
    for compiled in (False, True):
        qat = quantize_model(copy.deepcopy(fp), QuantConfig(4, 4, 8, compile_kernels=compiled))
        calibrate_quantizers(qat, [x[:32]])
        qat.train()
        fp_step, qat_step = make_train_step(fp, x, y, args.bf16), make_train_step(qat, x, y, args.bf16)
        for _ in range(args.warmup):  # includes the torch.compile of the fused kernels
            fp_step()
            qat_step()
        r = ab_pairs(fp_step, qat_step, args.pairs, device)
        if compiled:
            results["qat_over_fp_step"] = r["ratio"]
            results["fp_train_images_per_s"] = args.batch_size / r["a_seconds"]
            results["qat_train_images_per_s"] = args.batch_size / r["b_seconds"]
        else:
            results["qat_over_fp_step_eager"] = r["ratio"]
    return results


def bench_select() -> dict:
    """select_coreset on ImageNet-1k-sized scores: 1,281,167 samples, 1000 classes, f = 0.1."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(1_281_167, generator=g)
    labels = torch.randint(0, 1000, (1_281_167,), generator=g)
    select_coreset(scores, labels, 0.1)  # warm-up
    times = [timed(lambda: select_coreset(scores, labels, 0.1), torch.device("cpu")) for _ in range(3)]
    return {"select_seconds_1m": statistics.median(times)}


def bench_checkpoint() -> dict:
    """fp32 state-dict bytes over the packed checkpoint bytes, ResNet-18 with 1000 classes."""
    results = {}
    for bits, key in ((4, "checkpoint_compression"), (2, "checkpoint_compression_2bit")):
        model = timm.create_model("resnet18", num_classes=1000)
        fp32_bytes = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
        quantize_model(model, QuantConfig(weight_bits=bits, act_bits=bits, first_last_bits=8))
        calibrate_quantizers(model, [torch.randn(2, 3, 32, 32)])
        with tempfile.TemporaryDirectory() as d:
            save_quantized(model, d)
            packed_bytes = os.path.getsize(Path(d) / "model.safetensors")
        results[key] = fp32_bytes / packed_bytes
        results[f"checkpoint_mb_{bits}bit"] = packed_bytes / 2**20
        results["checkpoint_mb_fp32"] = fp32_bytes / 2**20
    return results


TARGETS = {
    "qat_over_fp_step": ("<=", 1.25),
    "checkpoint_compression": (">=", 7.0),
    "checkpoint_compression_2bit": (">=", 12.0),
}


def print_table(results: dict) -> None:
    print(f"\n{'metric':34s} {'value':>12s}  target")
    print("-" * 60)
    for key, value in results.items():
        if not isinstance(value, float):
            continue
        target = ""
        if key in TARGETS:
            op, bound = TARGETS[key]
            ok = value <= bound if op == "<=" else value >= bound
            target = f"{op} {bound:g}  {'met' if ok else 'MISSED'}"
        print(f"{key:34s} {value:12.3f}  {target}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timing pairs (under a minute on 2 cores)")
    parser.add_argument("--output_json", type=Path, default=Path("benchmark_speed.json"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in the train steps")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--pairs", type=int, default=None, help="A/B timing pairs (default 5 quick, 15 full)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.pairs = args.pairs or (5 if args.quick else 15)
    args.warmup = 2
    device = torch.device(args.device)

    started = time.perf_counter()
    results: dict = {}
    results.update(bench_qat_step(args, device))
    results.update(bench_checkpoint())
    results.update(bench_select())
    results["meta"] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "pairs": args.pairs,
        "seconds": time.perf_counter() - started,
    }
    print_table(results)
    args.output_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output_json.with_suffix(args.output_json.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, args.output_json)
    print(f"\nwrote {args.output_json}")
    return results


if __name__ == "__main__":
    main()
