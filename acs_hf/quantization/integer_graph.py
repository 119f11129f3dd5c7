"""The integer-graph placement: an LSQ quantizer on every tensor that an integer runtime needs in integer form.

ONNX Runtime runs an operation as an integer kernel only when each input comes out of a
``DequantizeLinear`` and (for most) its output goes into a ``QuantizeLinear`` (its QDQ selectors):
``QLinearConv``, ``QLinearAdd``, ``QLinearMul``, ``QLinearConcat``, and ``MatMulIntegerToFloat`` for a
matrix product of two activations, which needs no quantized output. The paper's placement quantizes
only the inputs of convolutions and linear layers. This placement adds LSQ quantizers, learnt like the
others, on the tensors of a ``torch.fx`` trace of the float model (timm's untraceable helpers kept as
leaves; attention that timm fuses traced unfused), so that

- both inputs and the output of every addition, product (a squeeze-excitation gate) and
  concatenation of computed tensors are quantized, and both operands of every matrix product of two
  computed tensors (a ViT's ``q @ k.transpose(-2, -1)`` and ``attn @ v``);
- a sum is quantized at the ReLU that alone reads it (unsigned codes after a ReLU equal quantizing
  the sum, and ONNX Runtime drops the ReLU), or else at the output of the block that returns it;
- every tensor is quantized once, where it is made: at the output of the module that makes it when
  that module is called once (a forward hook: ``bn2`` and ``downsample.1`` in a timm ResNet), else inside
  the forward that makes it (a *tensor site*, :mod:`.tensor_sites`: ``x + identity`` written as code, the
  output of torchvision's ``relu``, called three times a block); a layer whose input is quantized
  upstream (through max pooling, identity, dropout, flatten or a layout change) drops its own input
  quantizer, and a tensor that several quantized layers read is quantized once where it is made;
- a max pool, strided slice, zero pad or transpose of a quantized tensor keeps it on its grid, so the
  quantizer goes before it (the export quantizes its output again at the same step);
- codes are unsigned after a ReLU, a sigmoid or a softmax, signed elsewhere.

What cannot take a quantizer (an input made in a module that is itself called several times, or the
image) leaves its operation float, and :func:`plan_integer_graph` logs each with the reason.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from torch import fx, nn

from .graph_sites import GraphSites, integer_op, operands
from .lsq import check_bits
from .modules import LayerQuantConfig
from .output_quant import OutputQuantConfig

__all__ = ["IntegerGraphPlan", "plan_integer_graph"]

logger = logging.getLogger(__name__)


@dataclass
class IntegerGraphPlan:
    """What :func:`plan_integer_graph` decided.

    Attributes:
        layers: the per-layer settings, with the input quantizer dropped (``act_bits=None``) where the
            input is already quantized upstream.
        outputs: module name or tensor site (``"<scope>::<node>"``) -> its output quantizer.
        integer_ops: the operations made integer (``"add layer1.0 (add)"``: kind, owner, node).
        float_ops: the operations that stay float, each with the reason.
    """

    layers: dict[str, LayerQuantConfig]
    outputs: dict[str, OutputQuantConfig] = field(default_factory=dict)
    integer_ops: list[str] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)


def _describe(node: fx.Node) -> str:
    scope = list(node.meta.get("nn_module_stack", {}))
    return f"{integer_op(node)} {scope[-1] if scope else '<model>'} ({node.name})"


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
        The plan; operations that stay float are logged at WARNING with the reason.
    """
    check_bits("bits", bits)
    plan = IntegerGraphPlan(layers=dict(layers))
    try:
        sites = GraphSites(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure leaves the paper's placement
        reason = f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e})"
        logger.warning("integer_graph: %s; every addition and product stays float", reason)
        plan.float_ops.append(f"all: {reason}")
        return plan
    config = OutputQuantConfig(bits=bits, compiled=compiled)
    _place_integer_ops(sites, plan, config)
    _quantize_gate_inputs(sites, plan, config)
    _quantize_shared_inputs_once(sites, plan, config)
    _drop_inputs_quantized_upstream(sites, plan)
    _log_plan(plan, model)
    return plan


def _site_config(sites: GraphSites, node: fx.Node, config: OutputQuantConfig) -> OutputQuantConfig:
    # Signed codes unless a ReLU, sigmoid or softmax makes the tensor non-negative: calibration cannot
    # tell, since a zero-initialised BatchNorm (timm's last BN of a block) gives zeros.
    return replace(config, signed=not sites.non_negative(sites.root(node)))


