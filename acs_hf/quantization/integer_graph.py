"""The integer-graph placement: an LSQ quantizer on every tensor that an integer runtime needs in integer form.

ONNX Runtime runs a Conv as an integer kernel (``QLinearConv``) only when its input comes out of a
``DequantizeLinear`` and its output goes into a ``QuantizeLinear``, and a residual ``Add`` as
``QLinearAdd`` only when both inputs and its output are quantized (its QDQ selectors; TensorRT and
NNCF place quantizers the same way). The paper's placement quantizes only the inputs of convolutions
and linear layers, so every convolution that feeds a residual addition, and the additions themselves,
stay float. This placement adds LSQ quantizers, learnt like the others, so that

- both inputs of every residual addition are quantized: the module that produces each one gets an
  *output quantizer* (for ResNet: ``bn2`` and ``downsample.1``);
- the addition's output is quantized: at the ReLU that follows it (``act2``: quantizing after the
  ReLU with unsigned codes equals quantizing the sum, and ONNX Runtime drops the ReLU), or else at the
  output of the block that returns it (MobileNetV2 / EfficientNet inverted residuals);
- every tensor is quantized once: a quantized layer whose input is already quantized upstream (through
  max pooling, identity, dropout or flatten) drops its own input quantizer, so a block's output is
  quantized once and shared by the next block's convolutions and its shortcut;
- a tensor that several quantized layers read is quantized once where it is made (ResNet's stem
  output, read by the first block's convolution and its shortcut convolution);
- a max pool's input is quantized rather than its output (max commutes with quantization), so the stem
  convolution also gets an integer output;
- strided slicing and zero padding keep a quantized tensor on its grid (zero is a code of every grid), so
  a CIFAR ResNet's option-A shortcut (``F.pad(x[:, :, ::2, ::2], ...)``) reads the block input's
  quantizer and needs none of its own; the export quantizes its output again at the same step.

The additions are found in a ``torch.fx`` trace of the float model (``timm``'s untraceable helpers
kept as leaves): any ``add`` of two computed tensors. An addition whose three tensors cannot all carry
a quantizer (a module called twice, an input computed by a function rather than a module, a sum used
inside the block that makes it, as in a ViT) stays float, and :func:`plan_integer_graph` logs it.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from .lsq import check_bits
from .modules import LayerQuantConfig
from .output_quant import OutputQuantConfig

__all__ = ["IntegerGraphPlan", "plan_integer_graph"]

logger = logging.getLogger(__name__)

#: Modules whose output equals their input, or a selection of its elements: a quantized input stays quantized.
_PASS_THROUGH = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Identity, nn.Dropout, nn.Flatten)
#: Of those, the ones that compute something (the quantizer goes before them, shared with what follows).
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_NON_NEGATIVE = (nn.ReLU, nn.ReLU6)
_ADDS = {operator.add, operator.iadd, torch.add}
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _keeps_grid(node: fx.Node) -> bool:
    """A function that only selects elements or pads with zeros: a quantized input stays quantized, on
    the same grid (``x[:, :, ::2, ::2]``, ``F.pad(x, pads)`` with the constant 0)."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.target is operator.getitem:
        index = node.args[1] if len(node.args) > 1 else None
        index = index if isinstance(index, tuple) else (index,)
        return all(
            i is None
            or i is Ellipsis
            or (isinstance(i, slice) and not any(isinstance(v, fx.Node) for v in (i.start, i.stop, i.step)))
            for i in index
        )
    if node.target is torch.nn.functional.pad:
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        return mode == "constant" and value in (None, 0)
    return False


@dataclass
class IntegerGraphPlan:
    """What :func:`plan_integer_graph` decided.

    Attributes:
        layers: the per-layer settings, with the input quantizer dropped (``act_bits=None``) where the
            input is already quantized upstream.
        outputs: module name -> its output quantizer.
        integer_adds: the residual additions made integer (named by the module that holds them).
        float_adds: the additions that stay float, each with the reason.
    """

    layers: dict[str, LayerQuantConfig]
    outputs: dict[str, OutputQuantConfig] = field(default_factory=dict)
    integer_adds: list[str] = field(default_factory=list)
    float_adds: list[str] = field(default_factory=list)


def _trace(model: nn.Module) -> fx.Graph:
    """``torch.fx`` graph of ``model`` with timm's untraceable modules and functions kept opaque."""
    from timm.layers import get_notrace_functions, get_notrace_modules

    leaves = tuple(get_notrace_modules())

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    tracer = _Tracer(autowrap_functions=tuple(get_notrace_functions()))
    was_training = model.training
    try:
        return tracer.trace(model.eval())  # the graph alone: no GraphModule copy of the model is needed
    finally:
        model.train(was_training)


