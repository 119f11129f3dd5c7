#!/usr/bin/env python
"""Deployment benchmark: acs_hf's ONNX export (QDQ) in ONNX Runtime on the CPU; prints a table, writes JSON.

For one model (default ResNet-18 at 224x224) it exports the FP32 model and its LSQ-quantized
versions with :func:`acs_hf.export_onnx`, then measures for each ONNX file:

    file_bytes / size_over_fp32     the .onnx file size [W4A4 target: <= 1/6 of FP32]
    latency_ms[b]                   median ONNX Runtime latency at batch b (default 1 and 32)
    images_per_s[b]                 b / that latency [W8A8 target: faster than FP32]
    agreement                       ONNX Runtime logits against the PyTorch model they come from
                                    (max |diff|, share of images within 1e-4 of the logit scale,
                                    top-1 agreement) on real images
    accuracy / torch_accuracy       top-1 accuracy of the ONNX file (:func:`acs_hf.onnx_accuracy`) and of
                                    the PyTorch model on the same validation images

Rows: ``fp32``; ``w8a8`` and ``w4a4`` (the paper's placement, faithful QDQ export; W4A4 stores INT4
weights, first and last layer at 8 bits); ``w8a8_bnfold`` (``fold_batchnorm=True``: BatchNorm folded
into per-channel weight scales and an int32 bias, so that ONNX Runtime can fuse DequantizeLinear ->
Conv -> QuantizeLinear into integer QLinearConv); ``w8a8_int``, ``w4a4_int``, ``w2a2_int``: the
integer-graph placement (``QuantConfig(integer_graph=True)``: residual additions and the stem output
quantized too), exported for integer kernels; ``w8a8_int_avx2_option``: the same W8A8 file run
with ``session.x64quantprecision`` forced on (what the exactness option for CPUs without VNNI costs;
:func:`acs_hf.onnx_session` sets it only on such CPUs). Every row runs in
:func:`acs_hf.onnx_session`. Also per row: ``speedup_over_fp32`` per batch size and the kernels ONNX
Runtime runs (:func:`acs_hf.integer_kernel_counts`; ``integer_conv_fraction``). The sessions are timed
in round-robin order, so load on a shared machine slows every row alike.

``--families`` adds, each against its own FP32 export timed in turn with it, the integer graph at
W8A8 on other families (``<family>_w8a8_int``): torchvision's ResNet-18 (a ReLU module called three
times a block), SE-ResNet-18 and MobileNetV3 (squeeze-excitation products), CIFAR ResNet-20 (option-A
shortcuts, 32x32) and ViT-S/16 (additions, Linear layers and attention matmuls), with a ``targets``
entry per family.

The model is randomly initialised (timm init, then BatchNorm gains, biases and running statistics
randomised so that no block is an identity, as timm's zero-initialised last BN gains would make
it) and calibrated on scikit-learn's digits through the model's eval preprocessing; the
agreement is measured on other digits images. Latency does not depend on the weights' values;
the accuracy of a random model is chance. For accuracy on real images, name a data set as
``recipes/benchmark_accuracy.py`` does (``--dataset_name``, or ``--train_dir`` and ``--validation_dir``)
and the float weights of a model trained on it (``--pretrained_weights``, read by
:func:`acs_hf.load_weights`): the model then has the data set's classes, is calibrated on its
training split and evaluated on ``--eval_images`` images of its validation split (the default
digits keep timm's 1000 classes, as ImageNet's head).

    python recipes/benchmark_deploy.py --output deploy.json
    python recipes/benchmark_deploy.py --quick --output /tmp/deploy.json   # tiny model, seconds
    python recipes/benchmark_deploy.py --model cifar_resnet20 --image_size 32 --dataset_name path/to/cifar10 \
        --pretrained_weights resnet20.safetensors --eval_images 10000 --variants fp32 w4a4_int
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch

from acs_hf import (
    QuantConfig,
    atomic_write_json,
    calibrate_quantizers,
    export_onnx,
    integer_kernel_counts,
    load_weights,
    onnx_accuracy,
    onnx_session,
    quantize_model,
)
from acs_hf.data import load_image_datasets, prepare_datasets
from acs_hf.quantization import cpu_has_vnni, needs_exact_int8_option

#: Images per ONNX Runtime and PyTorch call in the accuracy and agreement measurements.
EVAL_BATCH = 64

#: name -> (QuantConfig or None for FP32, export_onnx keywords, onnx_session keywords)
VARIANTS = {
    "fp32": (None, {}, {}),
    "w8a8": (QuantConfig(weight_bits=8, act_bits=8, first_last_bits=8), {}, {}),
    "w8a8_bnfold": (QuantConfig(weight_bits=8, act_bits=8, first_last_bits=8), {"fold_batchnorm": True}, {}),
    "w4a4": (QuantConfig(weight_bits=4, act_bits=4, first_last_bits=8), {}, {}),
    "w8a8_int": (QuantConfig(weight_bits=8, act_bits=8, first_last_bits=8, integer_graph=True), {}, {}),
    "w8a8_int_avx2_option": (
        QuantConfig(weight_bits=8, act_bits=8, first_last_bits=8, integer_graph=True),
        {},
        {"exact_on_avx2": True},
    ),
    "w4a4_int": (QuantConfig(weight_bits=4, act_bits=4, first_last_bits=8, integer_graph=True), {}, {}),
    "w2a2_int": (QuantConfig(weight_bits=2, act_bits=2, first_last_bits=8, integer_graph=True), {}, {}),
}


#: family row -> (model name, image size, minimum speed over FP32 at both batch sizes: the issue's targets)
FAMILIES = {
    "resnet18": ("resnet18", 224, 2.0),  # timm's: the module-output placement's model, the same-run baseline
    "torchvision_resnet18": ("torchvision.resnet18", 224, 2.0),
    "seresnet18": ("seresnet18", 224, 2.0),
    "mobilenetv3_large_100": ("mobilenetv3_large_100", 224, 1.5),
    "cifar_resnet20": ("cifar_resnet20", 32, 2.0),
    "vit_small_patch16_224": ("vit_small_patch16_224", 224, 1.5),
}


def build_model(name: str, seed: int, num_classes: int = 1000) -> torch.nn.Module:
    """A randomly initialised timm (or ``torchvision.<name>``) model whose BatchNorms are not identities
    (module docstring)."""
    torch.manual_seed(seed)
    if name.startswith("torchvision."):
        import torchvision

        model = getattr(torchvision.models, name.split(".", 1)[1])(num_classes=num_classes).eval()
    else:
        model = timm.create_model(name, num_classes=num_classes).eval()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def load_data(args: argparse.Namespace):
    """The data set's splits through ``args.model``'s eval preprocessing (digits by default), cut to
    ``--calib_images`` training and ``--eval_images`` validation images."""
    raw = load_image_datasets(args.dataset_name, args.dataset_config_name, args.train_dir, args.validation_dir)
    probe = timm.create_model(args.model, num_classes=2)  # for its preprocessing alone
    return prepare_datasets(raw, probe, image_size=args.image_size, max_train_samples=args.calib_images,
                            max_eval_samples=args.eval_images, seed=args.seed)  # fmt: skip


def stacked(view, key: str) -> torch.Tensor:
    """One key of every row of a data view, as one tensor."""
    return torch.stack([torch.as_tensor(view[i][key]) for i in range(len(view))])


def torch_logits_of(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The PyTorch model's logits of ``x``, in batches of :data:`EVAL_BATCH`."""
    with torch.no_grad():
        return np.concatenate([model(b).numpy() for b in x.split(EVAL_BATCH)])


