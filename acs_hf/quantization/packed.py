"""The packed low-bit format: integer weight codes in uint8 and the layer table that describes them.

A quantized layer's weight is stored as its integer codes (offset to be non-negative, packed four
2-bit, two 3/4-bit or one 5..8-bit code per byte, a flat uint8 tensor) next to the layer's step
sizes; the ``quantization_config`` block's layer table records each layer's type, weight shape and
bits. This module turns a quantized model into that state (:func:`packed_state`) and a float
architecture plus that state back into the quantized model (:func:`prepare_packed_weights`, then
:func:`unpack_weights`), checking every entry against the architecture. Reading and
writing the files (whose names are defined here): :mod:`.serialization`; their digests and checks:
:mod:`.integrity`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
from typing import Any

import torch
from torch import nn

from .lsq import STEP_FLOOR, LSQQuantizer, quant_range
from .model import quant_modules, quantize_layers, quantizers_initialized
from .modules import LayerQuantConfig, quant_class_for
from .output_quant import OutputQuantConfig, output_quantizers, quantize_outputs
from .tensor_sites import is_site, split_site

__all__ = [
    "QUANT_METHOD",
    "WEIGHTS_NAME",
    "broadcast_step",
    "check_packable",
    "check_packed_length",
    "layer_configs_from_table",
    "output_configs_from_table",
    "pack_codes",
    "packed_length",
    "packed_state",
    "prepare_packed_weights",
    "stored_weight_codes",
    "unpack_codes",
    "unpack_state_dict",
    "unpack_weights",
]

QUANT_METHOD = "acs_hf_lsq"  # named after the library: loaders that lack it print where to get it
FORMAT_VERSION = 2
#: Checkpoints with output quantizers (``QuantConfig.integer_graph``): the layer table plus an ``outputs`` table.
OUTPUTS_FORMAT_VERSION = 3
#: ... whose ``outputs`` table names tensor sites (``"<scope>::<node>"``) too: older versions cannot place them.
TENSOR_SITES_FORMAT_VERSION = 4
#: quant_method -> the format versions this version reads.
READABLE_FORMATS = {
    QUANT_METHOD: (FORMAT_VERSION, OUTPUTS_FORMAT_VERSION, TENSOR_SITES_FORMAT_VERSION),
    "lsq": (1,),
}
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LEGACY_CODES_SUFFIX = ".weight_codes"  # format 1
#: Written into every ``quantization_config`` block (under a key that sorts first), where transformers'
#: warning for an unknown ``quant_method`` sends a user who loads without acs_hf: "delete the
#: quantization_config attribute in config.json".
LOADING_NOTE = (
    "Load with `import acs_hf` first: it registers quant_method acs_hf_lsq with transformers. Without it "
    "transformers warns 'Unknown quantization type' and stops on a size mismatch; do not delete this block: the "
    "weights are packed integer codes that only acs_hf unpacks."
)


def _library_version() -> str:
    try:
        return importlib.metadata.version("acs_hf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _slot_bits(bits: int) -> int:
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def packed_length(numel: int, bits: int) -> int:
    """Bytes that :func:`pack_codes` writes for ``numel`` codes of ``bits`` bits."""
    per_byte = 8 // _slot_bits(bits)
    return -(-numel // per_byte)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer codes (< 2**bits) into a flat uint8 tensor, low bits first."""
    slot = _slot_bits(bits)
    per_byte = 8 // slot
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    flat = flat.view(-1, per_byte)
    packed = torch.zeros(flat.shape[0], dtype=torch.uint8)
    for i in range(per_byte):
        packed |= flat[:, i] << (slot * i)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as uint8."""
    slot = _slot_bits(bits)
    per_byte = 8 // slot
    mask = (1 << slot) - 1
    parts = [(packed >> (slot * i)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=1).reshape(-1)[:numel]


def stored_weight_codes(module) -> torch.Tensor:
    """A quantized layer's weight codes as stored, ``clamp(round(w / s), -Qn, Qp) + Qn`` (non-negative)."""
    wq = module.weight_quantizer
    qn, qp = wq.qrange
    w = module.weight.detach().float().cpu()
    s = broadcast_step(wq.step.detach().cpu(), w.dim())
    return (torch.round(w / s).clamp(-qn, qp) + qn).to(torch.uint8)


def broadcast_step(step: torch.Tensor, ndim: int) -> torch.Tensor:
    """float32 step(s), floored as in the fake-quant op, shaped to broadcast over an ``ndim`` weight."""
    step = step.float().clamp_min(STEP_FLOOR)
    return step.view(-1, *([1] * (ndim - 1))) if step.numel() > 1 else step


def check_packable(model: nn.Module, where: str) -> None:
    """Refuse a model without quantized layers or with uninitialised quantizers (``where`` names the caller)."""
    if not quant_modules(model):
        raise ValueError(f"{where}: the model has no quantized layers; call quantize_model first")
    if not quantizers_initialized(model):
        raise RuntimeError(f"{where}: some quantizers are uninitialised; call calibrate_quantizers first")