def _place_integer_ops(sites: GraphSites, plan: IntegerGraphPlan, config: OutputQuantConfig) -> None:
    """Quantizers on the operands (and, but for a matrix product, the result) of every integer operation
    on computed tensors."""
    for node in sites.graph.nodes:
        kind = integer_op(node)
        tensors = operands(node) if kind is not None else []
        if len(tensors) < 2 or not all(sites.is_data(t) for t in tensors):
            continue
        if not node.users:  # ``out.add_(identity)`` as a statement: the code never reads the result node
            plan.float_ops.append(f"{_describe(node)}: its result is not read (in place); write x = x + y")
            continue
        # (which, the tensor, its site, the node whose value the quantizer sees: a sum's ReLU)
        needed = [(f"input {i}", t, sites.site(t), t) for i, t in enumerate(tensors)]
        if kind != "matmul":
            needed.append(("result", node, *sites.op_output(node)))
        missing = [(which, t) for which, t, site, _ in needed if site is None]
        if missing or len({site for _, _, site, _ in needed}) < len(needed):
            which, tensor = missing[0] if missing else ("inputs", None)
            plan.float_ops.append(f"{_describe(node)}: {_why_float(sites, which, tensor)}")
            continue
        for _, _, site, value in needed:
            plan.outputs.setdefault(site, _site_config(sites, value, config))
        plan.integer_ops.append(_describe(node))


def _why_float(sites: GraphSites, which: str, tensor: fx.Node | None) -> str:
    """Why ``tensor`` (the operation's ``which``) takes no quantizer."""
    if tensor is None:
        return "its inputs are the same tensor"
    root = sites.pass_through_root(tensor)
    if root.op == "placeholder" or not sites.is_data(root):
        return f"its {which} is the model's input or a constant"
    owner = sites.called_several_times(root)
    if owner is not None:
        return f"its {which} is made in {owner!r}, a module called several times (give each call a module of its own)"
    return (
        f"its {which} is made in a forward whose own trace (children as calls) cannot be traced or does not "
        "match the whole model's, or differs in training mode"
    )


def _quantize_gate_inputs(sites: GraphSites, plan: IntegerGraphPlan, config: OutputQuantConfig) -> None:
    """A quantized sigmoid (a squeeze-excitation gate) whose input a quantized layer makes gets that input
    quantized too: ONNX Runtime then runs the layer as an integer kernel and the sigmoid on codes."""
    for node in sites.graph.nodes:
        if not sites.is_sigmoid(node) or sites.site(node) not in plan.outputs or not node.args:
            continue
        layer = sites.pass_through_root(node.args[0])
        if isinstance(layer, fx.Node) and layer.op == "call_module" and layer.target in plan.layers:
            site = sites.site(layer)
            if site is not None:
                plan.outputs.setdefault(site, replace(config, signed=True))


def _quantize_shared_inputs_once(sites: GraphSites, plan: IntegerGraphPlan, config: OutputQuantConfig) -> None:
    """A tensor that several quantized layers read (ResNet's stem output, read by the first block's conv
    and shortcut conv) is quantized once at its producer, so that the producing conv has one output."""
    readers: dict[fx.Node, list[str]] = {}
    for node in sites.graph.nodes:
        setting = plan.layers.get(node.target) if node.op == "call_module" else None
        if setting is not None and setting.act_bits == config.bits and node.args:
            readers.setdefault(sites.pass_through_root(node.args[0]), []).append(node.target)
    for root, names in readers.items():
        if len(names) < 2 or not isinstance(root, fx.Node) or root.op != "call_module":
            continue  # v1's rule, for module outputs only: a shared function output keeps its readers' quantizers
        site = sites.site(root)
        if site is not None and site not in plan.outputs:
            plan.outputs[site] = _site_config(sites, root, config)


def _drop_inputs_quantized_upstream(sites: GraphSites, plan: IntegerGraphPlan) -> None:
    """A layer whose input is quantized upstream at its own bit width uses that quantizer, not one of its own."""
    for node in sites.graph.nodes:
        setting = plan.layers.get(node.target) if node.op == "call_module" else None
        if setting is None or setting.act_bits is None or not node.args:
            continue
        upstream = sites.quantized_upstream(node.args[0], plan.outputs)
        if upstream is not None and upstream.bits == setting.act_bits:
            plan.layers[node.target] = LayerQuantConfig(**{**setting.to_dict(), "act_bits": None, "act_signed": None})


def _log_plan(plan: IntegerGraphPlan, model: nn.Module) -> None:
    if not plan.float_ops and not plan.integer_ops:
        placed = f"only {len(plan.outputs)} output quantizer(s) placed" if plan.outputs else "nothing is placed"
        why = "an addition, product, concatenation or matrix product of two computed tensors"
        logger.warning("integer_graph: %s has no integer operation (%s): %s", type(model).__name__, why, placed)
    if plan.float_ops:
        more = len(plan.float_ops) - 4
        listed = "; ".join(plan.float_ops[:4]) + (f"; and {more} more" if more > 0 else "")
        total = len(plan.float_ops) + len(plan.integer_ops)
        logger.warning("integer_graph: %d of %d operations stay float: %s", len(plan.float_ops), total, listed)
    kinds = Counter(op.split(" ", 1)[0] for op in plan.integer_ops)
    logger.info(
        "integer_graph: integer %s; %d output quantizers",
        ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "nothing",
        len(plan.outputs),
    )
