"""Quantizers on tensors that no module's output is: a sum made by ``+``, an SE gate's product, a
concatenation, an attention matmul's operands, the output of a module called several times.

Such a tensor is made in the forward of some module, its *scope* (a torchvision ``BasicBlock`` for
``relu(out + identity)``, a timm ``Attention`` for ``q @ k.transpose(-2, -1)``). The scope gets a
forward generated from its own ``torch.fx`` trace (children kept as calls, so their quantized
layers and hooks run as before) with each quantizer called right after the node that makes the
tensor; the quantizers live in ``scope.tensor_quantizers`` (state-dict names
``<scope>.tensor_quantizers.<node>.step``). The module keeps its class, attributes and children, so
timm's and transformers' methods and the checkpoint's tensor names are unchanged, and
:func:`restore_forward` gives back the class's forward.

A site is named ``"<scope>::<node>"`` (``"::<node>"`` for the model's own forward), ``<node>`` the
node's name in the scope's trace. A forward that branches on ``self.training`` is traced in both
modes and dispatches on it; attention that timm would fuse (``fused_attn``) is traced unfused, so
that its two matmuls exist as nodes.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import fx, nn

__all__ = [
    "SEPARATOR",
    "SiteForward",
    "is_site",
    "node_of_key",
    "quantizer_key",
    "restore_fused_attention",
    "restore_forward",
    "rewrite_forward",
    "site_name",
    "split_site",
    "trace",
    "unfuse_attention",
]

SEPARATOR = "::"


def site_name(scope: str, node: str) -> str:
    """The name of the tensor ``node`` made in the forward of module ``scope``."""
    return f"{scope}{SEPARATOR}{node}"


def is_site(name: str) -> bool:
    """Whether ``name`` names a tensor site (rather than a module, whose output is quantized by a hook)."""
    return SEPARATOR in name


def split_site(name: str) -> tuple[str, str]:
    """``"<scope>::<node>"`` -> ``(scope, node)``."""
    scope, _, node = name.rpartition(SEPARATOR)
    if not node.isidentifier():
        raise ValueError(
            f"tensor site {name!r}: {node!r} after {SEPARATOR!r} is not an fx node name; "
            f"a site is '<module name>{SEPARATOR}<fx node name>'"
        )
    return scope, node


@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """timm's attention modules (``fused_attn``) run their explicit matmul path within the block."""
    fused = [m for m in model.modules() if getattr(m, "fused_attn", None) is True]
    for m in fused:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in fused:
            m.fused_attn = True


class _Tracer(fx.Tracer):
    """fx's tracer with timm's untraceable modules (and ``leaves``) kept opaque, ``children_as_leaves`` for a
    module's own forward, and the arguments each module was called with recorded (``calls``)."""

    def __init__(self, leaves: tuple[type, ...], children_as_leaves: bool) -> None:
        from timm.layers import get_notrace_functions, get_notrace_modules

        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.leaves, self.children_as_leaves = (*get_notrace_modules(), *leaves), children_as_leaves
        self.calls: dict[str, dict[str, Any]] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self.children_as_leaves or isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        if path not in self.calls:
            self.calls[path] = _concrete_arguments(m, args, kwargs)
        return super().call_module(m, forward, args, kwargs)


def _concrete_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a call that are not traced values (``None``, flags, defaults left out): a module's own
    trace takes them as constants, as its caller's trace did."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return {}
    bound.apply_defaults()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {
        name: value
        for name, value in bound.arguments.items()
        if not _traced(value) and bound.signature.parameters[name].kind not in variadic
    }


