#!/usr/bin/env python
"""Speed and size benchmark of acs_hf: prints a table and writes JSON.

Every time ratio comes from alternating A/B pairs (median of the per-pair ratios), so a noisy,
shared machine slows both sides of a pair alike instead of biasing one of them.

    python recipes/benchmark_speed.py --quick --output_json speed.json
    python recipes/benchmark_speed.py --device cuda --image_size 224 --batch_size 256 --bf16 --channels_last

Keys (targets in brackets):
    qat_over_fp_step        W4A4 ResNet-18 train step over the FP one, fused LSQ kernels [<= 1.25]
    qat_over_fp_step_eager  the same with the plain (unfused) PyTorch kernels
    qat_over_fp_step_compiled_model  torch.compile over the whole quantized model (LSQ op traced)
                            over torch.compile over the FP model [GPU: <= 1.4, stretch 1.25]
    checkpoint_compression  fp32 state-dict bytes over packed 4-bit checkpoint bytes [>= 7]
    checkpoint_compression_2bit                   ... over packed 2-bit bytes [>= 12]
    select_seconds_1m       select_coreset on 1.28M scores, 1000 classes
    scoring_over_inference  scoring-pass throughput over plain student inference [>= 0.85]
    acs_over_full_wallclock ACSTrainer run (f=0.1, R=10, teacher + cache) over full-data QAT, same
                            epochs, model and data [<= 0.15, within 10% of ideal_acs_over_full]
    ideal_acs_over_full     cost model (f * c_train + c_score / R) / c_train, c_* measured per sample

The wall-clock runs use synthetic class-dependent images held in memory (so data loading does not
dominate), R = 10 epochs and f = 0.1 as in the paper; --quick trains on fewer samples
(--wallclock_samples) for the same 10 epochs, i.e. one selection round.

--data jpeg replaces the in-memory runs by the real data path (recipes/jpeg_speed.py): 500x375
JPEGs in a datasets Image column, timm transforms in --num_workers DataLoader workers, keys
decode_images_per_s_per_worker, train_images_per_s, score_images_per_s_first/_later,
score_round_speedup_after_first (decoded score-view cache; target >= 2 on CPU) and
acs_over_full_wallclock against ideal_acs_over_full with decoding in the cost model.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import transformers

from acs_hf import (
    ACSArguments,
    ACSTrainer,
    QuantConfig,
    atomic_write_json,
    calibrate_quantizers,
    create_selector,
    quantize_model,
    save_quantized,
    select_coreset,
)
from acs_hf.quantization import WEIGHTS_NAME
from acs_hf.training.scoring_pass import scoring_pass
from acs_hf.training.teacher_cache import TeacherCache

sys.path.insert(0, str(Path(__file__).parent))
from jpeg_speed import bench_jpeg, run_args  # noqa: E402


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
    if "compiled_model" not in args.skip:
        # The whole graph compiled: each activation's fake quant can fuse with the BN and ReLU before it.
        qat = quantize_model(copy.deepcopy(fp), QuantConfig(4, 4, 8))
        calibrate_quantizers(qat, [x[:32]])
        fp_c, qat_c = torch.compile(copy.deepcopy(fp)), torch.compile(qat.train())
        fp_step, qat_step = make_train_step(fp_c, x, y, args.bf16), make_train_step(qat_c, x, y, args.bf16)
        for _ in range(args.warmup):  # the compilation itself
            fp_step()
            qat_step()
        r = ab_pairs(fp_step, qat_step, args.pairs, device)
        results["qat_over_fp_step_compiled_model"] = r["ratio"]
        results["fp_compiled_train_images_per_s"] = args.batch_size / r["a_seconds"]
        results["qat_compiled_model_train_images_per_s"] = args.batch_size / r["b_seconds"]
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
            packed_bytes = os.path.getsize(Path(d) / WEIGHTS_NAME)
        results[key] = fp32_bytes / packed_bytes
        results[f"checkpoint_mb_{bits}bit"] = packed_bytes / 2**20
        results["checkpoint_mb_fp32"] = fp32_bytes / 2**20
    return results


class SyntheticImages(torch.utils.data.Dataset):
    """Class-dependent random images in memory (plain torch: the GPU machine has no `datasets`)."""

    def __init__(self, n: int, image_size: int, num_classes: int = 10) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % num_classes
        self.x = torch.randn(n, 3, image_size, image_size, generator=g)
        self.x[:, 0] += (self.labels / num_classes)[:, None, None]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.labels[i], "index": i}


def _trainer(method: str, fp, ds, args, out: str, epochs: int) -> ACSTrainer:
    student = quantize_model(copy.deepcopy(fp), QuantConfig(4, 4, 8, compile_kernels=args.compile_in_runs))
    targs = run_args(args, out, epochs)
    acs = ACSArguments(
        selection_method=method,
        fraction=1.0 if create_selector(method).selects_all else 0.1,
        selection_interval=10,
        teacher_cache_dir="memory",
    )
    return ACSTrainer(
        model=student, args=targs, train_dataset=ds, acs_args=acs, teacher_model=copy.deepcopy(fp), score_dataset=ds
    )


def bench_wallclock(args, device: torch.device) -> dict:
    """Whole ACSTrainer runs: ACS (f=0.1, R=10, teacher cache) against full-data QAT, same epochs."""
    transformers.logging.set_verbosity_error()
    n, epochs = args.wallclock_samples, 10
    ds = SyntheticImages(n, args.image_size)
    torch.manual_seed(0)
    fp = timm.create_model("resnet18", num_classes=10)
    ratios, c_train, c_score = [], [], []
    with tempfile.TemporaryDirectory() as d:
        for pair in range(args.wallclock_pairs):
            full = _trainer("full", fp, ds, args, f"{d}/full{pair}", epochs)
            t_full = timed(full.train, device)
            acs = _trainer("acs", fp, ds, args, f"{d}/acs{pair}", epochs)
            t_acs = timed(acs.train, device)
            ratios.append(t_acs / t_full)
            c_train.append(t_full / (epochs * n))
            rounds = [r["scoring_seconds"] for r in acs.history]
            c_score.append(sum(rounds) / len(rounds) / n)
    ct, cs = statistics.median(c_train), statistics.median(c_score)
    return {
        "acs_over_full_wallclock": statistics.median(ratios),
        "ideal_acs_over_full": (0.1 * ct + cs / 10) / ct,
        "train_us_per_sample": ct * 1e6,
        "score_us_per_sample": cs * 1e6,
        "wallclock_samples": n,
        "wallclock_epochs": epochs,
    }


def bench_scoring(args, device: torch.device) -> dict:
    """Scoring-pass throughput (EVS + DS from the teacher cache, gathered) over plain inference."""
    from accelerate import Accelerator

    ds = SyntheticImages(args.wallclock_samples, args.image_size)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if args.bf16 else "no")
    loader = accelerator.prepare(
        torch.utils.data.DataLoader(
            ds, batch_size=args.wallclock_batch_size * 2, num_workers=args.num_workers, pin_memory=args.device == "cuda"
        )
    )
    torch.manual_seed(0)
    fp = timm.create_model("resnet18", num_classes=10).to(device)
    student = quantize_model(copy.deepcopy(fp), QuantConfig(4, 4, 8, compile_kernels=args.compile_in_runs))
    calibrate_quantizers(student, [ds.x[:32].to(device)])
    student.eval()
    cache = TeacherCache(len(ds))
    scoring_pass(student, loader, accelerator, ["evs", "ds"], len(ds), teacher=fp, teacher_cache=cache)

    def plain() -> None:
        with torch.inference_mode(), accelerator.autocast():
            for batch in loader:
                student(batch["pixel_values"])

    def scoring() -> None:
        scoring_pass(student, loader, accelerator, ["evs", "ds"], len(ds), teacher_cache=cache)

    plain()
    r = ab_pairs(plain, scoring, args.pairs, device)
    return {
        "scoring_over_inference": 1 / r["ratio"],  # throughput ratio = inverse time ratio
        "inference_images_per_s": len(ds) / r["a_seconds"],
        "scoring_images_per_s": len(ds) / r["b_seconds"],
    }


TARGETS = {
    "qat_over_fp_step": ("<=", 1.25),
    "qat_over_fp_step_compiled_model": ("<=", 1.4),
    "score_round_speedup_after_first": (">=", 2.0),
    "checkpoint_compression": (">=", 7.0),
    "checkpoint_compression_2bit": (">=", 12.0),
    "scoring_over_inference": (">=", 0.85),
    "acs_over_full_wallclock": ("<=", 0.15),
}


def print_table(results: dict, data: str = "synthetic") -> None:
    print(f"\n{'metric':34s} {'value':>12s}  target")
    print("-" * 60)
    for key, value in results.items():
        if not isinstance(value, float):
            continue
        target = ""
        if key in TARGETS and not (data == "jpeg" and key == "acs_over_full_wallclock"):  # R=5 there: no target
            op, bound = TARGETS[key]
            ok = value <= bound if op == "<=" else value >= bound
            target = f"{op} {bound:g}  {'met' if ok else 'MISSED'}"
        print(f"{key:34s} {value:12.3f}  {target}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the defaults that depend on ``--quick`` and ``--device`` filled in."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timing pairs (under a minute on 2 cores)")
    parser.add_argument("--output_json", type=Path, default=Path("benchmark_speed.json"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in the train steps")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--pairs", type=int, default=None, help="A/B timing pairs (default 5 quick, 15 full)")
    parser.add_argument("--wallclock_samples", type=int, default=None, help="training set of the wall-clock runs")
    parser.add_argument("--wallclock_batch_size", type=int, default=32)
    parser.add_argument("--wallclock_pairs", type=int, default=None, help="ACS/full run pairs (default 2 quick, 3)")
    parser.add_argument("--num_workers", type=int, default=0, help="data workers of the wall-clock/scoring runs")
    parser.add_argument("--compile_in_runs", action="store_true", help="fused LSQ kernels in the wall-clock runs")
    parser.add_argument("--data", choices=["synthetic", "jpeg"], default="synthetic", help="see the module docstring")
    parser.add_argument("--jpeg_dir", default=None, help="--data jpeg: JPEG set cache (default: temp)")
    parser.add_argument("--jpeg_samples", type=int, default=None, help="--data jpeg: training images (256 quick, 1024)")
    parser.add_argument("--jpeg_model", default=None, help="--data jpeg: timm model (default resnet18 on cuda)")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["step", "compiled_model", "checkpoint", "select", "scoring", "wallclock", "jpeg"],
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.pairs = args.pairs or (5 if args.quick else 15)
    args.wallclock_samples = args.wallclock_samples or (320 if args.quick else 2000)
    args.wallclock_pairs = args.wallclock_pairs or (2 if args.quick else 3)
    args.warmup = 2
    args.jpeg_samples = args.jpeg_samples or (256 if args.quick else 1024)
    args.jpeg_model = args.jpeg_model or ("resnet18" if args.device == "cuda" else "mobilenetv3_small_050")
    if args.data == "jpeg":  # the real data path replaces the in-memory runs
        args.skip += ["scoring", "wallclock"]
    else:
        args.skip += ["jpeg"]
    return args


def run_benches(args: argparse.Namespace, device: torch.device) -> tuple[dict, dict[str, str]]:
    """Every measurement not in ``--skip``; a failing one is recorded in the errors, the others still run."""
    results: dict = {}
    benches = {
        "step": lambda: bench_qat_step(args, device),
        "checkpoint": bench_checkpoint,
        "select": bench_select,
        "scoring": lambda: bench_scoring(args, device),
        "wallclock": lambda: bench_wallclock(args, device),
        "jpeg": lambda: bench_jpeg(args, device),
    }
    errors = {}
    for name, bench in benches.items():
        if name not in args.skip:
            t = time.perf_counter()
            try:
                results.update(bench())
            except Exception as e:  # one broken measurement must not lose the others
                errors[name] = f"{type(e).__name__}: {e}"
                print(f"[{name} FAILED: {errors[name]}]", flush=True)
            print(f"[{name}: {time.perf_counter() - t:.1f}s]", flush=True)
    return results, errors


def run_meta(args: argparse.Namespace, device: torch.device, seconds: float) -> dict:
    """What the numbers were measured on and with."""
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "pairs": args.pairs,
        "wallclock_samples": args.wallclock_samples,
        "wallclock_batch_size": args.wallclock_batch_size,
        "num_workers": args.num_workers,
        "data": args.data,
        "jpeg_model": args.jpeg_model if args.data == "jpeg" else None,
        "software": {m.__name__: m.__version__ for m in (torch, transformers, timm)},
        "command": " ".join(sys.argv),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    started = time.perf_counter()
    results, errors = run_benches(args, device)
    if errors:
        results["errors"] = errors
    results["meta"] = run_meta(args, device, time.perf_counter() - started)
    print_table(results, args.data)
    args.output_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output_json, results)  # never a half-written JSON
    print(f"\nwrote {args.output_json}")
    if errors:
        raise SystemExit(f"benchmarks failed: {', '.join(errors)}")
    return results


if __name__ == "__main__":
    main()
