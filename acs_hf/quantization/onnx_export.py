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

from .integer_graph import output_quantizers
from .lsq import LSQQuantizer, lsq_fake_quant, quant_range
from .model import quant_modules
from .modules import QuantModule
from .onnx_passes import (
    clean_up,
    fold_batchnorm_nodes,
    int8_weight_kernels,
    keep_float_biases,
    requantize_after_max_pool,
    save_atomically,
)
from .packed import broadcast_step, stored_weight_codes

__all__ = ["export_onnx"]

logger = logging.getLogger(__name__)

#: Smallest opset with INT4 / UINT4 QuantizeLinear and DequantizeLinear.
INT4_OPSET = 21
#: Zero point of signed activation codes stored as uint8 (what ONNX Runtime's x86 kernels take).
U8_SIGNED_ZERO_POINT = 128


# -- custom ops: LSQ math in eager mode, QDQ nodes in ONNX ------------------------------------------
@torch.library.custom_op("acs_hf::quant_dequant", mutates_args=())
def _quant_dequant(x: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool, container: int) -> torch.Tensor:
    """LSQ fake quantization of ``x`` at the per-tensor ``scale``; ``container`` (4 or 8) is for export."""
    return lsq_fake_quant(x, scale.reshape(1), bits, signed).clone()


@_quant_dequant.register_fake
def _(x, scale, bits, signed, container):
    return torch.empty_like(x)


@torch.library.custom_op("acs_hf::dequant_weight", mutates_args=())
def _dequant_weight(codes: torch.Tensor, scale: torch.Tensor, container: int) -> torch.Tensor:
    """``codes * scale`` (per output channel when ``scale`` is 1-D); ``container`` is for export."""
    return codes.float() * broadcast_step(scale, codes.dim())


@_dequant_weight.register_fake
def _(codes, scale, container):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("acs_hf::quant_dequant_u8", mutates_args=())
def _quant_dequant_u8(x: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """LSQ fake quantization of ``x`` at the per-tensor ``scale``, exported as uint8 codes (integer kernels)."""
    return lsq_fake_quant(x, scale.reshape(1), bits, signed).clone()


@_quant_dequant_u8.register_fake
def _(x, scale, bits, signed):
    return torch.empty_like(x)


def _translation_table() -> dict[Any, Any]:
    """ONNX translations of the custom ops (onnxscript, traced at export)."""
    import numpy as np
    import onnx_ir as ir
    from onnxscript import opset21 as op

    def quant_dequant(x, scale, bits: int, signed: bool, container: int):
        zero = op.Constant(value=ir.tensor(np.zeros((), dtype=_numpy_dtype(signed, container))))
        qn, qp = quant_range(bits, signed)
        if (qn, qp) != quant_range(container, signed):  # narrower than the container: clip first
            lo, hi = op.Constant(value_float=float(-qn)), op.Constant(value_float=float(qp))
            x = op.Clip(x, op.Mul(scale, lo), op.Mul(scale, hi))
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero), scale, zero)

    def dequant_weight(codes, scale, container: int):
        zero = op.Constant(value=ir.tensor(np.zeros(tuple(scale.shape), dtype=_numpy_dtype(True, container))))
        if container == 4:  # int8 codes -> INT4, folded into an INT4 initializer after export
            codes = op.Cast(codes, to=ir.DataType.INT4)
        axis = {"axis": 0} if len(scale.shape) == 1 else {}
        return op.DequantizeLinear(codes, scale, zero, **axis)

    def quant_dequant_u8(x, scale, bits: int, signed: bool):
        # uint8 codes as ONNX Runtime's x86 integer kernels take them: signed codes offset by a zero
        # point of 128; a range narrower than 8 bits clamped on the integer codes (a float Clip
        # before QuantizeLinear would keep the producing Conv / Add out of integer kernels).
        qn, qp = quant_range(bits, signed)
        zero_point = U8_SIGNED_ZERO_POINT if signed else 0
        zero = op.Constant(value=ir.tensor(np.array(zero_point, dtype=np.uint8)))
        q = op.QuantizeLinear(x, scale, zero)
        lo, hi = zero_point - qn, zero_point + qp
        if (lo, hi) != (0, 255):
            low = op.Constant(value=ir.tensor(np.array(lo, dtype=np.uint8)))
            high = op.Constant(value=ir.tensor(np.array(hi, dtype=np.uint8)))
            q = op.Clip(q, low, high)
        return op.DequantizeLinear(q, scale, zero)

    return {
        torch.ops.acs_hf.quant_dequant.default: quant_dequant,
        torch.ops.acs_hf.quant_dequant_u8.default: quant_dequant_u8,
        torch.ops.acs_hf.dequant_weight.default: dequant_weight,
    }