def packed_state(
    model: nn.Module, config: dict[str, Any] | None = None, where: str = "save_quantized"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What :func:`.serialization.save_quantized` writes for the quantized ``model``: its tensors by state-dict
    name (each quantized weight as packed codes, on the CPU) and the ``quantization_config`` block
    (layer table, a ``checkpoint_id`` derived from the content, ``config``: the :class:`QuantConfig` as a dict, or
    ``None``). transformers' ``save_pretrained`` of a loaded model writes the same
    (:class:`acs_hf.integrations.hf_quantizer.LSQHfQuantizer`); ``where`` names the caller in errors."""
    check_packable(model, where)
    state, layers = _packed_state(model, quant_modules(model))
    outputs = {name: {"bits": q.bits, "signed": q.signed} for name, q in output_quantizers(model)}
    quantization_config = {
        "quant_method": QUANT_METHOD,
        "acs_hf_loading": LOADING_NOTE,
        "format_version": _format_version(outputs),
        "library": "acs_hf",
        "library_version": _library_version(),
        "checkpoint_id": None,
        "config": config,
        "layers": layers,
        **({"outputs": outputs} if outputs else {}),
    }
    quantization_config["checkpoint_id"] = _checkpoint_id(state, quantization_config)
    return state, quantization_config


def _format_version(outputs: dict[str, Any]) -> int:
    if any(is_site(name) for name in outputs):
        return TENSOR_SITES_FORMAT_VERSION
    return OUTPUTS_FORMAT_VERSION if outputs else FORMAT_VERSION


def _checkpoint_id(state: dict[str, torch.Tensor], quantization_config: dict[str, Any]) -> str:
    """The id that pairs a save's weights file with its config: a hash of what the save holds (every
    tensor's name, dtype, shape and bytes, and the block), so that the same model saves to the same
    bytes, and two saves' files pair only when they hold the same model."""
    digest = hashlib.sha256(json.dumps(quantization_config, sort_keys=True, default=str).encode())
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:32]


def _packed_state(model: nn.Module, qmods) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The state dict to write, each quantized weight as packed codes, and the layer table."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    layers: dict[str, dict[str, Any]] = {}
    for name, m in qmods:
        codes = stored_weight_codes(m)
        bits = m.weight_quantizer.bits
        state[f"{name}.weight"] = pack_codes(codes, bits)
        iq = m.input_quantizer
        layers[name] = {
            "type": type(m).__name__,
            "weight_bits": bits,
            "weight_shape": list(m.weight.shape),
            "weight_signed": True,
            "per_channel": m.weight_quantizer.per_channel,
            "act_bits": iq.bits if iq is not None else None,
            "act_signed": iq.signed if iq is not None else None,
        }
    return state, layers


def _layer_config(name: str, info: Any, module: nn.Module | None, where: str) -> LayerQuantConfig:
    """Validate one entry of the checkpoint's layer table against the rebuilt architecture."""
    if not isinstance(info, dict):
        raise ValueError(f"{where}: layer {name!r}: entry must be an object, got {info!r}")
    if module is None:
        raise ValueError(f"{where}: layer {name!r} of the checkpoint does not exist in the architecture")
    cls = quant_class_for(module)
    if cls is None or info.get("type") != cls.__name__:
        raise ValueError(
            f"{where}: layer {name!r} is saved as {info.get('type')!r}, the architecture has {type(module).__name__}"
        )
    if info.get("weight_shape") != list(module.weight.shape):
        raise ValueError(
            f"{where}: layer {name!r} has weight_shape {info.get('weight_shape')!r}, the architecture "
            f"{list(module.weight.shape)}"
        )
    try:
        return LayerQuantConfig(
            weight_bits=info.get("weight_bits"),
            act_bits=info.get("act_bits"),
            per_channel=bool(info.get("per_channel", False)),
            act_signed=info.get("act_signed"),
        )
    except ValueError as e:
        raise ValueError(f"{where}: layer {name!r}: {e}") from None


def check_packed_length(name: str, packed: torch.Tensor, config: LayerQuantConfig, shape, where: str) -> None:
    """Refuse packed codes that cannot hold the layer's ``shape`` at its bit width."""
    bits, numel = config.weight_bits, math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_length(numel, bits):
        raise ValueError(
            f"{where}: layer {name!r}: {packed.numel()} packed bytes ({packed.dtype}) do not hold "
            f"{numel} codes of {bits} bits ({packed_length(numel, bits)} bytes expected); the checkpoint is "
            "corrupt or its config.json was edited"
        )


def _weight_from_codes(
    name: str, packed: torch.Tensor, step: torch.Tensor, config: LayerQuantConfig, shape, where: str
) -> torch.Tensor:
    """``w = (code - Qn) * step``, after checking the packed length and the code range."""
    check_packed_length(name, packed, config, shape, where)
    bits, numel = config.weight_bits, math.prod(shape)
    codes = unpack_codes(packed, bits, numel).view(shape)
    qn, qp = quant_range(bits, True)
    if int(codes.max()) > qn + qp:
        raise ValueError(
            f"{where}: layer {name!r}: code {int(codes.max())} exceeds the {bits}-bit range 0..{qn + qp}; "
            "the checkpoint is corrupt or its config.json was edited"
        )
    expected_steps = shape[0] if config.per_channel else 1
    if step.numel() != expected_steps:
        raise ValueError(f"{where}: layer {name!r} has {step.numel()} weight steps, expected {expected_steps}")
    return (codes.float() - qn) * broadcast_step(step, len(shape))