def _traced(value: Any) -> bool:
    """A traced value, a tensor, or a container holding one: not a constant of the module's own trace."""
    if isinstance(value, (fx.Proxy, torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return any(_traced(v) for v in value)
    return isinstance(value, dict) and any(_traced(v) for v in value.values())


def trace(
    module: nn.Module,
    *,
    children_as_leaves: bool = False,
    training: bool = False,
    concrete_args: dict[str, Any] | None = None,
    leaves: tuple[type, ...] = (),
) -> tuple[fx.Graph, dict[str, dict[str, Any]]]:
    """The ``torch.fx`` graph of ``module`` in eval (or train) mode, attention unfused, timm's untraceable
    modules and functions (and ``leaves``) kept opaque; with ``children_as_leaves`` only its own forward, with
    ``concrete_args`` as constants. Also the concrete arguments each module was called with."""
    tracer = _Tracer(leaves, children_as_leaves)
    modes = {m: m.training for m in module.modules()}
    try:
        with unfused_attention(module):
            graph = tracer.trace(module.train(training), concrete_args=concrete_args or None)
        return graph, tracer.calls
    finally:
        for m, was_training in modes.items():
            m.training = was_training


def quantizer_key(node: str) -> str:
    """The ``tensor_quantizers`` key of the site at ``node`` (a name ``nn.ModuleDict`` already uses gets a ``_``)."""
    return f"{node}_" if hasattr(nn.ModuleDict, node) else node


def node_of_key(key: str) -> str:
    """Inverse of :func:`quantizer_key`."""
    return key[:-1] if key.endswith("_") and hasattr(nn.ModuleDict, key[:-1]) else key


def _forward_with_quantizers(graph: fx.Graph, nodes: tuple[str, ...], scope: str) -> tuple[str, Callable]:
    """The graph's forward (source, function) with ``self.tensor_quantizers[<node>]`` after each named node."""
    by_name = {n.name: n for n in graph.nodes}
    for name in nodes:
        node = by_name.get(name)
        if node is None or node.op in ("placeholder", "output", "get_attr"):
            where = scope or "the model"
            raise ValueError(f"tensor site {site_name(scope, name)!r}: the forward of {where!r} has no such node")
        with graph.inserting_after(node):
            quantized = graph.call_module(f"tensor_quantizers.{quantizer_key(name)}", (node,))
        node.replace_all_uses_with(quantized, delete_user_cb=lambda user, q=quantized: user is not q)
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<acs_hf: forward of {scope or 'the model'} with tensor quantizers>", "exec"), namespace)
    return code.src, namespace["forward"]


class SiteForward:
    """A module's forward with its tensor sites' quantizers: generated from the module's own trace (children
    as calls, ``concrete`` arguments as its caller passed them) in training and in eval mode, dispatched on
    ``module.training``. Copies and unpickled models generate it again on their first call."""

    def __init__(self, module: nn.Module, scope: str, nodes: tuple[str, ...], concrete: dict[str, Any]) -> None:
        self.module, self.scope, self.nodes, self.concrete = module, scope, tuple(nodes), dict(concrete)
        self.__signature__ = inspect.signature(type(module).forward.__get__(module))
        self._forwards: tuple[Callable, Callable] | None = None

    def build(self) -> SiteForward:
        """Trace and generate now (raises if a node is missing)."""
        made = []
        for training in (True, False):
            graph, _ = trace(self.module, children_as_leaves=True, training=training, concrete_args=self.concrete)
            made.append(_forward_with_quantizers(graph, self.nodes, self.scope))
        (train_src, train_forward), (eval_src, eval_forward) = made
        self._forwards = (eval_forward if train_src == eval_src else train_forward, eval_forward)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._forwards is None:
            self.build()
        return self._forwards[0 if self.module.training else 1](self.module, *args, **kwargs)

    def __reduce__(self) -> tuple:
        # the generated functions do not pickle; the module (restored by then) makes them again when first called
        return SiteForward, (self.module, self.scope, self.nodes, self.concrete)


def rewrite_forward(module: nn.Module, forward: SiteForward, quantizers: Mapping[str, nn.Module]) -> None:
    """Give ``module`` its built ``forward`` and the quantizers ``{node name: quantizer}``, in place."""
    if "forward" in vars(module) or hasattr(module, "tensor_quantizers"):
        owned = isinstance(vars(module).get("forward"), SiteForward)
        what = "already has tensor quantizers" if owned else "has a forward set on the instance (a wrapper)"
        raise ValueError(f"tensor sites: module {forward.scope or 'the model'!r} {what}")
    module.tensor_quantizers = nn.ModuleDict({quantizer_key(n): q for n, q in quantizers.items()})
    module.forward = forward
    unfuse_attention(module)  # what the generated forward does; it no longer reads the flag


def unfuse_attention(module: nn.Module) -> None:
    """Turn timm's fused attention off on ``module`` for good, marked for :func:`restore_fused_attention`."""
    if getattr(module, "fused_attn", None) is True:
        module.fused_attn, module.acs_hf_fused_attn = False, True


def restore_fused_attention(module: nn.Module) -> None:
    """Undo :func:`unfuse_attention`."""
    if vars(module).pop("acs_hf_fused_attn", False):
        module.fused_attn = True


def restore_forward(module: nn.Module) -> None:
    """Undo :func:`rewrite_forward`: the quantizers go, the class's forward (and fused attention) is back."""
    if isinstance(vars(module).get("forward"), SiteForward):
        del module.forward
    if hasattr(module, "tensor_quantizers"):
        del module.tensor_quantizers
    restore_fused_attention(module)
