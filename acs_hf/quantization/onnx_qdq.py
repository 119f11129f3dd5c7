"""Export-time stand-ins for the LSQ quantizers: custom ops whose eager meaning is LSQ's fake quantization
and whose ONNX translation is QuantizeLinear / DequantizeLinear (:func:`~acs_hf.export_onnx`).

:func:`deploy_view` swaps every quantizer of a model for its stand-in while the model is traced;
:func:`translation_table` gives ``torch.onnx.export`` the QDQ translation of each op. Containers: 4
(INT4 / UINT4), 8 (int8 / uint8, a narrower code range enforced by a float Clip), and, for integer
kernels, uint8 codes with the range clamped on the integer codes (signed codes at zero point 128).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .lsq import LSQQuantizer, lsq_fake_quant, quant_range
from .model import quant_modules
from .modules import QuantModule
from .output_quant import output_quantizers, set_output_quantizer
from .packed import broadcast_step, stored_weight_codes

__all__ = ["U8_SIGNED_ZERO_POINT", "deploy_view", "translation_table"]

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


def translation_table() -> dict[Any, Any]:
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


@contextlib.contextmanager
def deploy_view(
    model: nn.Module, int4: bool, int4_narrow_activations: bool, integer_kernels: bool
) -> Iterator[nn.Module]:
    """The model in eval mode with every quantizer swapped for its export-time stand-in; restored on exit."""
    modes = {m: m.training for m in model.modules()}
    saved = [(m, m.weight_quantizer, m.input_quantizer) for _, m in quant_modules(model)]
    outputs = output_quantizers(model)

    def activation(q: LSQQuantizer, int4_ok: bool = True) -> _ActivationQDQ:
        narrow_ok = int4_narrow_activations or q.bits == 4
        return _ActivationQDQ(q, 0 if integer_kernels else _container(q.bits, int4 and int4_ok and narrow_ok))

    try:
        for m, wq, iq in saved:
            m.weight_quantizer = _WeightDQ(m, _container(wq.bits, int4))
            if iq is not None:
                m.input_quantizer = activation(iq)
        for name, q in outputs:  # int8 containers: onnxruntime 1.32 moves a uint4 DequantizeLinear past MaxPool
            set_output_quantizer(model, name, activation(q, int4_ok=False))
        yield model.eval()
    finally:
        for m, wq, iq in saved:
            m.weight_quantizer, m.input_quantizer = wq, iq
        for name, q in outputs:
            set_output_quantizer(model, name, q)
        for m, training in modes.items():
            m.training = training