def _numpy_dtype(signed: bool, container: int) -> Any:
    import ml_dtypes
    import numpy as np

    return {
        (True, 4): ml_dtypes.int4,
        (False, 4): ml_dtypes.uint4,
        (True, 8): np.int8,
        (False, 8): np.uint8,
    }[(signed, container)]


# -- export-time stand-ins for the quantizers -----------------------------------------------------
def _scale(q: LSQQuantizer) -> torch.Tensor:
    """The step as the fake-quant op uses it (float32, floored); 0-d when per-tensor (ONNX's scalar scale)."""
    s = broadcast_step(q.step.detach(), 1)
    return s if q.per_channel else s.reshape(())


class _WeightDQ(nn.Module):
    """Stands in for a weight quantizer: returns ``DequantizeLinear(codes, s)``, ignoring the float weight."""

    def __init__(self, layer: QuantModule, container: int) -> None:
        super().__init__()
        self.container = container
        qn, _ = layer.weight_quantizer.qrange
        # the codes save_quantized stores (offset by Qn there), as signed int8
        codes = (stored_weight_codes(layer).to(torch.int16) - qn).to(torch.int8)
        self.register_buffer("codes", codes.to(layer.weight.device))
        self.register_buffer("scale", _scale(layer.weight_quantizer))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.acs_hf.dequant_weight(self.codes, self.scale, self.container)


