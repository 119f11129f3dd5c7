"""Reading a traced float model for the integer-graph placement: which nodes are integer operations,
which tensors they need quantized, and where each such tensor can take its quantizer.

A tensor takes its quantizer at the output of the module that makes it when that module is called
once (a forward hook, :mod:`.output_quant`), else where it is made inside a module's forward (a
tensor site, :mod:`.tensor_sites`): the node's *owner*, the innermost module whose own forward
computes it, called once. A node of the whole-model trace is matched to its node in the owner's
own trace by its rank among the owner's nodes of the same kind.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .tensor_sites import site_name, trace

__all__ = ["GraphSites", "integer_op", "operands"]

_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_MULS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}
_CATS = {torch.cat, torch.concat, torch.concatenate}
#: Modules whose output equals their input, or a selection of its elements: a quantized input stays quantized.
_PASS_THROUGH = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Identity, nn.Dropout, nn.Flatten)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_NON_NEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
_NON_NEGATIVE_FUNCTIONS = {torch.relu, F.relu, F.relu6, torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.softmax}
_NON_NEGATIVE_FUNCTIONS |= {F.softmax, "relu", "relu_", "sigmoid", "softmax"}
#: Layout ops: the same codes moved (ONNX Runtime drops the Q / DQ pair around them).
_LAYOUT = {torch.flatten, torch.transpose, torch.permute, torch.reshape}
_LAYOUT |= {"flatten", "transpose", "permute", "reshape", "view", "contiguous"}
_SHAPE_QUERIES = {"size", "dim", "numel"}
_RELUS = {torch.relu, F.relu, F.relu6, "relu", "relu_"}


def integer_op(node: fx.Node) -> str | None:
    """``"add"``, ``"mul"``, ``"cat"`` or ``"matmul"`` for a node of that operation (data or not)."""
    if node.op not in ("call_function", "call_method"):
        return None
    for kind, targets in (("add", _ADDS), ("mul", _MULS), ("matmul", _MATMULS), ("cat", _CATS)):
        if node.target in targets:
            return kind
    return None


def operands(node: fx.Node) -> list[Any]:
    """The tensors an integer operation reads (a concatenation's list, else its first two arguments)."""
    if integer_op(node) == "cat":
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        return list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]
    return list(node.args[:2])


def keeps_grid(node: fx.Node) -> bool:
    """A function that only selects elements, pads with zeros or moves them (``x[:, :, ::2, ::2]``,
    ``F.pad(x, pads)`` with the constant 0, ``k.transpose(-2, -1)``): a quantized input stays quantized."""
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.target in _LAYOUT:
        return True
    if node.target is operator.getitem:
        index = node.args[1] if len(node.args) > 1 else None
        index = index if isinstance(index, tuple) else (index,)
        return all(
            i is None
            or i is Ellipsis
            or (isinstance(i, slice) and not any(isinstance(v, fx.Node) for v in (i.start, i.stop, i.step)))
            for i in index
        )
    if node.target is F.pad:
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        return mode == "constant" and value in (None, 0)
    return False


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return True
    return (node.op == "call_method" and node.target in _SHAPE_QUERIES) or node.target is len


def _is_relu(node: fx.Node, sites: GraphSites) -> bool:
    if node.op == "call_module":
        return type(sites.module(node.target)) in (nn.ReLU, nn.ReLU6)
    return node.op in ("call_function", "call_method") and node.target in _RELUS


def _owner_keys(node: fx.Node) -> list[str]:
    keys = list(node.meta.get("nn_module_stack", {}))
    return keys[:-1] if node.op == "call_module" else keys


