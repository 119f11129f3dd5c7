"""Config -> prepare (swap modules) -> calibrate: the model-level quantization API."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .lsq import LSQQuantizer
from .modules import QuantConv2d, QuantLinear, QuantModule, is_quantizable

__all__ = [
    "QuantConfig",
    "quantize_model",
    "calibrate_quantizers",
    "quant_modules",
    "quantizers_initialized",
    "find_first_last",
]

logger = logging.getLogger(__name__)


def _check_bits(name: str, value: Any, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        accepted = "an integer in 2..8" + (" or None" if allow_none else "")
        raise ValueError(f"QuantConfig.{name} must be {accepted}, got {value!r}")


@dataclass
class QuantConfig:
    """What to quantize and at which bit widths.

    Args:
        weight_bits: bits of every conv/linear weight, 2..8.
        act_bits: bits of the inputs of those layers; ``None`` quantizes weights only (the paper's
            CIFAR-100 MobileNetV2 W2 setting).
        first_last_bits: bits of the first layer and the classifier (weights, and inputs when
            ``act_bits`` is set); ``None`` keeps both in full precision.
        per_channel_weights: one weight step per output channel instead of one per tensor.
        exclude: ``fnmatch`` patterns of module names to keep in full precision.
        compile_kernels: run the fake-quant math as ``torch.compile``-fused kernels: one pass over
            the data instead of several, which makes a W4A4 ResNet-18 CPU train step about 1.2x
            cheaper (see ``recipes/benchmark_speed.py``). Needs a working ``torch.compile`` (a C++
            compiler on CPU, triton on GPU); the first step pays the compile (tens of seconds).
    """

    weight_bits: int = 4
    act_bits: int | None = 4
    first_last_bits: int | None = 8
    per_channel_weights: bool = False
    exclude: list[str] = field(default_factory=list)
    compile_kernels: bool = False

    def __post_init__(self) -> None:
        _check_bits("weight_bits", self.weight_bits, allow_none=False)
        _check_bits("act_bits", self.act_bits, allow_none=True)
        _check_bits("first_last_bits", self.first_last_bits, allow_none=True)
        if not isinstance(self.per_channel_weights, bool):
            raise ValueError(f"QuantConfig.per_channel_weights must be a bool, got {self.per_channel_weights!r}")
        if not isinstance(self.compile_kernels, bool):
            raise ValueError(f"QuantConfig.compile_kernels must be a bool, got {self.compile_kernels!r}")
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude):
            raise ValueError(f"QuantConfig.exclude must be a list of strings, got {self.exclude!r}")
        self.exclude = list(self.exclude)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # nn.MultiheadAttention reads out_proj.weight directly, never calling the Linear's forward.
    skip = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in skip]


def find_first_last(model: nn.Module) -> tuple[str | None, set[str]]:
    """Names of the first layer and of the classifier layer(s).

    Taken from timm's ``pretrained_cfg`` (``first_conv``, ``classifier``) when those modules exist,
    otherwise the first conv/linear in module order and the last linear.
    """
    layers = dict(_candidates(model))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    if isinstance(first, (list, tuple)):
        first = first[0] if first else None
    if first not in layers:
        first = next(iter(layers), None)
    heads = cfg.get("classifier")
    heads = [heads] if isinstance(heads, str) else list(heads or [])
    last = {h for h in heads if h in layers}
    if not last:
        linears = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
        last = {linears[-1]} if linears else set()
    return first, last


def quantize_model(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Swap every quantizable ``Conv2d``/``Linear`` for its LSQ version, in place; return the model.

    The first layer and the classifier get ``config.first_last_bits`` (or stay FP when it is None);
    the first layer's input step is calibrated but not learnt (its input is the image). Modules
    matching ``config.exclude`` stay FP. The new quantizers are uninitialised: call
    :func:`calibrate_quantizers` before training or scoring.
    """
    config = config or QuantConfig()
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise ValueError("quantize_model: the model is already quantized")
    first, last = find_first_last(model)
    skipped = []
    for name, module in _candidates(model):
        if any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            continue
        if not is_quantizable(module):
            skipped.append(f"{name} ({type(module).__name__})")
            continue
        if name == first or name in last:
            if config.first_last_bits is None:
                continue
            w_bits = config.first_last_bits
            a_bits = config.first_last_bits if config.act_bits is not None else None
        else:
            w_bits, a_bits = config.weight_bits, config.act_bits
        cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        qmodule = cls.from_float(
            module, w_bits, a_bits, per_channel=config.per_channel_weights, compiled=config.compile_kernels
        )
        for q in qmodule.quantizers():
            q.name = f"{name}.{'weight' if q is qmodule.weight_quantizer else 'input'}_quantizer"
        if name == first and qmodule.input_quantizer is not None:
            # The first layer's input is the (8-bit) image: a learnt step would cost a whole extra
            # conv backward (the gradient w.r.t. the image) for no benefit. Calibrated, then fixed.
            qmodule.input_quantizer.step.requires_grad_(False)
        model.set_submodule(name, qmodule)
    if skipped:
        logger.warning("Left in full precision (unsupported layer types): %s", ", ".join(skipped))
    model.quant_config = config
    return model


def quant_modules(model: nn.Module) -> list[tuple[str, QuantModule]]:
    """``(name, module)`` for every quantized layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]


def quantizers_initialized(model: nn.Module) -> bool:
    """True when the model has quantizers and all of them are initialised."""
    qs = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
    return bool(qs) and all(q.is_initialized for q in qs)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    raise TypeError(f"calibrate_quantizers: a batch must be a Tensor or a mapping of model kwargs, got {type(batch)}")


@torch.no_grad()
def calibrate_quantizers(
    model: nn.Module, batches: Iterable[torch.Tensor | Mapping[str, Any]], num_batches: int | None = None
) -> nn.Module:
    """Initialise every LSQ step from data.

    Weight steps come from the weights; activation steps (and their signedness, where left to the
    data) from the inputs each layer sees over ``batches`` (at most ``num_batches``), with
    activations passed through in full precision meanwhile. Runs in eval mode without gradients
    and restores the previous train/eval modes. A batch is a Tensor (passed positionally) or a
    mapping of keyword arguments.
    """
    qmods = quant_modules(model)
    if not qmods:
        raise ValueError("calibrate_quantizers: the model has no quantized layers; call quantize_model first")
    for _, m in qmods:
        m.weight_quantizer.init_from(m.weight)
    act_qs = [m.input_quantizer for _, m in qmods if m.input_quantizer is not None]
    if not act_qs:
        return model
    modes = {m: m.training for m in model.modules()}
    device = next(model.parameters()).device
    model.eval()
    for q in act_qs:
        q.start_observing()
    seen = 0
    try:
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            batch = _to_device(batch, device)
            model(**batch) if isinstance(batch, Mapping) else model(batch)
            seen += 1
        if seen == 0:
            raise ValueError("calibrate_quantizers: `batches` yielded no data")
        for q in act_qs:
            q.finish_observing()
    finally:
        for q in act_qs:
            q._observing = False
        for m, training in modes.items():
            m.training = training
    return model