def _is_residual_add(node: fx.Node) -> bool:
    """An addition of two computed tensors (not of a parameter, a buffer or a number)."""
    is_add = (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    args = node.args[:2]
    return is_add and len(args) == 2 and all(isinstance(a, fx.Node) and a.op != "get_attr" for a in args)


class _Planner:
    """One pass over the traced graph: where each residual addition's three tensors get quantized."""

    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.model = model
        self.graph = graph
        self.calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        self.scope_outputs: dict[str, set[fx.Node]] = {}
        for node in graph.nodes:
            for path in node.meta.get("nn_module_stack", {}):
                if any(path not in u.meta.get("nn_module_stack", {}) for u in node.users):
                    self.scope_outputs.setdefault(path, set()).add(node)

    def _module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def _hookable(self, name: str) -> bool:
        """A module called once, not a container, not an opaque graph root: its output can be quantized."""
        return bool(name) and self.calls.get(name, 1) == 1 and not isinstance(self._module(name), _CONTAINERS)

    def tensor_site(self, node: fx.Node) -> str | None:
        """The module whose output quantizer quantizes the tensor ``node`` (``None`` when none can); an
        identity whose input cannot be quantized where it is made quantizes its own output."""
        start = node
        while self._quantize_before(node):
            node = node.args[0]  # quantize the input: max, slicing, zero padding and identity keep the grid
            if not isinstance(node, fx.Node):
                return None
        if node.op == "call_module":
            site = node.target if self._hookable(node.target) else None
        else:
            site = self.add_output_site(node) if _is_residual_add(node) else None
        if site is None and start is not node and start.op == "call_module" and self._hookable(start.target):
            return start.target if type(self._module(start.target)) is nn.Identity else None
        return site

    def _quantize_before(self, node: fx.Node) -> bool:
        """Whether ``node``'s tensor is quantized at its input instead: a max pool, a strided slice or zero
        pad, or an identity whose input other nodes read too (one quantizer for the shared tensor; a
        block's identity shortcut, as in a CIFAR ResNet)."""
        if _keeps_grid(node):
            return True
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        module = self._module(node.target)
        return isinstance(module, _POOLS) or (type(module) is nn.Identity and len(node.args[0].users) > 1)

    def add_output_site(self, node: fx.Node) -> str | None:
        """Where the sum ``node`` is quantized: the ReLU that alone consumes it, else the innermost
        module whose forward returns it (and nothing else)."""
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and self._hookable(users[0].target):
            if type(self._module(users[0].target)) is nn.ReLU:
                return users[0].target
        for path in reversed(list(node.meta.get("nn_module_stack", {}))):
            if self.scope_outputs.get(path) == {node}:
                return path if self._hookable(path) else None
        return None

    def _passes_through(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self._module(node.target), _PASS_THROUGH)
        return _keeps_grid(node) or (
            node.op in ("call_function", "call_method") and node.target in (torch.flatten, "flatten")
        )

    def pass_through_root(self, node: Any) -> Any:
        """The tensor ``node`` is read from, looking through pass-through modules."""
        while isinstance(node, fx.Node) and self._passes_through(node) and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        return node

    def quantized_upstream(self, node: Any, outputs: Mapping[str, OutputQuantConfig]) -> OutputQuantConfig | None:
        """The output quantizer that already quantizes the tensor ``node``, looking through pass-through modules."""
        while isinstance(node, fx.Node):
            site = self.tensor_site(node)
            if site in outputs:
                return outputs[site]
            if not self._passes_through(node):
                return None
            node = node.args[0]
        return None


def _describe(node: fx.Node) -> str:
    scope = list(node.meta.get("nn_module_stack", {}))
    return f"{scope[-1] if scope else '<model>'} ({node.name})"


def plan_integer_graph(
    model: nn.Module, layers: Mapping[str, LayerQuantConfig], bits: int, compiled: bool = False
) -> IntegerGraphPlan:
    """Plan the integer-graph placement (module docstring) for the float ``model``.

    Args:
        model: the float model, before :func:`~acs_hf.quantize_layers` swaps its layers.
        layers: the per-layer settings of the paper's placement (:meth:`QuantConfig.layer_configs`).
        bits: bits of the new activation quantizers (the model's activation bits).
        compiled: ``torch.compile``-fused fake-quant kernels for them.

    Returns:
        The plan; additions that stay float are logged at WARNING with the reason.
    """
    check_bits("bits", bits)
    plan = IntegerGraphPlan(layers=dict(layers))
    try:
        graph = _trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure leaves the paper's placement
        reason = f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e})"
        logger.warning("integer_graph: %s; every residual addition stays float", reason)
        plan.float_adds.append(f"all: {reason}")
        return plan
    planner = _Planner(model, graph)
    config = OutputQuantConfig(bits=bits, compiled=compiled)
    _place_additions(planner, plan, config)
    _quantize_shared_inputs_once(planner, plan, config)
    _drop_inputs_quantized_upstream(planner, plan)
    _log_plan(plan, model)
    return plan