def layer_configs_from_table(model: nn.Module, layers: dict[str, Any], where: str) -> dict[str, LayerQuantConfig]:
    """The per-layer settings of a checkpoint's layer table, each checked against ``model``'s
    layer of that name (type and weight shape); a mismatch names the layer."""
    modules = dict(model.named_modules())
    return {name: _layer_config(name, info, modules.get(name), where) for name, info in layers.items()}


def output_configs_from_table(model: nn.Module, outputs: Any, where: str) -> dict[str, OutputQuantConfig]:
    """The output quantizers of a checkpoint's ``outputs`` table (module name or tensor site -> ``bits``,
    ``signed``), each module (a site's scope) checked to exist in ``model``."""
    if outputs is None:
        return {}
    if not isinstance(outputs, dict):
        raise ValueError(f"{where}: quantization_config.outputs must be an object, got {outputs!r}")
    modules, configs = dict(model.named_modules()), {}
    for name, info in outputs.items():
        module = split_site(name)[0] if is_site(name) else name
        if module not in modules:
            what = f"its scope {module!r}" if is_site(name) else "its module"
            raise ValueError(f"{where}: output quantizer {name!r} of the checkpoint: {what} is not in the architecture")
        if not isinstance(info, dict) or not isinstance(info.get("signed"), bool):
            raise ValueError(f"{where}: output quantizer {name!r}: entry must be {{bits, signed}}, got {info!r}")
        try:
            configs[name] = OutputQuantConfig(bits=info.get("bits"), signed=info["signed"])
        except ValueError as e:
            raise ValueError(f"{where}: output quantizer {name!r}: {e}") from None
    return configs


def prepare_packed_weights(
    model: nn.Module, layers: dict[str, Any], where: str = "load_quantized", outputs: dict[str, Any] | None = None
) -> nn.Module:
    """Quantize the float architecture ``model`` as the layer table says (and give the modules of the
    ``outputs`` table their output quantizers), each quantized weight a flat uint8 placeholder of its
    packed length, in place.

    A loader that copies tensors by name (``load_state_dict``, transformers' ``from_pretrained``)
    then fills in the checkpoint's packed codes and step sizes; :func:`unpack_weights` turns the
    codes into the float weights afterwards.
    """
    configs = layer_configs_from_table(model, layers, where)
    output_configs = output_configs_from_table(model, outputs, where)
    quantize_layers(model, configs)
    quantize_outputs(model, output_configs)
    for name, config in configs.items():
        module = model.get_submodule(name)
        size = packed_length(math.prod(layers[name]["weight_shape"]), config.weight_bits)
        placeholder = torch.empty(size, dtype=torch.uint8, device=module.weight.device)
        module.weight = nn.Parameter(placeholder, requires_grad=False)
    return model


def unpack_weights(model: nn.Module, layers: dict[str, Any], where: str = "load_quantized") -> nn.Module:
    """Second half of :func:`prepare_packed_weights`: every quantized layer's loaded codes become
    its float weight ``(code - Qn) * step``, after checking the packed length and the code range;
    the quantizers take their calibration state from the loaded buffers."""
    for name, info in layers.items():
        module = model.get_submodule(name)
        with torch.no_grad():
            weight = _weight_from_codes(
                name, module.weight, module.weight_quantizer.step, module.layer_config, info["weight_shape"], where
            )
        # in the dtype the loader gave the layer's other tensors (from_pretrained(dtype=...))
        module.weight = nn.Parameter(weight.to(module.weight_quantizer.step.dtype))
    for q in model.modules():
        if isinstance(q, LSQQuantizer):
            q.sync_state_from_buffers()
    if not quantizers_initialized(model):
        raise ValueError(f"{where}: the checkpoint holds uninitialised quantizers")
    return model


def unpack_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], layers: dict[str, Any], prefix: str = "", where: str = "load"
) -> None:
    """In place: the packed codes of each quantized layer in ``state`` (a checkpoint's tensors, keys
    ``prefix`` + the names of ``model``, a quantized model) become the float weight
    ``(code - Qn) * step``, with the step of ``state``, so that ``model.load_state_dict`` takes
    a checkpoint folder's tensors (transformers' Trainer resuming from one); float weights are left
    as they are."""
    for name, info in layers.items():
        key, step = f"{prefix}{name}.weight", state.get(f"{prefix}{name}.weight_quantizer.step")
        packed = state.get(key)
        if packed is None or packed.dtype != torch.uint8 or step is None:
            continue
        config = model.get_submodule(name).layer_config
        weight = _weight_from_codes(name, packed.cpu(), step.detach().cpu(), config, info["weight_shape"], where)
        state[key] = weight.to(device=packed.device, dtype=step.dtype)