def ort_logits_of(session, x: torch.Tensor) -> np.ndarray:
    """An ONNX Runtime session's logits of ``x``, in batches of :data:`EVAL_BATCH`."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: b.numpy()})[0] for b in x.split(EVAL_BATCH)])


def agreement(ort_logits: np.ndarray, torch_logits: np.ndarray) -> dict:
    """How closely ONNX Runtime reproduces the PyTorch logits."""
    diff = np.abs(ort_logits - torch_logits).max(axis=1)
    scale = float(np.abs(torch_logits).max())
    return {
        "max_abs_diff": float(diff.max()),
        "logit_scale": scale,
        "within_1e-4_of_scale": float((diff <= 1e-4 * scale).mean()),
        "top1_agreement": float((ort_logits.argmax(1) == torch_logits.argmax(1)).mean()),
    }


def export_variants(args, fp: torch.nn.Module, calib: torch.Tensor, evals: torch.Tensor, out_dir: Path) -> dict:
    """Export every variant; returns name -> {path, file_bytes, torch_logits, export_seconds}."""
    rows = {}
    for name in args.variants:
        config, kwargs, _ = VARIANTS[name]
        rows[name] = export_row(args, fp, config, calib, evals, out_dir / f"{name}.onnx", **kwargs)
    return rows


def export_row(
    args, fp: torch.nn.Module, config, calib: torch.Tensor, evals: torch.Tensor, path: Path, **kwargs
) -> dict:
    """A copy of ``fp`` quantized with ``config`` (``None``: FP32) and calibrated, exported to ``path``."""
    model = copy.deepcopy(fp)
    if config is not None:
        quantize_model(model, config)
        calibrate_quantizers(model, calib.split(args.calib_batch))
    start = time.perf_counter()
    path = export_onnx(model.eval(), path, calib[:2], **kwargs)
    logits = torch_logits_of(model, evals)
    return {
        "path": path,
        "file_bytes": path.stat().st_size,
        "torch_logits": logits,
        "export_seconds": time.perf_counter() - start,
    }


def time_sessions(sessions: dict, inputs: dict[int, np.ndarray], warmup: int, iterations: int) -> dict:
    """Median latency (ms) per (name, batch), the sessions run in round-robin order."""
    times = {(name, b): [] for name in sessions for b in inputs}
    for b, x in inputs.items():
        for _ in range(warmup):
            for s in sessions.values():
                s.run(None, {s.get_inputs()[0].name: x})
        for _ in range(iterations):
            for name, s in sessions.items():
                start = time.perf_counter()
                s.run(None, {s.get_inputs()[0].name: x})
                times[(name, b)].append(time.perf_counter() - start)
    return {key: 1e3 * statistics.median(ts) for key, ts in times.items()}


def measure(args, rows: dict, evals: torch.Tensor, labels: torch.Tensor) -> dict:
    """Agreement, accuracy, file sizes and timings of every exported row (JSON-ready)."""
    sessions = {name: onnx_session(r["path"], args.threads, **VARIANTS[name][2]) for name, r in rows.items()}
    g = np.random.default_rng(0)
    inputs = {b: g.standard_normal((b, *evals.shape[1:]), dtype=np.float32) for b in args.batch_sizes}
    latency = time_sessions(sessions, inputs, args.warmup, args.iterations)
    fp_bytes = rows["fp32"]["file_bytes"] if "fp32" in rows else None
    results = {}
    for name, r in rows.items():
        s = sessions[name]
        logits = ort_logits_of(s, evals)
        accuracy = onnx_accuracy(s, zip(evals.split(EVAL_BATCH), labels.split(EVAL_BATCH)), r["torch_logits"])
        kernels = integer_kernel_counts(r["path"])
        convs = kernels["conv"]["integer"] + kernels["conv"]["float"]
        results[name] = {
            "file_bytes": r["file_bytes"],
            "size_over_fp32": r["file_bytes"] / fp_bytes if fp_bytes else None,
            "export_seconds": r["export_seconds"],
            "latency_ms": {str(b): latency[(name, b)] for b in args.batch_sizes},
            "images_per_s": {str(b): 1e3 * b / latency[(name, b)] for b in args.batch_sizes},
            "speedup_over_fp32": {
                str(b): latency[("fp32", b)] / latency[(name, b)] if "fp32" in rows else None for b in args.batch_sizes
            },
            "kernels": kernels,
            "integer_conv_fraction": kernels["conv"]["integer"] / convs if convs else None,
            "agreement": agreement(logits, r["torch_logits"]),
            "accuracy": accuracy["accuracy"],
            "torch_accuracy": accuracy["reference_accuracy"],
        }
    return results


def targets(results: dict) -> dict:
    """The targets of the deployment issues, judged on these measurements."""
    out = {}
    if "fp32" in results and "w4a4" in results:
        out["w4a4_file_at_most_one_sixth_of_fp32"] = results["w4a4"]["size_over_fp32"] <= 1 / 6
    if "fp32" in results and "w4a4_int" in results:
        r = results["w4a4_int"]
        out["w4a4_int_at_least_1.6x_fp32"] = {b: x >= 1.6 for b, x in r["speedup_over_fp32"].items()}
        out["w4a4_int_file_at_most_one_sixth_of_fp32"] = r["size_over_fp32"] <= 1 / 6
        out["w4a4_int_every_conv_integer"] = r["integer_conv_fraction"] == 1.0
        out["w4a4_int_top1_agreement_100"] = r["agreement"]["top1_agreement"] == 1.0
    if "fp32" in results and "w8a8_int" in results:
        r = results["w8a8_int"]
        out["w8a8_int_at_least_1.6x_fp32"] = {b: x >= 1.6 for b, x in r["speedup_over_fp32"].items()}
        out["w8a8_int_top1_agreement_100"] = r["agreement"]["top1_agreement"] == 1.0
    return out


def family_results(args, num_classes: int) -> tuple[dict, dict]:
    """``<family>_w8a8_int`` rows (random weights), each timed in turn with its own FP32 export, and their
    targets; images through ResNet-18's eval preprocessing at the family's size."""
    config = QuantConfig(weight_bits=8, act_bits=8, first_last_bits=8, integer_graph=True)
    results, met = {}, {}
    for family in args.families:
        name, size, minimum = FAMILIES[family]
        fp = build_model(name, args.seed, num_classes)
        ds = load_data(argparse.Namespace(**{**vars(args), "model": "resnet18", "image_size": size}))
        calib, evals = stacked(ds.score_dataset, "pixel_values"), stacked(ds.eval_dataset, "pixel_values")
        with tempfile.TemporaryDirectory() as tmp:
            rows = {"fp32": export_row(args, fp, None, calib, evals, Path(tmp) / "fp32.onnx")}
            rows["int"] = export_row(args, fp, config, calib, evals, Path(tmp) / "int.onnx")
            g = np.random.default_rng(0)
            inputs = {b: g.standard_normal((b, 3, size, size), dtype=np.float32) for b in args.batch_sizes}
            speedups = {str(b): [] for b in args.batch_sizes}
            for _ in range(args.repeats):  # fresh sessions each time: one measurement can be off on a loaded machine
                sessions = {k: onnx_session(r["path"], args.threads) for k, r in rows.items()}
                latency = time_sessions(sessions, inputs, args.warmup, args.family_iterations)
                for b in args.batch_sizes:
                    speedups[str(b)].append(latency[("fp32", b)] / latency[("int", b)])
            logits = ort_logits_of(sessions["int"], evals)
            openvino = openvino_row(args, rows, inputs, evals) if family in args.openvino else None
            r = {
                "model": name,
                "image_size": size,
                "integer_kernels": integer_kernel_counts(rows["int"]["path"]),
                "speedup_over_fp32": {b: statistics.median(x) for b, x in speedups.items()},
                "speedup_range": {b: [min(x), max(x)] for b, x in speedups.items()},
                "repeats": args.repeats,
                "latency_ms": {str(b): latency[("int", b)] for b in args.batch_sizes},
                "size_over_fp32": rows["int"]["file_bytes"] / rows["fp32"]["file_bytes"],
                "agreement": agreement(logits, rows["int"]["torch_logits"]),
                **({"openvino": openvino} if openvino else {}),
            }
        results[f"{family}_w8a8_int"] = r
        met[f"{family}_w8a8_int_at_least_{minimum}x_fp32"] = {
            b: x >= minimum for b, x in r["speedup_over_fp32"].items()
        }
        met[f"{family}_w8a8_int_top1_agreement_at_least_99"] = r["agreement"]["top1_agreement"] >= 0.99
        print(f"{family}: {r}", flush=True)
    return results, met


def openvino_row(args, rows: dict, inputs: dict[int, np.ndarray], evals: torch.Tensor) -> dict:
    """The same FP32 and W8A8 ONNX files compiled by OpenVINO (CPU, ``--threads`` threads, latency hint; it
    reads QDQ models and runs them in int8): speed over its own FP32 run, median and range of ``--repeats``
    timings in turn, and top-1 agreement with the PyTorch model."""
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY"}
    compiled = {k: core.compile_model(str(r["path"]), "CPU", config) for k, r in rows.items()}
    requests = {k: c.create_infer_request() for k, c in compiled.items()}
    speedups: dict[str, list[float]] = {str(b): [] for b in inputs}
    for _ in range(args.repeats):
        times = {(k, b): [] for k in requests for b in inputs}
        for b, x in inputs.items():
            for i in range(args.warmup + args.family_iterations):
                for k, request in requests.items():
                    start = time.perf_counter()
                    request.infer({0: x})
                    if i >= args.warmup:
                        times[(k, b)].append(time.perf_counter() - start)
        for b in inputs:
            fp32, quantized = (statistics.median(times[(k, b)]) for k in ("fp32", "int"))
            speedups[str(b)].append(fp32 / quantized)
    logits = requests["int"].infer({0: evals.numpy()})[0]
    return {
        "version": ov.__version__,
        "speedup_over_fp32": {b: statistics.median(x) for b, x in speedups.items()},
        "speedup_range": {b: [min(x), max(x)] for b, x in speedups.items()},
        "agreement": agreement(np.asarray(logits), rows["int"]["torch_logits"]),
    }


def print_table(report: dict) -> None:
    rows = {n: r for n, r in report["results"].items() if "file_bytes" in r}  # family rows printed as they run
    if not rows:
        print("targets:", report["targets"])
        return
    batches = list(next(iter(rows.values()))["latency_ms"])
    head = ["variant", "MB", "x FP32"] + [f"ms b={b}" for b in batches] + [f"img/s b={b}" for b in batches]
    head += [f"speed b={b}" for b in batches] + ["int convs", "int adds", "top-1 agree", "max|diff|", "top-1"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, r in rows.items():
        ratio = f"{r['size_over_fp32']:.3f}" if r["size_over_fp32"] is not None else "-"
        cells = [name, f"{r['file_bytes'] / 1e6:.2f}", ratio]
        cells += [f"{r['latency_ms'][b]:.2f}" for b in batches] + [f"{r['images_per_s'][b]:.1f}" for b in batches]
        cells += [f"{r['speedup_over_fp32'][b]:.2f}x" if r["speedup_over_fp32"][b] else "-" for b in batches]
        k = r["kernels"]
        cells += [f"{k[j]['integer']}/{k[j]['integer'] + k[j]['float']}" for j in ("conv", "add")]
        cells += [f"{100 * r['agreement']['top1_agreement']:.1f}%", f"{r['agreement']['max_abs_diff']:.3g}"]
        cells += [f"{100 * r['accuracy']:.2f}%"]
        print("| " + " | ".join(cells) + " |")
    print("targets:", report["targets"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", help="timm model name")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--iterations", type=int, default=30, help="timed runs per session and batch size")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (the issue's setting: 2)")
    p.add_argument("--calib_images", type=int, default=32)
    p.add_argument("--calib_batch", type=int, default=16)
    p.add_argument("--eval_images", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset_name", default=None, help="digits (the default, offline), a Hub id or a local folder")
    p.add_argument("--dataset_config_name", default=None)
    p.add_argument("--train_dir", default=None, help="local image folder of the training split (calibration)")
    p.add_argument("--validation_dir", default=None, help="local image folder of the validation split (accuracy)")
    p.add_argument("--pretrained_weights", type=Path, default=None,
                   help="float weights of --model trained on the data set (default: random weights)")  # fmt: skip
    p.add_argument("--output", type=Path, default=None, help="JSON file to write")
    p.add_argument("--keep_models", type=Path, default=None, help="directory to keep the .onnx files in")
    p.add_argument("--families", nargs="*", default=[], choices=list(FAMILIES), help="other families' W8A8 rows")
    p.add_argument("--family_iterations", type=int, default=10, help="timed runs per family session and batch")
    p.add_argument("--openvino", nargs="*", default=[], choices=list(FAMILIES),
                   help="of --families, those also run in OpenVINO (pip install openvino)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="family timings repeated (fresh sessions): median, range")
    p.add_argument("--quick", action="store_true", help="tiny model and runs, for testing the script")
    args = p.parse_args(argv)
    check_args(p, args)
    if args.quick:
        args.model, args.image_size, args.batch_sizes = "test_resnet", 32, [1, 4]
        args.iterations, args.warmup, args.calib_images, args.calib_batch, args.eval_images = 3, 1, 8, 8, 16
        args.family_iterations, args.repeats = 2, 2
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what cannot run, naming the argument, its value and what it accepts."""
    for name in ("calib_images", "eval_images", "calib_batch", "threads", "iterations", "family_iterations", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.train_dir and args.dataset_name:
        p.error(f"give --dataset_name or --train_dir, not both (got --dataset_name {args.dataset_name!r})")
    if bool(args.train_dir) != bool(args.validation_dir):
        p.error(f"--train_dir and --validation_dir go together: got --train_dir {args.train_dir!r} and "
                f"--validation_dir {args.validation_dir!r}")  # fmt: skip
    if set(args.openvino) - set(args.families):
        p.error(f"--openvino {args.openvino} must be among --families {args.families}")
    if args.openvino and importlib.util.find_spec("openvino") is None:
        p.error(f"--openvino {args.openvino} needs OpenVINO: pip install openvino")
    if args.pretrained_weights is not None and not args.pretrained_weights.is_file():
        p.error(f"--pretrained_weights {str(args.pretrained_weights)!r} is not a file (safetensors or torch weights)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ds = load_data(args)
    data = args.dataset_name or args.train_dir or "digits"
    num_classes = len(ds.id2label) if args.dataset_name or args.train_dir else 1000  # digits: ImageNet's head
    results, family_targets = {}, {}
    calib, evals = stacked(ds.score_dataset, "pixel_values"), stacked(ds.eval_dataset, "pixel_values")
    if args.variants:
        fp = build_model(args.model, args.seed, num_classes)
        if args.pretrained_weights is not None:
            load_weights(fp, args.pretrained_weights)
        labels = stacked(ds.eval_dataset, "labels")
        with tempfile.TemporaryDirectory() as tmp:
            out_dir = args.keep_models or Path(tmp)
            rows = export_variants(args, fp, calib, evals, out_dir)
            results = measure(args, rows, evals, labels)
    if args.families:
        family_rows, family_targets = family_results(args, num_classes)
        results.update(family_rows)
    report = {
        "model": args.model,
        "image_size": args.image_size,
        "init": str(args.pretrained_weights or "random (timm init; BatchNorm gains, biases, statistics randomised)"),
        "data": data,
        "calibration": f"{len(calib)} {data} training images, eval preprocessing",
        "agreement_images": f"{len(evals)} {data} {ds.eval_split} images",
        "threads": args.threads,
        "iterations": args.iterations,
        "environment": {
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "vnni": cpu_has_vnni(),
            "exactness_option_by_default": needs_exact_int8_option(),
        },
        "results": results,
        "targets": {**targets(results), **family_targets},
    }
    print_table(report)
    if args.output is not None:
        atomic_write_json(args.output, report)
    return report


if __name__ == "__main__":
    main()