def _site_config(model: nn.Module, site: str, config: OutputQuantConfig) -> OutputQuantConfig:
    # Signed codes unless a ReLU makes the tensor non-negative: calibration cannot tell, since a
    # zero-initialised BatchNorm (timm's last BN of a block) gives zeros.
    return replace(config, signed=not isinstance(model.get_submodule(site), _NON_NEGATIVE))


def _place_additions(planner: _Planner, plan: IntegerGraphPlan, config: OutputQuantConfig) -> None:
    """Output quantizers on both inputs and the sum of every residual addition that can take them."""
    for node in planner.graph.nodes:
        if not _is_residual_add(node):
            continue
        sites = [planner.tensor_site(a) for a in node.args[:2]] + [planner.add_output_site(node)]
        if None in sites or sites[0] == sites[1]:
            which = ["first input", "second input", "sum"][sites.index(None)] if None in sites else "inputs"
            plan.float_adds.append(f"{_describe(node)}: {_why_float(planner, node, which)}")
            continue
        for site in sites:
            plan.outputs.setdefault(site, _site_config(planner.model, site, config))
        plan.integer_adds.append(_describe(node))


def _why_float(planner: _Planner, node: fx.Node, which: str) -> str:
    """Why the addition ``node``'s ``which`` takes no quantizer (torchvision's ResNet reuses one ``relu``)."""
    users = list(node.users)
    tensor = {"first input": node.args[0], "second input": node.args[1], "sum": users[0] if len(users) == 1 else None}
    tensor = planner.pass_through_root(tensor.get(which))
    calls = planner.calls.get(tensor.target, 1) if isinstance(tensor, fx.Node) and tensor.op == "call_module" else 1
    if calls > 1:
        return (
            f"its {which} {'goes into' if which == 'sum' else 'comes out of'} {tensor.target!r}, a module called "
            f"{calls} times (an output quantizer would serve every call; give each call a module of its own)"
        )
    return f"its {which} is not the output of a module called once"


def _quantize_shared_inputs_once(planner: _Planner, plan: IntegerGraphPlan, config: OutputQuantConfig) -> None:
    """A tensor that several quantized layers read (ResNet's stem output, read by the first block's conv
    and shortcut conv) is quantized once at its producer, so that the producing conv has one output."""
    readers: dict[Any, list[str]] = {}
    for node in planner.graph.nodes:
        setting = plan.layers.get(node.target) if node.op == "call_module" else None
        if setting is not None and setting.act_bits == config.bits and node.args:
            readers.setdefault(planner.pass_through_root(node.args[0]), []).append(node.target)
    for root, names in readers.items():
        site = planner.tensor_site(root) if len(names) > 1 and isinstance(root, fx.Node) else None
        if site is not None and site not in plan.outputs:
            plan.outputs[site] = _site_config(planner.model, site, config)


def _drop_inputs_quantized_upstream(planner: _Planner, plan: IntegerGraphPlan) -> None:
    """A layer whose input is quantized upstream at its own bit width uses that quantizer, not one of its own."""
    for node in planner.graph.nodes:
        setting = plan.layers.get(node.target) if node.op == "call_module" else None
        if setting is None or setting.act_bits is None or not node.args:
            continue
        upstream = planner.quantized_upstream(node.args[0], plan.outputs)
        if upstream is not None and upstream.bits == setting.act_bits:
            plan.layers[node.target] = LayerQuantConfig(**{**setting.to_dict(), "act_bits": None, "act_signed": None})


def _log_plan(plan: IntegerGraphPlan, model: nn.Module) -> None:
    if not plan.float_adds and not plan.integer_adds:
        placed = f"only {len(plan.outputs)} output quantizer(s) placed" if plan.outputs else "nothing is placed"
        why = "an addition of two computed tensors; DenseNet, for one, concatenates"
        logger.warning("integer_graph: %s has no residual addition (%s): %s", type(model).__name__, why, placed)
    if plan.float_adds:
        more = len(plan.float_adds) - 4
        listed = "; ".join(plan.float_adds[:4]) + (f"; and {more} more" if more > 0 else "")
        total = len(plan.float_adds) + len(plan.integer_adds)
        logger.warning("integer_graph: %d of %d residual additions stay float: %s", len(plan.float_adds), total, listed)
    logger.info(
        "integer_graph: %d residual additions integer, %d output quantizers", len(plan.integer_adds), len(plan.outputs)
    )