class _ActivationQDQ(nn.Module):
    """Stands in for an input or output quantizer: ``QuantizeLinear -> DequantizeLinear`` at the
    learnt step; ``container`` 0 means uint8 codes with an integer clamp (integer kernels)."""

    def __init__(self, quantizer: LSQQuantizer, container: int) -> None:
        super().__init__()
        self.bits, self.signed, self.container = quantizer.bits, quantizer.signed, container
        self.register_buffer("scale", _scale(quantizer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.container == 0:
            return torch.ops.acs_hf.quant_dequant_u8(x, self.scale, self.bits, self.signed)
        return torch.ops.acs_hf.quant_dequant(x, self.scale, self.bits, self.signed, self.container)


def _container(bits: int, int4: bool) -> int:
    return 4 if int4 and bits <= 4 else 8


def _check_exportable(model: nn.Module, int4: bool, opset: int) -> None:
    """Refuse INT4 below opset 21, quantizers that are uninitialised or observing, and non-float32 quantized layers."""
    if int4 and opset < INT4_OPSET:
        raise ValueError(f"export_onnx: INT4 containers need opset >= {INT4_OPSET}, got {opset}; or pass int4=False")
    for name, m in quant_modules(model):
        for q in m.quantizers():
            if not q.is_initialized or q.observing:
                raise RuntimeError(
                    f"export_onnx: the quantizer {q.name or name!r} is not calibrated; call "
                    "acs_hf.calibrate_quantizers(model, batches) (or load a calibrated checkpoint) first"
                )
        if m.weight.dtype != torch.float32:
            raise ValueError(f"export_onnx: layer {name!r} is {m.weight.dtype}; call model.float() first")


@contextlib.contextmanager
def _deploy_view(
    model: nn.Module, int4: bool, int4_narrow_activations: bool, integer_kernels: bool
) -> Iterator[nn.Module]:
    """The model in eval mode with every quantizer swapped for its export-time stand-in; restored on exit."""
    modes = {m: m.training for m in model.modules()}
    saved = [(m, m.weight_quantizer, m.input_quantizer) for _, m in quant_modules(model)]
    outputs = [(model.get_submodule(name), q) for name, q in output_quantizers(model)]

    def activation(q: LSQQuantizer, int4_ok: bool = True) -> _ActivationQDQ:
        narrow_ok = int4_narrow_activations or q.bits == 4
        return _ActivationQDQ(q, 0 if integer_kernels else _container(q.bits, int4 and int4_ok and narrow_ok))

    try:
        for m, wq, iq in saved:
            m.weight_quantizer = _WeightDQ(m, _container(wq.bits, int4))
            if iq is not None:
                m.input_quantizer = activation(iq)
        for m, q in outputs:  # int8 containers: onnxruntime 1.32 moves a uint4 DequantizeLinear past MaxPool
            m.output_quantizer = activation(q, int4_ok=False)
        yield model.eval()
    finally:
        for m, wq, iq in saved:
            m.weight_quantizer, m.input_quantizer = wq, iq
        for m, q in outputs:
            m.output_quantizer = q
        for m, training in modes.items():
            m.training = training


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
    specialises a batch of 1)."""
    device = next(model.parameters()).device
    if example_input is None:
        size = tuple(input_size) if input_size is not None else _model_input_size(model)
        example_input = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    x = example_input.detach().to(device=device, dtype=torch.float32)
    if dynamic_batch and x.shape[0] < 2:
        x = x.expand(2, *x.shape[1:]).contiguous()
    return x


def _model_input_size(model: nn.Module) -> tuple[int, ...]:
    """(C, H, W) from timm's ``pretrained_cfg`` or a transformers ``config`` (``num_channels``, ``image_size``)."""
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if size:
        return tuple(size)
    config = getattr(model, "config", None)
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
        custom_translation_table=_translation_table(),
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
        model: a model quantized with :func:`~acs_hf.quantize_model` and calibrated (or loaded); a
            timm model, a transformers model (its ``logits`` are exported) or any module mapping an
            image batch to logits. A model without quantized layers exports in float.
        path: the ``.onnx`` file to write (parent directories are created; written atomically).
        example_input: a batch used to trace the model (values do not matter). Default: random
            images of ``input_size``, or of the model's own input size (timm ``pretrained_cfg``,
            transformers ``config.image_size``).
        input_size: ``(C, H, W)`` when ``example_input`` is not given.
        opset: ONNX opset; INT4 containers need 21 or later.
        int4: 2-4 bit weights as INT4 initializers and 4-bit activations in int4/uint4; ``False``
            puts every code in int8/uint8 (with its LSQ range enforced by a Clip).
        int4_narrow_activations: 2-3 bit activations in int4/uint4 too (then onnxruntime 1.32
            needs ``disabled_optimizers=["ClipQuantRewrite"]``); default int8/uint8.
        dynamic_batch: a symbolic batch dimension; ``False`` fixes the example's batch size.
        fold_batchnorm: fold each BatchNormalization after a quantized Conv into the weight's (then
            per-channel) scale and an int32 bias at ``input scale * weight scale``, so that onnxruntime
            can run integer convolutions. The weight codes are unchanged (a negative gain makes a
            negative scale; a zero gain zeroes its channel's codes); the outputs differ from PyTorch
            only by float rounding and the bias's int32 rounding. Default: with ``integer_kernels``.
        integer_kernels: write the graph for ONNX Runtime's integer kernels: activation codes in uint8
            (signed ones at zero point 128, ranges under 8 bits clamped on the integer codes), 2-4 bit
            weights as INT4 initializers cast to int8, BatchNorm folded (``fold_batchnorm``), each
            MaxPool of codes quantized again at the same step. Default: on for models quantized with
            ``QuantConfig(integer_graph=True)``, where every convolution and residual addition then
            runs as ``QLinearConv`` / ``QLinearAdd``; ``int4_narrow_activations`` does not apply.
        input_name, output_name: names of the graph's input and output.

    Returns:
        The path written.

    Raises:
        RuntimeError: a quantizer is not calibrated.
        ValueError: an opset too old for INT4, or a quantized layer that is not float32.
    """
    _check_exportable(model, int4, opset)
    if not quant_modules(model):
        logger.warning("export_onnx: the model has no quantized layers; exporting it in floating point")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if integer_kernels is None:
        integer_kernels = bool(output_quantizers(model))
    x = _example_input(model, example_input, input_size, dynamic_batch)
    with _deploy_view(model, int4, int4_narrow_activations, integer_kernels), torch.no_grad():
        onnx_model = _trace(_Logits(model).eval(), x, opset, dynamic_batch, input_name, output_name)
    clean_up(onnx_model)
    if integer_kernels:  # before the fold, which needs a dequantized input on each Conv
        requantize_after_max_pool(onnx_model)
    if fold_batchnorm is None:
        fold_batchnorm = integer_kernels
    if fold_batchnorm:
        folded = fold_batchnorm_nodes(onnx_model, int8_kernels=integer_kernels)
        logger.info("export_onnx: folded %d BatchNormalization nodes", folded)
    if integer_kernels:
        int8_weight_kernels(onnx_model)
    keep_float_biases(onnx_model)
    save_atomically(onnx_model, path)
    return path
