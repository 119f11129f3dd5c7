"""Output quantizers: an LSQ quantizer on a module's output, applied by a forward hook.

The integer-graph placement (:mod:`~acs_hf.quantization.integer_graph`) decides which modules get
one; the checkpoint (``outputs`` table), the export and :func:`~acs_hf.dequantize_model` find them
here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..utils.upstream import forward_hook_count, remove_forward_hook
from .lsq import LSQQuantizer, check_bits

__all__ = ["OutputQuantConfig", "quantize_outputs", "output_quantizers", "remove_output_quantizers"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class OutputQuantConfig:
    """The quantizer on one module's output.

    Args:
        bits: code bits, 2..8.
        signed: signedness of the codes; ``None`` decides it from the calibration data.
        compiled: ``torch.compile``-fused fake-quant kernels.
    """

    bits: int
    signed: bool | None = None
    compiled: bool = False

    def __post_init__(self) -> None:
        check_bits("OutputQuantConfig.bits", self.bits)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantize_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook: the module's output through its ``output_quantizer`` (if it still has one)."""
    quantizer = getattr(module, "output_quantizer", None)
    return quantizer(output) if quantizer is not None else None


def quantize_outputs(model: nn.Module, outputs: Mapping[str, OutputQuantConfig]) -> nn.Module:
    """Give each named module an ``output_quantizer`` (an :class:`LSQQuantizer`) applied to its output
    by a forward hook, in place; uninitialised until :func:`~acs_hf.calibrate_quantizers`."""
    for name, config in outputs.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantize_outputs: the model has no module {name!r}") from None
        if isinstance(module, _CONTAINERS) or hasattr(module, "output_quantizer"):
            raise ValueError(f"quantize_outputs: module {name!r} cannot take an output quantizer")
        device = next((t.device for t in [*module.parameters(), *module.buffers()]), None)
        quantizer = LSQQuantizer(
            config.bits, signed=config.signed, compiled=config.compiled, name=f"{name}.output_quantizer"
        )
        module.output_quantizer = quantizer.to(device) if device is not None else quantizer
        if not forward_hook_count(module, _quantize_output):  # a copy of a quantized module keeps its hook
            module.register_forward_hook(_quantize_output)
    return model


def output_quantizers(model: nn.Module) -> list[tuple[str, LSQQuantizer]]:
    """``(module name, quantizer)`` for every output quantizer of ``model``."""
    return [
        (n, m.output_quantizer)
        for n, m in model.named_modules()
        if isinstance(getattr(m, "output_quantizer", None), LSQQuantizer)
    ]


def remove_output_quantizers(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize_outputs` in place: the quantizers and their forward hooks go."""
    for name, _ in output_quantizers(model):
        module = model.get_submodule(name)
        del module.output_quantizer
        remove_forward_hook(module, _quantize_output)
    return model
