"""Export an LSQ-quantized model to ONNX with QuantizeLinear / DequantizeLinear (QDQ) nodes.

Every quantized layer becomes ``DequantizeLinear(integer weight codes, learnt step, zero point 0)``
feeding its Conv / Gemm / MatMul (``axis=0`` for per-channel steps), and, when its input is
quantized, ``QuantizeLinear -> DequantizeLinear`` on that input at the learnt activation step. The
weight codes are the ones :func:`~acs_hf.save_quantized` stores, ``clamp(round(w / s), -Qn, Qp)``.

Containers (opset 21): signed LSQ codes go in ``int*``, unsigned in ``uint*``. 8-bit codes and 5-7
bit codes use ``int8`` / ``uint8``. With ``int4=True``, 2-4 bit weights are stored as ``INT4``
initializers (two codes a byte) and 4-bit activations use ``int4`` / ``uint4``. 2-3 bit activations
use ``int8`` / ``uint8`` unless ``int4_narrow_activations=True``: onnxruntime 1.32 fails to load
a graph with ``Clip -> QuantizeLinear(int4)`` unless its ``ClipQuantRewrite`` optimizer is disabled
(``InferenceSession(..., disabled_optimizers=["ClipQuantRewrite"])``). A code range narrower than its container is
enforced by a float ``Clip`` to ``[-Qn * s, Qp * s]`` before ``QuantizeLinear``, which is exact.

Integer kernels (``integer_kernels=True``, the default for ``QuantConfig(integer_graph=True)`` models):
ONNX Runtime fuses ``DequantizeLinear -> Conv -> QuantizeLinear`` into ``QLinearConv`` (and ``Add`` into
``QLinearAdd``) only for 8-bit types, with uint8 activations on x86 and an int32 bias at input step x
weight step. So activation codes are uint8 (signed ones at zero point 128), ranges under 8 bits clamped
on the codes (``Clip`` on uint8: a float Clip before ``QuantizeLinear`` would block the fusion),
BatchNorm is folded with the weight codes moved onto the int8 grid (``INT4 -> Cast -> Mul(2^k)``,
folded when the session starts, so the file keeps 4-bit codes and the bias rounds 2^k finer), and each
MaxPool, Slice or zero Pad of codes is quantized again at the same step (ONNX Runtime then runs it on codes).

The graph is traced by ``torch.onnx.export(dynamo=True)`` through the model's own forward, with
each layer's quantizers swapped for export-time modules (custom ops whose eager meaning is LSQ's
fake quantization and whose ONNX translation is the QDQ pair), so timm's "same" padding, padding
modes and any model code around the layers export as they run. Needs the ``onnx`` extra
(``pip install acs_hf[onnx]``: onnx, onnxscript, onnxruntime), imported on first use.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model import quant_modules
from .onnx_passes import (
    clamp_on_codes,
    clean_up,
    fold_batchnorm_nodes,
    int8_weight_kernels,
    keep_float_biases,
    requantize_after_code_ops,
    save_atomically,
)
from .onnx_qdq import deploy_view, translation_table
from .output_quant import output_quantizers

__all__ = ["export_onnx", "quiet_loggers"]

logger = logging.getLogger(__name__)

#: Smallest opset with INT4 / UINT4 QuantizeLinear and DequantizeLinear.
INT4_OPSET = 21


def _check_exportable(model: nn.Module, int4: bool, opset: int) -> None:
    """Refuse INT4 below opset 21, quantizers that are uninitialised or observing, and non-float32 quantized layers."""
    if int4 and opset < INT4_OPSET:
        raise ValueError(f"export_onnx: INT4 containers need opset >= {INT4_OPSET}, got {opset}; or pass int4=False")
    quantizers = [(name, q) for name, m in quant_modules(model) for q in m.quantizers()] + output_quantizers(model)
    for name, q in quantizers:
        if not q.is_initialized or q.observing:
            raise RuntimeError(
                f"export_onnx: the quantizer {q.name or name!r} is not calibrated; call "
                "acs_hf.calibrate_quantizers(model, batches) (or load a calibrated checkpoint) first"
            )
    for name, m in quant_modules(model):
        if m.weight.dtype != torch.float32:
            raise ValueError(f"export_onnx: layer {name!r} is {m.weight.dtype}; call model.float() first")
    if not quant_modules(model):
        logger.warning("export_onnx: the model has no quantized layers; exporting it in floating point")


class _Logits(nn.Module):
    """The wrapped model's logits: a Tensor output as is, else ``.logits`` (transformers) or item 0."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, torch.Tensor):
            return out
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, (tuple, list)) and out:
            logits = out[0]
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"export_onnx: cannot find the logits in the model's output ({type(out).__name__})")
        return logits


