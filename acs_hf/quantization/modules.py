"""Quantized drop-in replacements for ``nn.Conv2d`` and ``nn.Linear``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, pad_same
from torch import nn

from .lsq import LSQQuantizer

__all__ = ["QuantConv2d", "QuantLinear", "QuantModule", "is_quantizable"]


def _make_quantizers(
    module: QuantModule,
    weight_bits: int,
    act_bits: int | None,
    per_channel: bool,
    out_features: int,
    compiled: bool,
) -> None:
    module.weight_quantizer = LSQQuantizer(
        weight_bits,
        signed=True,
        per_channel=per_channel,
        channel_dim=0,
        num_channels=out_features,
        compiled=compiled,
    )
    module.input_quantizer = LSQQuantizer(act_bits, compiled=compiled) if act_bits is not None else None


class QuantModule:
    """Marker base of the quantized layers: each has ``weight_quantizer`` and ``input_quantizer``."""

    weight_quantizer: LSQQuantizer
    input_quantizer: LSQQuantizer | None

    def quantizers(self) -> list[LSQQuantizer]:
        return [q for q in (self.weight_quantizer, self.input_quantizer) if q is not None]


class QuantConv2d(QuantModule, nn.Conv2d):
    """``nn.Conv2d`` whose weight (and optionally input) pass through LSQ fake quantizers.

    Built with :meth:`from_float`, which keeps the original ``weight`` and ``bias`` Parameters, so
    pretrained weights carry over and parameter names do not change. Supports every plain
    ``nn.Conv2d`` (grouped and depthwise included, any static padding) and timm's dynamic
    "same"-padding ``Conv2dSame``.
    """

    same_pad: bool = False

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        weight_bits: int,
        act_bits: int | None,
        per_channel: bool = False,
        compiled: bool = False,
    ) -> QuantConv2d:
        if not is_quantizable(conv):
            raise TypeError(f"cannot quantize {type(conv).__name__}: its forward is not a plain conv")
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        q.weight, q.bias = conv.weight, conv.bias
        q.same_pad = isinstance(conv, Conv2dSame)
        _make_quantizers(q, weight_bits, act_bits, per_channel, conv.out_channels, compiled)
        return q.to(conv.weight.device).train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight_quantizer(self.weight)
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return self._conv_forward(x, w, self.bias)


class QuantLinear(QuantModule, nn.Linear):
    """``nn.Linear`` whose weight (and optionally input) pass through LSQ fake quantizers.

    Built with :meth:`from_float`, which keeps the original Parameters (see :class:`QuantConv2d`).
    """

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        weight_bits: int,
        act_bits: int | None,
        per_channel: bool = False,
        compiled: bool = False,
    ) -> QuantLinear:
        if not is_quantizable(linear):
            raise TypeError(f"cannot quantize {type(linear).__name__}: its forward is not a plain linear")
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        q.weight, q.bias = linear.weight, linear.bias
        _make_quantizers(q, weight_bits, act_bits, per_channel, linear.out_features, compiled)
        return q.to(linear.weight.device).train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


def is_quantizable(module: nn.Module) -> bool:
    """True for the layers the quantized modules reproduce exactly.

    That is any ``nn.Conv2d`` or ``nn.Linear`` whose class keeps the stock forward (timm's static
    padding and depthwise convs are plain ``nn.Conv2d``), plus timm's ``Conv2dSame``. Subclasses
    that transform the weight in their forward (e.g. weight standardisation) are not, and stay FP.
    """
    if isinstance(module, QuantModule):
        return False
    if isinstance(module, nn.Conv2d):
        return type(module).forward is nn.Conv2d.forward or type(module) is Conv2dSame
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    return False
