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
import types
from collections.abc import Callable, Iterator, Mapping

from torch import fx, nn

__all__ = ["SEPARATOR", "is_site", "restore_forward", "rewrite_forward", "site_name", "split_site", "trace"]

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
        raise ValueError(f"tensor site {name!r} must be '<module name>{SEPARATOR}<fx node name>'")
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


def trace(module: nn.Module, *, children_as_leaves: bool = False, training: bool = False) -> fx.Graph:
    """The ``torch.fx`` graph of ``module`` in eval (or train) mode, attention unfused, timm's
    untraceable modules and functions kept opaque; with ``children_as_leaves`` only its own forward."""
    from timm.layers import get_notrace_functions, get_notrace_modules

    leaves = tuple(get_notrace_modules())

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return children_as_leaves or isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    modes = {m: m.training for m in module.modules()}
    try:
        with unfused_attention(module):
            return _Tracer(autowrap_functions=tuple(get_notrace_functions())).trace(module.train(training))
    finally:
        for m, was_training in modes.items():
            m.training = was_training


def _forward_with_quantizers(graph: fx.Graph, nodes: list[str], scope: str) -> tuple[str, Callable]:
    """The graph's forward (source, function) with ``self.tensor_quantizers[<node>]`` after each named node."""
    by_name = {n.name: n for n in graph.nodes}
    for name in nodes:
        node = by_name.get(name)
        if node is None or node.op in ("placeholder", "output", "get_attr"):
            where = scope or "the model"
            raise ValueError(f"tensor site {site_name(scope, name)!r}: the forward of {where!r} has no such node")
        with graph.inserting_after(node):
            quantized = graph.call_module(f"tensor_quantizers.{name}", (node,))
        node.replace_all_uses_with(quantized, delete_user_cb=lambda user, q=quantized: user is not q)
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<acs_hf: forward of {scope or 'the model'} with tensor quantizers>", "exec"), namespace)
    return code.src, namespace["forward"]


def _dispatch(train_forward: Callable, eval_forward: Callable) -> Callable:
    def forward(self: nn.Module, *args, **kwargs):
        return (train_forward if self.training else eval_forward)(self, *args, **kwargs)

    return forward


def rewrite_forward(module: nn.Module, scope: str, quantizers: Mapping[str, nn.Module]) -> None:
    """Give ``module`` (named ``scope``) the quantizers ``{node name: quantizer}`` in a generated
    forward, in place (module docstring)."""
    if "forward" in vars(module) or hasattr(module, "tensor_quantizers"):
        raise ValueError(f"tensor sites: module {scope or 'the model'!r} already has tensor quantizers")
    module.tensor_quantizers = nn.ModuleDict(dict(quantizers))
    try:
        forwards = [
            _forward_with_quantizers(trace(module, children_as_leaves=True, training=t), list(quantizers), scope)
            for t in (True, False)
        ]
    except Exception:
        del module.tensor_quantizers
        raise
    (train_src, train_forward), (eval_src, eval_forward) = forwards
    forward = eval_forward if train_src == eval_src else _dispatch(train_forward, eval_forward)
    module.forward = types.MethodType(forward, module)
    if getattr(module, "fused_attn", None) is True:
        module.fused_attn = False  # what the generated forward does; it no longer reads the flag


def restore_forward(module: nn.Module) -> None:
    """Undo :func:`rewrite_forward`: the quantizers go, the class's forward is back."""
    if "forward" in vars(module):
        del module.forward
    if hasattr(module, "tensor_quantizers"):
        del module.tensor_quantizers