# -- example input, graph clean-up, saving ----------------------------------------------------------
def _example_input(
    model: nn.Module, example_input: torch.Tensor | None, input_size: Sequence[int] | None, dynamic_batch: bool
) -> torch.Tensor:
    """A float32 batch on the model's device; at least 2 images with a dynamic batch (torch.export
    specialises a batch of 1), 1 image with a fixed batch and no example."""
    device = next(model.parameters()).device
    if example_input is None:
        size = tuple(input_size) if input_size is not None else _model_input_size(model)
        _check_channels(model, size[0])
        batch = 2 if dynamic_batch else 1
        example_input = torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))
    elif example_input.dim() == 4:
        _check_channels(model, example_input.shape[1])
    x = example_input.detach().to(device=device, dtype=torch.float32)
    if dynamic_batch and x.shape[0] < 2:
        x = x.expand(2, *x.shape[1:]).contiguous()
    return x


def _check_channels(model: nn.Module, channels: int) -> None:
    """Refuse, before tracing, images whose channel count the model's first convolution does not take."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and channels != first.in_channels:
        raise ValueError(
            f"export_onnx: the images have {channels} channel(s) but the model's first convolution takes "
            f"{first.in_channels}; give input_size (or example_input) with {first.in_channels} channels"
        )


def _model_input_size(model: nn.Module) -> tuple[int, ...]:
    """(C, H, W) from timm's ``pretrained_cfg`` (on the model, or in a transformers ``config``, as timm
    models loaded with ``from_pretrained`` carry it) or a transformers ``config`` (``num_channels``,
    ``image_size``)."""
    config = getattr(model, "config", None)
    for cfg in (getattr(model, "pretrained_cfg", None), getattr(config, "pretrained_cfg", None)):
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        if size:
            return tuple(size)
    image_size = getattr(config, "image_size", None)
    if image_size is not None:
        h, w = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        return getattr(config, "num_channels", 3), h, w
    raise ValueError("export_onnx: give example_input or input_size; the model does not say its input size")


def _trace(model: nn.Module, x: torch.Tensor, opset: int, dynamic_batch: bool, input_name: str, output_name: str):
    """The ONNX graph (an ``onnx_ir.Model``) of ``model`` traced by ``torch.onnx.export(dynamo=True)``,
    with the custom ops translated to QDQ nodes and not yet optimised."""
    program = torch.onnx.export(
        model,
        (x,),
        dynamo=True,
        opset_version=opset,
        input_names=[input_name],
        output_names=[output_name],
        dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic_batch else None,
        custom_translation_table=translation_table(),
        optimize=False,  # clean_up optimizes, keeping the INT4 casts for itself
        verbose=False,
    )
    return program.model


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | None = None,
    *,
    input_size: Sequence[int] | None = None,
    opset: int = INT4_OPSET,
    int4: bool = True,
    int4_narrow_activations: bool = False,
    dynamic_batch: bool = True,
    fold_batchnorm: bool | None = None,
    integer_kernels: bool | None = None,
    input_name: str = "pixel_values",
    output_name: str = "logits",
) -> Path:
    """Export a calibrated acs_hf-quantized model to an ONNX file with QDQ nodes (module docstring).

    Args:
        model: a calibrated (or loaded) model quantized with :func:`~acs_hf.quantize_model`: timm, transformers
            (its ``logits``) or any module mapping images to logits; one without quantized layers exports in float.
        path: the ``.onnx`` file to write (parent directories are created; written atomically).
        example_input: a batch to trace with (values do not matter); default: random images of ``input_size``
            ``(C, H, W)``, or of the model's own input size (timm ``pretrained_cfg``, ``config.image_size``).
        opset: ONNX opset; INT4 containers need 21 or later.
        int4: 2-4 bit weights as INT4 initializers and 4-bit activations in int4/uint4; ``False`` puts every
            code in int8/uint8 (its LSQ range enforced by a Clip).
        int4_narrow_activations: 2-3 bit activations in int4/uint4 too (then onnxruntime 1.32 needs
            ``disabled_optimizers=["ClipQuantRewrite"]``); default int8/uint8.
        dynamic_batch: a symbolic batch dimension; ``False`` fixes the example's batch (1 without one).
        fold_batchnorm: fold each BatchNormalization after a quantized Conv into per-channel weight scales and
            an int32 bias (a negative gain gives a negative scale, a zero gain zero codes), so that ONNX Runtime
            runs integer convolutions; outputs differ from PyTorch by the bias's rounding. Default: ``integer_kernels``.
        integer_kernels: write the graph for ONNX Runtime's integer kernels (module docstring); default: on
            for ``QuantConfig(integer_graph=True)`` models, whose convolutions and residual additions then
            all run as ``QLinearConv`` / ``QLinearAdd``.
        input_name, output_name: names of the graph's input and output.

    Returns:
        The path written.

    Raises:
        RuntimeError: a quantizer is not calibrated.
        ValueError: an opset too old for INT4, a quantized layer that is not float32, an ``input_size`` that
            is not (C, H, W) or whose channels the first convolution does not take, or a ``path`` that is a
            directory or lies under a file.
        PermissionError: ``path`` cannot be written.
    """
    _check_exportable(model, int4, opset)
    path = _check_destination(Path(path))
    if input_size is not None:
        _check_input_size(input_size)
    if integer_kernels is None:
        integer_kernels = bool(output_quantizers(model))
    x = _example_input(model, example_input, input_size, dynamic_batch)
    with quiet_loggers("onnxscript", "onnx_ir", "torch.onnx"):
        with deploy_view(model, int4, int4_narrow_activations, integer_kernels), torch.no_grad():
            onnx_model = _trace(_Logits(model).eval(), x, opset, dynamic_batch, input_name, output_name)
        _graph_passes(onnx_model, integer_kernels if fold_batchnorm is None else fold_batchnorm, integer_kernels)
    save_atomically(onnx_model, path)
    return path


def _graph_passes(onnx_model: Any, fold_batchnorm: bool, integer_kernels: bool) -> None:
    """The traced graph cleaned up, BatchNorm folded, and laid out for integer kernels where asked."""
    clean_up(onnx_model)
    if integer_kernels:  # before the fold, which needs a dequantized input on each Conv
        requantize_after_code_ops(onnx_model)
    if fold_batchnorm:
        folded = fold_batchnorm_nodes(onnx_model, int8_kernels=integer_kernels)
        logger.info("export_onnx: folded %d BatchNormalization nodes", folded)
    if integer_kernels:
        int8_weight_kernels(onnx_model)
        clamp_on_codes(onnx_model)
    keep_float_biases(onnx_model, integer_kernels)


def _check_destination(path: Path) -> Path:
    """Refuse, before tracing, a path that is a directory, lies under a regular file, or cannot be written."""
    if path.is_dir():
        raise ValueError(f"export_onnx: path {str(path)!r} is a directory; give the .onnx file to write")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"export_onnx: path {str(path)!r} lies under {str(parent)!r}, which is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"export_onnx: cannot write under {str(parent)!r} (path {str(path)!r})")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _check_input_size(input_size: Any) -> None:
    ok = isinstance(input_size, Sequence) and len(input_size) == 3
    if not ok or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_size):
        raise ValueError(f"export_onnx: input_size must be (C, H, W), three positive integers, got {input_size!r}")


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Within the block, the named loggers pass only records at ``level`` or above; restored after.
    export_onnx keeps torch.onnx's helpers at WARNING (they log every pass at INFO, about a hundred
    lines a model)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(max(log.getEffectiveLevel(), level))
    try:
        yield
    finally:
        for log, previous in zip(loggers, levels):
            log.setLevel(previous)
