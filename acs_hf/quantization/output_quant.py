"""Output quantizers: an LSQ quantizer on a module's output (applied by a forward hook) or on a
tensor made inside a module's forward (a site ``"<scope>::<node>"``, :mod:`.tensor_sites`).

The integer-graph placement (:mod:`~acs_hf.quantization.integer_graph`) decides which modules and
tensors get one; the checkpoint (``outputs`` table), the export and :func:`~acs_hf.dequantize_model`
find them here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..utils.upstream import forward_hook_count, remove_forward_hook
from .lsq import LSQQuantizer, check_bits
from .modules import QuantModule
from .tensor_sites import (
    SiteForward,
    is_site,
    node_of_key,
    quantizer_key,
    restore_forward,
    restore_fused_attention,
    rewrite_forward,
    site_name,
    split_site,
    trace,
    unfuse_attention,
)

__all__ = [
    "OutputQuantConfig",
    "quantize_outputs",
    "output_quantizers",
    "remove_output_quantizers",
    "set_output_quantizer",
]

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


def _new_quantizer(config: OutputQuantConfig, name: str, module: nn.Module) -> LSQQuantizer:
    device = next((t.device for t in [*module.parameters(), *module.buffers()]), None)
    label = name if is_site(name) else f"{name}.output_quantizer"
    quantizer = LSQQuantizer(config.bits, signed=config.signed, compiled=config.compiled, name=label)
    return quantizer.to(device) if device is not None else quantizer


def _scope(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"quantize_outputs: the model has no module {name!r}") from None


def quantize_outputs(model: nn.Module, outputs: Mapping[str, OutputQuantConfig]) -> nn.Module:
    """Give each named module an ``output_quantizer`` (an :class:`LSQQuantizer`) applied to its output
    by a forward hook, and each tensor site ``"<scope>::<node>"`` a quantizer in its scope's forward,
    in place; uninitialised until :func:`~acs_hf.calibrate_quantizers`. Everything is checked (and each
    scope's forward generated) before the model is changed."""
    sites: dict[str, list[str]] = {}
    hooked = []
    for name in outputs:
        if is_site(name):
            scope, node = split_site(name)
            _scope(model, scope)
            sites.setdefault(scope, []).append(node)
            continue
        module = _scope(model, name)
        if isinstance(module, _CONTAINERS) or hasattr(module, "output_quantizer"):
            raise ValueError(f"quantize_outputs: module {name!r} cannot take an output quantizer")
        hooked.append(name)
    forwards = {}
    if sites:
        _, calls = trace(model, leaves=(QuantModule, LSQQuantizer))  # the arguments each scope is called with
        for scope, nodes in sites.items():
            forwards[scope] = SiteForward(model.get_submodule(scope), scope, tuple(nodes), calls.get(scope, {})).build()
    for name in hooked:
        module = model.get_submodule(name)
        module.output_quantizer = _new_quantizer(outputs[name], name, module)
        if not forward_hook_count(module, _quantize_output):  # a copy of a quantized module keeps its hook
            module.register_forward_hook(_quantize_output)
        _unfuse_attention_above(model, name)  # fused attention would skip the hooks inside it
    for scope, forward in forwards.items():
        module = model.get_submodule(scope)
        quantizers = {
            n: _new_quantizer(outputs[site_name(scope, n)], site_name(scope, n), module) for n in forward.nodes
        }
        rewrite_forward(module, forward, quantizers)
    return model


def _unfuse_attention_above(model: nn.Module, name: str) -> None:
    parts = name.split(".")
    for i in range(len(parts)):
        unfuse_attention(model.get_submodule(".".join(parts[:i])))


def output_quantizers(model: nn.Module) -> list[tuple[str, LSQQuantizer]]:
    """``(module name or tensor site, quantizer)`` for every output quantizer of ``model``."""
    found = []
    for n, m in model.named_modules():
        if isinstance(getattr(m, "output_quantizer", None), LSQQuantizer):
            found.append((n, m.output_quantizer))
        if isinstance(getattr(m, "tensor_quantizers", None), nn.ModuleDict):
            found += [(site_name(n, node_of_key(key)), q) for key, q in m.tensor_quantizers.items()]
    return found


def set_output_quantizer(model: nn.Module, name: str, quantizer: nn.Module) -> None:
    """Put ``quantizer`` in the place of the output quantizer ``name`` (the export's stand-ins)."""
    if is_site(name):
        scope, node = split_site(name)
        model.get_submodule(scope).tensor_quantizers[quantizer_key(node)] = quantizer
    else:
        model.get_submodule(name).output_quantizer = quantizer


def remove_output_quantizers(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize_outputs` in place: the quantizers and their forward hooks go, and every
    rewritten forward is the class's again."""
    for name, _ in output_quantizers(model):
        if is_site(name):
            restore_forward(model.get_submodule(split_site(name)[0]))
            continue
        module = model.get_submodule(name)
        del module.output_quantizer
        remove_forward_hook(module, _quantize_output)
    for module in model.modules():  # attention that quantize_outputs unfused for hooks inside it
        restore_fused_attention(module)
    return model