class GraphSites:
    """The whole-model trace of a float ``model`` and where its tensors can be quantized."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.graph, self.call_args = trace(model)
        self.calls = Counter(n.target for n in self.graph.nodes if n.op == "call_module")
        self.data: set[fx.Node] = set()  # nodes whose value is computed from the input (not shapes, not weights)
        self.scope_outputs: dict[str, set[fx.Node]] = {}
        for node in self.graph.nodes:
            if node.op == "placeholder" or (
                any(a in self.data for a in node.all_input_nodes) and not _is_shape_query(node)
            ):
                self.data.add(node)
            for path in node.meta.get("nn_module_stack", {}):
                if any(path not in u.meta.get("nn_module_stack", {}) for u in node.users):
                    self.scope_outputs.setdefault(path, set()).add(node)
        paths = {path for node in self.graph.nodes for path in node.meta.get("nn_module_stack", {})}
        self.scope_calls = Counter(path.split("@")[0] for path in paths)  # a module's calls, traced through or not
        self._local: dict[str, dict[tuple, list[str | None]]] = {}

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def is_data(self, value: Any) -> bool:
        return isinstance(value, fx.Node) and value in self.data

    def hookable(self, name: str) -> bool:
        """A module called once, not a container: its output can take a forward hook's quantizer."""
        calls = max(self.calls.get(name, 1), self.scope_calls.get(name, 1))
        return bool(name) and calls == 1 and not isinstance(self.module(name), _CONTAINERS)

    def called_several_times(self, node: fx.Node) -> str | None:
        """The module among ``node``'s owners that is called more than once, if any."""
        return next((k for k in map(lambda k: k.split("@")[0], _owner_keys(node)) if self.scope_calls[k] > 1), None)

    # -- where a tensor is quantized ---------------------------------------------------------------
    def quantize_before(self, node: fx.Node) -> bool:
        """Whether ``node``'s tensor is quantized at its input instead: a max pool, a strided slice, zero
        pad or layout change, or an identity whose input other nodes read too (one quantizer for the
        shared tensor; a block's identity shortcut, as in a CIFAR ResNet)."""
        if keeps_grid(node):
            return True
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        module = self.module(node.target)
        return isinstance(module, _POOLS) or (type(module) is nn.Identity and len(node.args[0].users) > 1)

    def root(self, node: Any) -> Any:
        """The tensor whose quantizer quantizes ``node`` (looking back through :meth:`quantize_before`)."""
        while isinstance(node, fx.Node) and self.quantize_before(node):
            node = node.args[0]
        return node

    def site(self, node: Any) -> str | None:
        """Where the tensor ``node`` is quantized: a module name, a tensor site or ``None`` (module docstring)."""
        start, node, site = node, self.root(node), None
        if self.is_data(node) and node.op != "placeholder":
            if node.op == "call_module" and self.hookable(node.target):
                site = node.target
            elif integer_op(node) in ("add", "mul", "cat"):
                site = self.op_output(node)[0]
            else:
                site = self.tensor_site(node)
        if site is None and start is not node and start.op == "call_module" and self.hookable(start.target):
            # an identity whose input takes no quantizer quantizes its own output
            return start.target if type(self.module(start.target)) is nn.Identity else None
        return site

    def op_output(self, node: fx.Node) -> tuple[str | None, fx.Node]:
        """Where the result of an addition, product or concatenation is quantized, and the node whose
        value that quantizer sees: the ReLU that alone reads it (unsigned codes after a ReLU equal
        quantizing the sum; ONNX Runtime drops the ReLU), else the innermost module whose forward returns
        it (and nothing else), else in place."""
        users = list(node.users)
        if len(users) == 1 and _is_relu(users[0], self):
            relu = users[0]
            site = relu.target if relu.op == "call_module" and self.hookable(relu.target) else self.tensor_site(relu)
            if site is not None:
                return site, relu
        for path in reversed(list(node.meta.get("nn_module_stack", {}))):
            if self.scope_outputs.get(path) == {node} and "@" not in path and self.hookable(path):
                return path, node
        return self.tensor_site(node), node

    def non_negative(self, node: Any, follow: bool = True) -> bool:
        """Whether the tensor is a ReLU's, a sigmoid's or a softmax's (through pass-through ops)."""
        while follow and isinstance(node, fx.Node) and self.passes_through(node):
            node = node.args[0]
        if not isinstance(node, fx.Node):
            return False
        if node.op == "call_module":
            return isinstance(self.module(node.target), _NON_NEGATIVE_MODULES)
        return node.op in ("call_function", "call_method") and node.target in _NON_NEGATIVE_FUNCTIONS

    def is_sigmoid(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return type(self.module(node.target)) is nn.Sigmoid
        return node.op in ("call_function", "call_method") and node.target in (torch.sigmoid, F.sigmoid, "sigmoid")

    def tensor_site(self, node: fx.Node) -> str | None:
        """The tensor site of ``node`` in its owner's forward; ``None`` when the owner is called several
        times or its own trace does not match."""
        keys = _owner_keys(node)
        if self.called_several_times(node) is not None:
            return None  # its forward's quantizer would serve every call
        scope = keys[-1] if keys else ""
        key = self._signature(node, scope)
        same = [n for n in self.graph.nodes if _owner_keys(n) == keys and self._signature(n, scope) == key]
        local = self._local_names(scope).get(key, [])
        name = local[same.index(node)] if len(local) == len(same) else None
        return site_name(scope, name) if name is not None else None

    @staticmethod
    def _signature(node: fx.Node, scope: str) -> tuple:
        target = node.target
        if node.op == "call_module" and scope:
            target = target[len(scope) + 1 :]
        return node.op, target

    def _local_names(self, scope: str) -> dict[tuple, list[str | None]]:
        """The owner's own trace (its caller's constant arguments as constants): node names by (op, target),
        in order; ``None`` for every node of a kind whose names differ in the training-mode trace (the
        generated forward needs the same nodes in both)."""
        if scope not in self._local:
            names: dict[str, dict[tuple, list[str]]] = {}
            try:
                module, concrete = self.module(scope), self.call_args.get(scope, {})
                for mode in (True, False):
                    graph, _ = trace(module, children_as_leaves=True, training=mode, concrete_args=concrete)
                    for n in graph.nodes:
                        names.setdefault(str(mode), {}).setdefault((n.op, n.target), []).append(n.name)
            except Exception:  # noqa: BLE001 - an owner that cannot be traced alone takes no tensor site
                names = {}
            train, evaluation = names.get("True", {}), names.get("False", {})
            self._local[scope] = {
                key: listed if train.get(key) == listed else [None] * len(listed) for key, listed in evaluation.items()
            }
        return self._local[scope]

    # -- what is quantized upstream ----------------------------------------------------------------
    def passes_through(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.module(node.target), _PASS_THROUGH)
        return keeps_grid(node)

    def pass_through_root(self, node: Any) -> Any:
        """The tensor ``node`` is read from, looking through pass-through modules."""
        while isinstance(node, fx.Node) and self.passes_through(node) and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        return node

    def quantized_upstream(self, node: Any, outputs: dict) -> Any:
        """The output quantizer that already quantizes the tensor ``node``, looking through pass-through modules."""
        while isinstance(node, fx.Node):
            site = self.site(node)
            if site in outputs:
                return outputs[site]
            if not self.passes_through(node):
                return None
            node = node.args[0]
        return None
