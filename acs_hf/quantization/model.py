"""Config -> prepare (swap modules) -> calibrate: the model-level quantization API."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .integer_graph import plan_integer_graph
from .lsq import LSQQuantizer, check_bits
from .modules import LayerQuantConfig, QuantModule, is_quantizable, quant_class_for
from .output_quant import output_quantizers, quantize_outputs, remove_output_quantizers

__all__ = [
    "QuantConfig",
    "quantize_model",
    "quantize_layers",
    "dequantize_model",
    "calibrate_quantizers",
    "quant_modules",
    "quantizers_initialized",
    "find_first_last",
]

logger = logging.getLogger(__name__)


@dataclass
class QuantConfig:
    """What to quantize and at which bit widths. The one schema of the quantization settings: the
    recipe's ``HfArgumentParser`` reads this dataclass directly (``--weight_bits 2`` or YAML).

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
        integer_graph: also quantize every tensor an integer runtime needs in integer form (the inputs
            and output of each addition, product and concatenation of computed tensors, the operands of
            attention matmuls, the stem's output; each tensor once, where it is made), so that ONNX
            Runtime runs convolutions, residual additions, squeeze-excitation products, concatenations
            and a ViT's matmuls as integer kernels (:mod:`acs_hf.quantization.integer_graph`). Needs
            ``act_bits``. Off: the paper's placement.
    """

    weight_bits: int = field(default=4, metadata={"help": "Weight bits, 2..8."})
    # ``| str``: HfArgumentParser types an ``int | None`` flag as int, refusing ``--act_bits null``.
    act_bits: int | str | None = field(default=4, metadata={"help": "Activation bits, 2..8; null: weights only."})
    first_last_bits: int | str | None = field(
        default=8, metadata={"help": "Bits of the first layer and the classifier; null keeps them FP."}
    )
    per_channel_weights: bool = field(default=False, metadata={"help": "One weight step per output channel."})
    exclude: list[str] = field(default_factory=list, metadata={"help": "Module-name patterns kept in FP."})
    compile_kernels: bool = field(default=False, metadata={"help": "torch.compile-fused LSQ kernels."})
    integer_graph: bool = field(
        default=False,
        metadata={
            "help": "Also quantize the tensors of additions, products, concatenations and attention matmuls "
            "(each once, where it is made), so that ONNX Runtime runs them and the convs and linears as integer "
            "kernels; needs act_bits."
        },
    )

    def __post_init__(self) -> None:
        self.act_bits, self.first_last_bits = _optional_bits(self.act_bits), _optional_bits(self.first_last_bits)
        check_bits("QuantConfig.weight_bits", self.weight_bits)
        check_bits("QuantConfig.act_bits", self.act_bits, allow_none=True)
        check_bits("QuantConfig.first_last_bits", self.first_last_bits, allow_none=True)
        if not isinstance(self.per_channel_weights, bool):
            raise ValueError(f"QuantConfig.per_channel_weights must be a bool, got {self.per_channel_weights!r}")
        if not isinstance(self.compile_kernels, bool):
            raise ValueError(f"QuantConfig.compile_kernels must be a bool, got {self.compile_kernels!r}")
        if not isinstance(self.integer_graph, bool):
            raise ValueError(f"QuantConfig.integer_graph must be a bool, got {self.integer_graph!r}")
        if self.integer_graph and self.act_bits is None:
            raise ValueError(
                "QuantConfig.integer_graph=True quantizes activations and needs act_bits (2..8), got act_bits=None"
            )
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude or []):
            raise ValueError(f"QuantConfig.exclude must be a list of strings, got {self.exclude!r}")
        self.exclude = list(self.exclude or [])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def layer_configs(self, model: nn.Module) -> dict[str, LayerQuantConfig]:
        """The per-layer settings ``quantize_model`` applies to ``model``: first layer and
        classifier at ``first_last_bits`` (the first layer's input step fixed after calibration:
        its input is the image, and a learnt step would cost a whole extra conv backward), layers
        matching ``exclude`` or of unsupported types left out."""
        first, last = find_first_last(model)
        out, skipped = {}, []
        for name, module in _candidates(model):
            if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
                continue
            if not is_quantizable(module):
                skipped.append(f"{name} ({type(module).__name__})")
                continue
            w_bits, a_bits = self.weight_bits, self.act_bits
            if name == first or name in last:
                if self.first_last_bits is None:
                    continue
                w_bits = self.first_last_bits
                a_bits = self.first_last_bits if self.act_bits is not None else None
            out[name] = LayerQuantConfig(
                weight_bits=w_bits,
                act_bits=a_bits,
                per_channel=self.per_channel_weights,
                compiled=self.compile_kernels,
                learn_input_step=name != first,
            )
        if skipped:
            logger.warning("Left in full precision (unsupported layer types): %s", ", ".join(skipped))
        return out


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


def _optional_bits(value: Any) -> Any:
    """A bit width as the command line gives it: "4" -> 4, "null" / "none" -> None (YAML gives
    int or None already); anything else is left for ``check_bits`` to refuse."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if text in ("null", "none"):
        return None
    return int(text) if text.isdecimal() else value


def quantize_model(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Swap every quantizable ``Conv2d``/``Linear`` for its LSQ version, in place; return the model.

    See :meth:`QuantConfig.layer_configs` for which layers get which settings; with
    ``config.integer_graph`` modules also get output quantizers (:func:`plan_integer_graph`). The new
    quantizers are uninitialised: call :func:`calibrate_quantizers` before training or scoring.
    """
    config = config or QuantConfig()
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise ValueError("quantize_model: the model is already quantized")
    layers, outputs = config.layer_configs(model), {}
    if config.integer_graph:
        plan = plan_integer_graph(model, layers, config.act_bits, compiled=config.compile_kernels)
        layers, outputs = plan.layers, plan.outputs
    quantize_layers(model, layers)
    return quantize_outputs(model, outputs)


def quantize_layers(model: nn.Module, layers: Mapping[str, LayerQuantConfig]) -> nn.Module:
    """Swap the named layers for their LSQ versions with the given per-layer settings, in place."""
    for name, layer_config in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantize_layers: the model has no layer {name!r}") from None
        cls = quant_class_for(module)
        if cls is None:
            raise ValueError(f"quantize_layers: {name!r} is a {type(module).__name__}, not a Conv2d or Linear")
        model.set_submodule(name, cls.from_float(module, layer_config, name=name))
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize_model` in place: every quantized layer becomes its float layer again,
    with the same (latent, unquantized) Parameters; the quantizers (output quantizers too) are dropped."""
    for name, module in quant_modules(model):
        model.set_submodule(name, module.to_float())
    return remove_output_quantizers(model)


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
    data) from the inputs each layer sees (and the outputs that output quantizers see) over
    ``batches`` (at most ``num_batches``), with
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
    act_qs += [q for _, q in output_quantizers(model)]
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
            q.stop_observing()
        for m, training in modes.items():
            m.training = training
    return model
