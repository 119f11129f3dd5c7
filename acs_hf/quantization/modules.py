"""Quantized drop-in replacements for ``nn.Conv2d`` and ``nn.Linear``, and their per-layer settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, pad_same
from timm.layers import Linear as TimmLinear
from torch import nn

from .lsq import LSQQuantizer, check_bits

__all__ = ["LayerQuantConfig", "QuantConv2d", "QuantLinear", "QuantModule", "is_quantizable", "quant_class_for"]


@dataclass(frozen=True)
class LayerQuantConfig:
    """How one layer is quantized; passed into the layer (built by ``quantize_model`` from a
    :class:`~acs_hf.QuantConfig`, or read back from a checkpoint).

    Args:
        weight_bits: weight bits, 2..8 (signed codes).
        act_bits: input bits, 2..8, or ``None`` to leave the input in floating point.
        per_channel: one weight step per output channel.
        compiled: ``torch.compile``-fused fake-quant kernels.
        learn_input_step: ``False`` calibrates the input step and then keeps it fixed.
        act_signed: signedness of the input codes; ``None`` decides it from the calibration data.
    """

    weight_bits: int
    act_bits: int | None = None
    per_channel: bool = False
    compiled: bool = False
    learn_input_step: bool = True
    act_signed: bool | None = None

    def __post_init__(self) -> None:
        check_bits("weight_bits", self.weight_bits)
        check_bits("act_bits", self.act_bits, allow_none=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class QuantModule:
    """Base of the quantized layers: each has ``weight_quantizer``, ``input_quantizer`` (or None)
    and the :class:`LayerQuantConfig` it was built with. Subclasses say how to build an empty
    layer shaped like a float one (:meth:`_empty_like`) and how to rebuild the float one (:meth:`to_float`)."""

    weight_quantizer: LSQQuantizer
    input_quantizer: LSQQuantizer | None
    layer_config: LayerQuantConfig

    def quantizers(self) -> list[LSQQuantizer]:
        return [q for q in (self.weight_quantizer, self.input_quantizer) if q is not None]

    @classmethod
    def from_float(cls, module: nn.Module, config: LayerQuantConfig, name: str = "") -> QuantModule:
        """The quantized twin of ``module``, sharing its ``weight`` and ``bias`` Parameters (so
        pretrained weights carry over and parameter names do not change). ``name`` labels errors."""
        if not is_quantizable(module):
            raise TypeError(f"cannot quantize {name or type(module).__name__}: its forward is not a plain conv/linear")
        q = cls._empty_like(module)
        q.weight, q.bias = module.weight, module.bias
        q.layer_config = config
        prefix = f"{name}." if name else ""
        q.weight_quantizer = LSQQuantizer(
            config.weight_bits,
            signed=True,
            per_channel=config.per_channel,
            channel_dim=0,
            num_channels=module.weight.shape[0],
            compiled=config.compiled,
            name=prefix + "weight_quantizer",
        )
        q.input_quantizer = (
            LSQQuantizer(
                config.act_bits,
                signed=config.act_signed,
                compiled=config.compiled,
                learn_step=config.learn_input_step,
                name=prefix + "input_quantizer",
            )
            if config.act_bits is not None
            else None
        )
        return q.to(module.weight.device).train(module.training)

    @classmethod
    def _empty_like(cls, module: nn.Module) -> QuantModule:
        raise NotImplementedError

    def to_float(self) -> nn.Module:
        """The float layer back, sharing this layer's Parameters (the latent FP weights)."""
        raise NotImplementedError


class QuantConv2d(QuantModule, nn.Conv2d):
    """``nn.Conv2d`` whose weight (and optionally input) pass through LSQ fake quantizers.

    Supports every plain ``nn.Conv2d`` (grouped and depthwise included, any static padding) and
    timm's dynamic "same"-padding ``Conv2dSame``. Built with :meth:`QuantModule.from_float`.
    """

    same_pad: bool = False

    @staticmethod
    def _conv_kwargs(conv: nn.Conv2d) -> dict[str, Any]:
        return dict(
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )

    @classmethod
    def _empty_like(cls, module: nn.Conv2d) -> QuantConv2d:
        q = cls(**cls._conv_kwargs(module))
        q.same_pad = isinstance(module, Conv2dSame)
        return q

    def to_float(self) -> nn.Conv2d:
        kwargs = self._conv_kwargs(self)
        if self.same_pad:  # Conv2dSame computes its own padding and takes no padding_mode
            kwargs.pop("padding_mode")
            kwargs["padding"] = 0
            conv = Conv2dSame(**kwargs)
        else:
            conv = nn.Conv2d(**kwargs)
        conv.weight, conv.bias = self.weight, self.bias
        return conv.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight_quantizer(self.weight)
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return self._conv_forward(x, w, self.bias)


class QuantLinear(QuantModule, nn.Linear):
    """``nn.Linear`` whose weight (and optionally input) pass through LSQ fake quantizers.

    Built with :meth:`QuantModule.from_float` (see :class:`QuantConv2d`).
    """

    @classmethod
    def _empty_like(cls, module: nn.Linear) -> QuantLinear:
        return cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")

    def to_float(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


def is_quantizable(module: nn.Module) -> bool:
    """True for the layers the quantized modules reproduce exactly.

    That is any ``nn.Conv2d`` or ``nn.Linear`` whose class keeps the stock forward (timm's static
    padding and depthwise convs are plain ``nn.Conv2d``), plus timm's ``Conv2dSame`` and its
    ``Linear`` (a TorchScript-friendly ``nn.Linear``, e.g. MobileNetV3's classifier). Subclasses
    that transform the weight in their forward (e.g. weight standardisation) are not, and stay FP.
    """
    if isinstance(module, QuantModule):
        return False
    if isinstance(module, nn.Conv2d):
        return type(module).forward is nn.Conv2d.forward or type(module) is Conv2dSame
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward or type(module) is TimmLinear
    return False


def quant_class_for(module: nn.Module) -> type[QuantModule] | None:
    """The quantized class that replaces ``module`` (``None`` for anything but Conv2d / Linear)."""
    if isinstance(module, nn.Conv2d):
        return QuantConv2d
    return QuantLinear if isinstance(module, nn.Linear) else None
