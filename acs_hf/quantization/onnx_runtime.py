"""Running an exported model in ONNX Runtime: a session with the options that matter, and which kernels it runs.

:func:`onnx_session` opens an ``.onnx`` file with every graph optimisation (the QDQ fusions into
integer kernels happen there), one intra-op thread per physical core, and ONNX Runtime's exact
integer matrix products on x86 CPUs without VNNI. :func:`integer_kernel_counts` says how many of
the graph's convolutions, additions and matrix products ONNX Runtime runs as integer kernels.
Needs the ``onnx`` extra (``pip install acs_hf[onnx]``), imported on first use.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "AVX2_PRECISION_KEY",
    "compare_with_float",
    "cpu_has_vnni",
    "integer_kernel_counts",
    "onnx_accuracy",
    "onnx_session",
    "needs_exact_int8_option",
    "onnx_speedup",
    "physical_cores",
]

#: ONNX Runtime's session config key for exact u8 x s8 products on x86 without VNNI (slower U8U8 kernels):
#: AVX2 adds pairs of u8 x s8 products in int16 and saturates when both operands use most of their range.
AVX2_PRECISION_KEY = "session.x64quantprecision"

#: Integer kernels and their float counterparts, by the job they do (ONNX Runtime's op types after optimisation).
_KERNELS = {
    "conv": ({"QLinearConv", "ConvInteger"}, {"Conv", "FusedConv"}),
    "add": ({"QLinearAdd"}, {"Add"}),
    "mul": ({"QLinearMul"}, {"Mul"}),
    "concat": ({"QLinearConcat"}, {"Concat"}),
    "pool": ({"QLinearAveragePool", "QLinearGlobalAveragePool"}, {"AveragePool", "GlobalAveragePool"}),
    "matmul": ({"QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat"}, {"Gemm", "MatMul", "FusedGemm"}),
}


def physical_cores() -> int:
    """Physical CPU cores (``psutil`` when installed; else the logical count): ONNX Runtime's integer
    kernels gain nothing from a core's second hyper-thread."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:
        cores = None
    return cores or os.cpu_count() or 1


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (``avx512_vnni`` or ``avx_vnni`` in ``/proc/cpuinfo``); ``None`` when
    that cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags


def needs_exact_int8_option() -> bool:
    """True on x86 CPUs without VNNI (or whose flags cannot be read), where ONNX Runtime's u8 x s8 kernels
    can saturate: there :func:`onnx_session` sets :data:`AVX2_PRECISION_KEY` by default."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i386", "i686"):
        return False
    return cpu_has_vnni() is not True


def onnx_session(
    path: str | os.PathLike,
    threads: int | None = None,
    *,
    exact_on_avx2: bool | None = None,
    optimized_model_path: str | os.PathLike | None = None,
    providers: list[str] | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for a model written by :func:`~acs_hf.export_onnx`.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads; default one per physical core (:func:`physical_cores`).
        exact_on_avx2: set ``session.x64quantprecision``: on x86 CPUs without VNNI (AVX2, AVX-512
            without VNNI) ONNX Runtime's u8 x s8 kernels add pairs of products in int16 and saturate
            when both operands use most of the 8-bit range; the option makes ONNX Runtime use exact but
            slower U8U8 kernels (on a CPU with VNNI it costs speed and changes no result: measured in
            BENCHMARKS.md). Default: on exactly where it is needed (:func:`needs_exact_int8_option`).
        optimized_model_path: also write the optimised graph there (to see which kernels run).
        providers: execution providers; default ``["CPUExecutionProvider"]``.
    """
    import onnxruntime as ort

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"onnx_session: threads must be a positive integer or None, got {threads!r}")
    if exact_on_avx2 is not None and not isinstance(exact_on_avx2, bool):
        raise ValueError(f"onnx_session: exact_on_avx2 must be True, False or None (auto), got {exact_on_avx2!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or physical_cores()
    if needs_exact_int8_option() if exact_on_avx2 is None else exact_on_avx2:
        options.add_session_config_entry(AVX2_PRECISION_KEY, "1")
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def integer_kernel_counts(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """For each job (``conv``, ``add``, ``mul``, ``concat``, ``pool``, ``matmul``): how many nodes ONNX
    Runtime's CPU provider runs as integer kernels (``integer``) and as float ones (``float``), read off
    the graph it optimises (extended level: the QDQ fusions, without the layout changes that rename
    float ops). A float Add, Mul or Concat with a constant input (a bias, a scale, a class token) is
    not counted: only operations on two computed tensors have an integer kernel to miss."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(optimized), load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    ops = Counter(
        n.op_type
        for n in graph.node
        if n.op_type not in ("Add", "Mul", "Concat") or not any(i in constants for i in n.input)
    )
    return {
        job: {"integer": sum(ops[o] for o in integer), "float": sum(ops[o] for o in floats)}
        for job, (integer, floats) in _KERNELS.items()
    }


def onnx_speedup(
    path: str | os.PathLike,
    reference_path: str | os.PathLike,
    batch_size: int = 1,
    iterations: int = 20,
    threads: int | None = None,
) -> float:
    """How many times faster ``path`` runs than ``reference_path`` (e.g. the FP32 export) in
    :func:`onnx_session`: median latency over ``iterations`` runs of random images of the model's input
    size at ``batch_size``, the two sessions timed in turn so that load on the machine slows both alike."""
    import numpy as np

    if iterations < 1 or batch_size < 1:
        raise ValueError(f"onnx_speedup: iterations and batch_size must be >= 1, got {iterations}, {batch_size}")
    sessions = [onnx_session(p, threads) for p in (path, reference_path)]
    shape = [batch_size, *sessions[0].get_inputs()[0].shape[1:]]
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    times: list[list[float]] = [[], []]
    for i in range(iterations + 2):  # two warm-up runs each
        for j, (s, feed) in enumerate(zip(sessions, feeds)):
            start = time.perf_counter()
            s.run(None, feed)
            if i >= 2:
                times[j].append(time.perf_counter() - start)
    return statistics.median(times[1]) / statistics.median(times[0])


def compare_with_float(path: str | os.PathLike, float_model: Any, input_size: Any, repeats: int = 5) -> dict[str, Any]:
    """How the exported model at ``path`` runs against ``float_model`` exported in FP32 (a few seconds):
    ``speedup_over_fp32`` (batch 1: the median of ``repeats`` :func:`onnx_speedup` measurements, fresh
    sessions each, since one measurement on a loaded machine can be off several fold),
    ``speedup_range`` (their lowest and highest), ``kernels`` (:func:`integer_kernel_counts`) and a
    one-line ``summary`` giving the median and the range."""
    from .onnx_export import export_onnx, quiet_loggers

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"compare_with_float: repeats must be a positive integer, got {repeats!r}")
    with tempfile.TemporaryDirectory() as tmp:
        with quiet_loggers(export_onnx.__module__, level=logging.ERROR):  # an FP32 export is what is wanted here
            reference = export_onnx(copy.deepcopy(float_model).float(), Path(tmp) / "fp32.onnx", input_size=input_size)
        speedups = [onnx_speedup(path, reference, iterations=10) for _ in range(repeats)]
    speedup, low, high = statistics.median(speedups), min(speedups), max(speedups)
    kernels = integer_kernel_counts(path)
    names = {"conv": "convolutions", "add": "additions", "mul": "products", "concat": "concatenations"}
    names.update(pool="average pools", matmul="matrix products")
    counted = [
        f"{k['integer']} of {k['integer'] + k['float']} {names[job]}"
        for job, k in kernels.items()
        if k["integer"] + k["float"] or job in ("conv", "add")
    ]
    measured = f"median of {repeats} measurements, {low:.2f}x to {high:.2f}x" if repeats > 1 else "one measurement"
    summary = (
        f"{path} runs at {speedup:.2f}x the speed of the FP32 model in ONNX Runtime on this machine (batch 1; "
        f"{measured}); "
        f"integer kernels: {', '.join(counted)}"
    )
    return {"speedup_over_fp32": speedup, "speedup_range": (low, high), "kernels": kernels, "summary": summary}


def _numpy(values: Any, dtype: Any = None) -> Any:
    """A numpy array of a tensor (any device; bfloat16 read as float32) or an array-like."""
    import numpy as np

    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu()
        values = values.float() if values.is_floating_point() else values
    return np.asarray(values, dtype=dtype)


def _top1(values: Any, what: str) -> Any:
    """The predicted classes of logits ``[N, classes]`` (their argmax) or of predictions ``[N]``."""
    values = _numpy(values)
    if values.ndim == 2:
        return values.argmax(1)
    if values.ndim == 1 and values.dtype.kind in "iu":
        return values.astype("int64")
    raise ValueError(
        f"onnx_accuracy: {what} must be logits [images, classes] or integer predictions [images], "
        f"got an array of shape {values.shape} and dtype {values.dtype}"
    )


def onnx_accuracy(
    path: str | os.PathLike,
    batches: Iterable[tuple[Any, Any]],
    reference: Callable[[Any], Any] | Any | None = None,
    *,
    threads: int | None = None,
) -> dict[str, Any]:
    """Top-1 accuracy of the exported model at ``path``, run in :func:`onnx_session`, on labelled ``batches``.

    Args:
        path: the ``.onnx`` file (its first input takes the images), or a session already open on one
            (an ``onnxruntime.InferenceSession`` with other options or providers).
        batches: ``(pixel_values, labels)`` pairs, numpy arrays or torch tensors, preprocessed as the
            model expects (e.g. a run's eval transform).
        reference: the model the export came from, to measure agreement: a callable mapping a batch's
            ``pixel_values`` (as given) to logits ``[B, classes]`` or predictions ``[B]``, or the logits or
            predictions of all images at once, in batch order.
        threads: intra-op threads of the session :func:`onnx_session` opens on ``path``.

    Returns ``accuracy`` (share of images whose ONNX top-1 class is the label) and ``count``; with
    ``reference``, also ``agreement`` (share whose ONNX and reference top-1 classes are equal) and
    ``reference_accuracy``.
    """
    if not hasattr(path, "run") and not Path(path).is_file():
        raise FileNotFoundError(f"onnx_accuracy: path {str(path)!r} is not a file (an .onnx file from export_onnx)")
    given = None if reference is None or callable(reference) else _top1(reference, "reference")
    session = path if hasattr(path, "run") else onnx_session(path, threads)  # a path, or an open session
    name = session.get_inputs()[0].name
    count = correct = agree = ref_correct = 0
    for i, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"onnx_accuracy: batches must be (pixel_values, labels) pairs; batch {i} is {batch!r:.80}")
        pixels, labels = _numpy(batch[0], "float32"), _numpy(batch[1]).reshape(-1)
        if len(labels) != len(pixels):
            raise ValueError(f"onnx_accuracy: batch {i} has {len(pixels)} images but {len(labels)} labels")
        predicted = session.run(None, {name: pixels})[0].argmax(1)
        correct += int((predicted == labels).sum())
        if reference is not None:
            ref = given[count : count + len(labels)] if given is not None else _top1(reference(batch[0]), "reference")
            if len(ref) != len(labels):
                raise ValueError(f"onnx_accuracy: reference gave {len(ref)} predictions for the {len(labels)} images "
                                 f"of batch {i}")  # fmt: skip
            agree += int((predicted == ref).sum())
            ref_correct += int((ref == labels).sum())
        count += len(labels)
    if count == 0:
        raise ValueError("onnx_accuracy: batches held no images")
    if given is not None and len(given) != count:
        raise ValueError(f"onnx_accuracy: reference has {len(given)} predictions but batches held {count} images")
    result: dict[str, Any] = {"accuracy": correct / count, "count": count}
    if reference is not None:
        result.update(agreement=agree / count, reference_accuracy=ref_correct / count)
    return result
