"""Graph passes on the ONNX model that :func:`~acs_hf.export_onnx` traces (``onnx_ir`` models).

:func:`clean_up` stores INT4 weight codes as INT4 initializers and drops the float weights they
replace; :func:`keep_float_biases` keeps biases in float, as LSQ adds them; :func:`fold_batchnorm_nodes`
folds BatchNormalization into quantized convolutions; :func:`save_atomically` writes the file. Each
imports onnx / onnxscript / onnx_ir on first use (the ``onnx`` extra).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "INT4_TYPES",
    "clean_up",
    "fold_batchnorm_nodes",
    "clamp_on_codes",
    "int8_weight_kernels",
    "keep_float_biases",
    "requantize_after_code_ops",
    "save_atomically",
]

INT4_TYPES = (22, 21)  # onnx TensorProto.INT4, UINT4


def clean_up(model: Any) -> None:
    """Store ``Cast(int8 codes -> INT4 / UINT4)`` on an initializer as an INT4 / UINT4 initializer of
    the same name, drop what is unused (the float weights the codes replace) and take the wrapper's
    ``model.`` prefix off the initializer names (``layer1.0.conv1.weight_quantizer.codes``)."""
    import onnx_ir as ir
    import onnxscript

    def keep_int4_casts(node: ir.Node) -> bool | None:  # converted below, keeping the codes' names
        return False if node.op_type == "Cast" and node.attributes.get_int("to") in INT4_TYPES else None

    onnxscript.optimizer.optimize_ir(model, should_fold=keep_int4_casts)
    graph = model.graph
    for cast in [n for n in graph if n.op_type == "Cast" and n.inputs[0].is_initializer()]:
        to = ir.DataType(cast.attributes.get_int("to"))
        source = cast.inputs[0]
        if to not in INT4_TYPES or len(source.uses()) != 1:
            continue
        source.const_value = ir.tensor(source.const_value.numpy().astype(to.numpy()), dtype=to, name=source.name)
        source.dtype = to
        cast.outputs[0].replace_all_uses_with(source)
        graph.remove(cast, safe=True)
    onnxscript.optimizer.remove_unused_nodes(model)
    for value in list(graph.initializers.values()):
        if value.name.startswith("model.") and value.name[6:] not in graph.initializers:
            value.name = value.name[6:]


def keep_float_biases(model: Any, integer_kernels: bool = False) -> None:
    """Move the float bias of each Conv / Gemm whose weight is dequantized into an Add after it.

    onnxruntime's "WeightBiasQuantization" rounds such a bias to int32 codes at input scale x weight
    scale, which at 2-4 bits moves outputs by a good share of an activation step; LSQ adds the bias
    in float, and so does the exported graph. With ``integer_kernels``, a layer whose output is quantized
    (directly or through a ReLU) keeps its bias, which ONNX Runtime rounds so as to run it as an
    integer kernel (a squeeze-excitation's reducing conv), as BatchNorm folding does."""
    import onnx_ir as ir

    graph = model.graph
    for node in [n for n in graph if n.op_type in ("Conv", "Gemm") and len(n.inputs) == 3]:
        if integer_kernels and _output_quantized(node):
            continue
        weight, bias = node.inputs[1].producer(), node.inputs[2]
        if weight is None or weight.op_type != "DequantizeLinear" or bias is None or bias.const_value is None:
            continue
        if len(bias.uses()) != 1 or weight.inputs[0].const_value is None or node.attributes.get_float("beta", 1) != 1:
            continue
        if node.op_type == "Conv":  # (C,) -> (C, 1, 1) to broadcast over (N, C, H, W)
            shape = (-1, *[1] * (len(weight.inputs[0].const_value.shape) - 2))
            bias.const_value = ir.tensor(bias.const_value.numpy().reshape(shape), name=bias.name)
            bias.shape = ir.Shape(bias.const_value.shape)
        unbiased = ir.node(node.op_type, list(node.inputs[:2]), node.attributes)
        add = ir.node("Add", [unbiased.outputs[0], bias])
        ir.convenience.replace_nodes_and_values(graph, node, [node], [unbiased, add], node.outputs, add.outputs)


def _output_quantized(node: Any) -> bool:
    """Whether every use of ``node``'s output is a QuantizeLinear, directly or after one Relu."""
    uses = list(node.outputs[0].uses())
    if len(uses) == 1 and uses[0][0].op_type == "Relu":
        uses = list(uses[0][0].outputs[0].uses())
    return bool(uses) and all(user.op_type == "QuantizeLinear" for user, _ in uses)


def save_atomically(model: Any, path: Path) -> None:
    """Save to a temporary directory beside ``path`` under the final names, then rename into place:
    the external-data file (for models over protobuf's 2 GB) first, the model last."""
    import onnx
    import onnx_ir as ir

    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    data_name = f"{path.name}.data" if total > 1_800_000_000 else None
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        ir.save(model, Path(tmp) / path.name, external_data=data_name)
        onnx.checker.check_model(str(Path(tmp) / path.name), full_check=True)
        if data_name is not None:
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(Path(tmp) / path.name, path)


def _const(value: Any, op_type: str | None = None) -> Any:
    """The numpy value of ``value`` (an initializer), or of the initializer feeding a single
    ``op_type`` node's first input (returns that node too); ``None`` when it is not constant."""
    if value is None:
        return None
    if op_type is None:
        return None if value.const_value is None else value.const_value.numpy()
    node = value.producer()
    if node is None or node.op_type != op_type or len(value.uses()) != 1:
        return None
    inputs = [_const(v) for v in node.inputs]
    return None if any(v is None for v in inputs) else (node, inputs)


def _int8_shift(codes: Any) -> int:
    """The largest k with ``codes * 2**k`` still in int8: b-bit codes move onto the int8 grid."""
    low, high = int(codes.min()), int(codes.max())
    k = 0
    while low * 2 ** (k + 1) >= -128 and high * 2 ** (k + 1) <= 127 and (low or high):
        k += 1
    return k


def _batchnorm_fold(bn: Any, shift: bool = False) -> dict[str, Any] | None:
    """What folding ``bn`` into the quantized Conv before it needs, or ``None`` when the pattern
    (DQ(x) -> Conv <- DQ(w codes), Conv -> BN, all parameters constant) is not there."""
    import numpy as np

    conv = bn.inputs[0].producer()
    params = [_const(v) for v in bn.inputs[1:]]
    if conv is None or conv.op_type != "Conv" or len(bn.inputs[0].uses()) != 1 or any(p is None for p in params):
        return None
    x_dq, w_dq = conv.inputs[0].producer(), _const(conv.inputs[1], "DequantizeLinear")
    x_scale = _const(x_dq.inputs[1]) if x_dq is not None and x_dq.op_type == "DequantizeLinear" else None
    bias = _const(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else 0.0
    if w_dq is None or x_scale is None or x_scale.size != 1 or bias is None or bn.outputs[0].is_graph_output():
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    eps = bn.attributes.get_float("epsilon", 1e-5)
    a = gamma / np.sqrt(var + eps)
    # A negative gain gives the channel a negative weight scale (the codes, and their INT4 storage, are
    # kept); a zero gain zeroes the channel's codes (the channel is its bias alone).
    codes, zeroed = w_dq[1][0], bool((a == 0).any())
    if zeroed:
        codes = np.where((a == 0).reshape(-1, *[1] * (codes.ndim - 1)), np.zeros_like(codes), codes)
    # With ``shift``, codes * 2^k and scale / 2^k: the same weights, and a 2^k finer int32 bias step
    # (input step x weight step): the bias then rounds to well under an output step even at 2 bits.
    k = _int8_shift(codes) if shift else 0
    w_scale = np.broadcast_to(w_dq[1][1].astype(np.float64), a.shape) * np.where(a == 0, 1.0, a) / 2**k
    w_scale = w_scale.astype(np.float32)
    b_scale = (float(x_scale) * w_scale.astype(np.float64)).astype(np.float32)
    if not (b_scale != 0).all() or not np.isfinite(b_scale).all():  # an underflowing scale: keep the BN
        return None
    b_codes = np.round((beta - mean * a + a * bias) / b_scale)
    if np.abs(b_codes).max() >= 2**31:
        return None
    plan = {"conv": conv, "codes": codes, "w_scale": w_scale, "b_codes": b_codes.astype(np.int32), "b_scale": b_scale}
    return {**plan, "zeroed": zeroed, "shift": k}


def fold_batchnorm_nodes(model: Any, int8_kernels: bool = False) -> int:
    """Fold each BatchNormalization after a quantized Conv into per-channel weight scales and an int32
    bias (``fold_batchnorm`` of :func:`~acs_hf.export_onnx`); returns how many were folded. With
    ``int8_kernels`` the codes reach the Conv as int8 shifted onto the int8 grid (``Cast`` and ``Mul``,
    which ONNX Runtime folds when the session starts: the file keeps INT4 codes)."""
    import numpy as np
    import onnx_ir as ir
    import onnxscript

    graph, folded = model.graph, 0
    for bn in [n for n in graph if n.op_type == "BatchNormalization"]:
        plan = _batchnorm_fold(bn, shift=int8_kernels)
        if plan is None:
            continue
        conv, prefix, channels = plan["conv"], bn.outputs[0].name, plan["w_scale"].shape[0]
        inits = {
            "w_scale": plan["w_scale"],
            "w_zero_point": np.zeros(channels, dtype=np.int8 if int8_kernels else plan["codes"].dtype),
            "bias_codes": plan["b_codes"],
            "bias_scale": plan["b_scale"],
            "bias_zero_point": np.zeros(channels, np.int32),
        }
        v = {k: ir.Value(name=f"{prefix}.{k}", const_value=ir.tensor(a)) for k, a in inits.items()}
        for value in v.values():
            graph.register_initializer(value)
        codes = conv.inputs[1].producer().inputs[0]
        if plan["zeroed"]:  # zero gains: the channels' codes zeroed
            codes = ir.Value(name=f"{prefix}.weight_codes", const_value=ir.tensor(plan["codes"]))
            graph.register_initializer(codes)
        chain = []
        if int8_kernels:
            if codes.const_value.dtype != ir.DataType.INT8:
                chain.append(ir.node("Cast", [codes], {"to": ir.DataType.INT8}))
            if plan["shift"]:
                factor = ir.Value(name=f"{prefix}.code_shift", const_value=ir.tensor(np.int8(2 ** plan["shift"])))
                graph.register_initializer(factor)
                chain.append(ir.node("Mul", [chain[-1].outputs[0] if chain else codes, factor]))
            codes = chain[-1].outputs[0] if chain else codes
        dq_w = ir.node("DequantizeLinear", [codes, v["w_scale"], v["w_zero_point"]], {"axis": 0})
        dq_b = ir.node("DequantizeLinear", [v["bias_codes"], v["bias_scale"], v["bias_zero_point"]], {"axis": 0})
        new_conv = ir.node("Conv", [conv.inputs[0], dq_w.outputs[0], dq_b.outputs[0]], conv.attributes)
        graph.insert_before(bn, [*chain, dq_w, dq_b, new_conv])
        bn.outputs[0].replace_all_uses_with(new_conv.outputs[0])
        folded += 1
    onnxscript.optimizer.remove_unused_nodes(model)
    return folded


def int8_weight_kernels(model: Any) -> int:
    """Feed each INT4 / UINT4 weight initializer to its DequantizeLinear through ``Cast(to=INT8 / UINT8)``
    (zero point to match): ONNX Runtime has no 4-bit convolution kernel and leaves 4-bit QDQ unfused
    (microsoft/onnxruntime#20362), while 4-bit codes are exact in its int8 kernels; it folds the Cast
    when the session starts, so the file keeps its 4-bit size. Returns how many weights were cast."""
    import numpy as np
    import onnx_ir as ir

    graph, cast = model.graph, 0
    for dq in [n for n in graph if n.op_type == "DequantizeLinear"]:
        codes = dq.inputs[0]
        if codes is None or codes.const_value is None or codes.const_value.dtype.value not in INT4_TYPES:
            continue
        to = ir.DataType.INT8 if codes.const_value.dtype == ir.DataType.INT4 else ir.DataType.UINT8
        node = ir.node("Cast", [codes], {"to": to})
        graph.insert_before(dq, node)
        zero = ir.Value(
            name=f"{codes.name}.zero_point_8bit",
            const_value=ir.tensor(np.zeros(dq.inputs[2].const_value.shape, dtype=to.numpy())),
        )
        graph.register_initializer(zero)
        dq.replace_input_with(0, node.outputs[0])
        dq.replace_input_with(2, zero)
        cast += 1
    return cast


def requantize_after_code_ops(model: Any) -> int:
    """After each MaxPool, Slice or zero Pad of a dequantized tensor, quantize again at the same scale
    and zero point.

    Each picks codes (or pads with the zero point's value, 0), so its output is already quantized: the
    added pair changes no value, and lets ONNX Runtime run it on the codes and feed the next Conv or Add
    as an integer kernel (a CIFAR ResNet's option-A shortcut: Slice then Pad). Nodes are visited in
    graph order, so a chain of them is requantized link by link. Returns how many were wrapped."""
    import onnx_ir as ir

    graph, wrapped = model.graph, 0
    for node in [n for n in graph if n.op_type in ("MaxPool", "Slice", "Pad")]:
        dq = node.inputs[0].producer()
        out = node.outputs[0]
        if dq is None or dq.op_type != "DequantizeLinear" or out.is_graph_output() or len(node.outputs) != 1:
            continue
        if (node.op_type == "Pad" and not _zero_pad(node)) or any(u.op_type == "QuantizeLinear" for u, _ in out.uses()):
            continue
        uses = list(out.uses())
        scale, zero = dq.inputs[1], dq.inputs[2]
        q = ir.node("QuantizeLinear", [out, scale, zero])
        back = ir.node("DequantizeLinear", [q.outputs[0], scale, zero])
        graph.insert_after(node, [q, back])
        for user, index in uses:
            user.replace_input_with(index, back.outputs[0])
        wrapped += 1
    return wrapped


def _zero_pad(pad: Any) -> bool:
    """A constant-mode Pad whose value is 0 (or absent, which means 0)."""
    if pad.attributes.get_string("mode", "constant") != "constant":
        return False
    value = pad.inputs[2] if len(pad.inputs) > 2 else None
    if value is None:
        return True
    const = _const(value)
    return const is not None and const.size == 1 and float(const.reshape(-1)[0]) == 0.0


def clamp_on_codes(model: Any) -> int:
    """Move a float ``Clip(x, lo, hi)`` that feeds a uint8 ``QuantizeLinear`` (a ReLU6) onto the codes:
    ``clip(round(x / s) + zp, round(lo / s) + zp, round(hi / s) + zp)`` equals the quantized clipped
    value (rounding is monotone), and a Conv followed directly by ``QuantizeLinear`` fuses into
    ``QLinearConv``, which the float Clip prevented (unless the quantized range lay within it).
    Returns how many were moved."""
    import numpy as np
    import onnx_ir as ir

    graph, moved = model.graph, 0
    for clip in [n for n in graph if n.op_type == "Clip" and len(n.inputs) == 3]:
        uses = list(clip.outputs[0].uses())
        bounds = [_const(v) for v in clip.inputs[1:]]
        if len(uses) != 1 or uses[0][0].op_type != "QuantizeLinear" or any(b is None for b in bounds):
            continue
        q = uses[0][0]
        scale, zero = _const(q.inputs[1]), _const(q.inputs[2]) if len(q.inputs) > 2 else None
        if scale is None or scale.size != 1 or zero is None or zero.dtype != np.uint8 or bounds[0].dtype.kind != "f":
            continue
        lo, hi = (int(np.clip(np.round(float(b) / float(scale)) + int(zero), 0, 255)) for b in bounds)
        code_uses = list(q.outputs[0].uses())
        after = code_uses[0][0] if len(code_uses) == 1 and code_uses[0][0].op_type == "Clip" else None
        if after is not None:  # a clamp of a narrower code range is there already: intersect
            lo, hi = max(lo, int(_const(after.inputs[1]))), min(hi, int(_const(after.inputs[2])))
        low, high = (
            ir.Value(name=f"{clip.outputs[0].name}.code_{k}", const_value=ir.tensor(np.uint8(v)))
            for k, v in (("lo", lo), ("hi", hi))
        )
        graph.register_initializer(low)
        graph.register_initializer(high)
        q.replace_input_with(0, clip.inputs[0])
        if after is not None:
            after.replace_input_with(1, low)
            after.replace_input_with(2, high)
        else:
            new = ir.node("Clip", [q.outputs[0], low, high])
            for user, index in code_uses:
                user.replace_input_with(index, new.outputs[0])
            graph.insert_after(q, new)
        graph.remove(clip, safe=True)
        moved += 1
    return moved
