"""Packed low-bit checkpoints: integer weight codes in uint8, written atomically, safetensors only.

Layout of a checkpoint directory:

- ``model.safetensors``: for every quantized layer ``<name>.weight_codes`` (codes offset to be
  non-negative and packed four 2-bit, two 3/4-bit or one 5..8-bit code per byte) plus the layer's
  step sizes; every other tensor (BN, biases, FP layers, quantizer state) as is.
- ``config.json``: timm's model config (``architecture``, ``num_classes``, ``model_args``,
  ``pretrained_cfg``) plus a ``quantization_config`` block.

Both files carry the same ``checkpoint_id`` so that a directory mixing two saves is rejected.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .._io import atomic_write
from .lsq import STEP_FLOOR, quant_range
from .model import QuantConfig, quant_modules, quantize_layers, quantizers_initialized
from .modules import LayerQuantConfig, quant_class_for

__all__ = ["save_quantized", "load_quantized", "pack_codes", "unpack_codes", "QUANT_METHOD", "WEIGHTS_NAME"]

QUANT_METHOD = "lsq"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CODES_SUFFIX = ".weight_codes"
#: ``model_args`` a checkpoint may pass to ``timm.create_model``: architecture only. Anything else
#: (``checkpoint_path``, ``pretrained_cfg``, ...) could make loading read files of the config's choosing.
ALLOWED_MODEL_ARGS = frozenset(
    {"num_classes", "img_size", "in_chans", "global_pool", "patch_size", "window_size", "class_token", "output_stride"}
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


def _weight_codes(module) -> torch.Tensor:
    wq = module.weight_quantizer
    qn, qp = wq.qrange
    w = module.weight.detach().float().cpu()
    s = _broadcast_step(wq.step.detach().cpu(), w.dim())
    return (torch.round(w / s).clamp(-qn, qp) + qn).to(torch.uint8)


def _broadcast_step(step: torch.Tensor, ndim: int) -> torch.Tensor:
    """float32 step(s), floored as in the fake-quant op, shaped to broadcast over an ``ndim`` weight."""
    step = step.float().clamp_min(STEP_FLOOR)
    return step.view(-1, *([1] * (ndim - 1))) if step.numel() > 1 else step


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    model_args: dict | None = None,
    config: QuantConfig | None = None,
) -> Path:
    """Save a quantized timm model as packed integer codes plus ``config.json``.

    Args:
        model: a timm model prepared with :func:`quantize_model` and calibrated.
        directory: where to write (created if missing; other files in it are left alone).
        model_args: extra ``timm.create_model`` kwargs to record (architecture keys only, see
            :data:`ALLOWED_MODEL_ARGS`), if timm did not record them.
        config: the :class:`QuantConfig` the model was quantized with, recorded for reference;
            loading needs only the per-layer table that is always written.

    Returns the directory. Each file is written under a temporary name and renamed into place.
    """
    from timm.models._hub import save_config_for_hf

    qmods = quant_modules(model)
    if not qmods:
        raise ValueError("save_quantized: the model has no quantized layers; call quantize_model first")
    if not quantizers_initialized(model):
        raise RuntimeError("save_quantized: some quantizers are uninitialised; call calibrate_quantizers first")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "architecture" not in cfg:
        raise ValueError("save_quantized needs a timm model (one with pretrained_cfg['architecture'])")
    _check_model_args(model_args or {}, "save_quantized: model_args")

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    layers: dict[str, dict[str, Any]] = {}
    for name, m in qmods:
        codes = _weight_codes(m)
        bits = m.weight_quantizer.bits
        del state[f"{name}.weight"]
        state[name + CODES_SUFFIX] = pack_codes(codes, bits)
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
    checkpoint_id = uuid.uuid4().hex
    quantization_config = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "library": "acs_hf",
        "library_version": _library_version(),
        "checkpoint_id": checkpoint_id,
        "config": config.to_dict() if config is not None else None,
        "layers": layers,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",
        "quant_method": QUANT_METHOD,
        "checkpoint_id": checkpoint_id,
        "layers_sha256": _layers_digest(layers),
    }
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, p, metadata=metadata))
    atomic_write(
        directory / CONFIG_NAME,
        lambda p: save_config_for_hf(
            model, p, model_config={"quantization_config": quantization_config}, model_args=model_args
        ),
    )
    return directory


def _resolve(directory_or_hub_id: str | os.PathLike) -> Path:
    path = Path(directory_or_hub_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"load_quantized: {str(path)!r} is a file; pass the checkpoint directory")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(directory_or_hub_id), allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, "*.md"]))


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"load_quantized: {cfg_path} is missing; not an acs_hf checkpoint")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"load_quantized: {cfg_path} is not valid JSON ({e})") from e
    qcfg = cfg.get("quantization_config")
    if not isinstance(qcfg, dict):
        raise ValueError(f"load_quantized: {cfg_path} has no quantization_config block")
    method = qcfg.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(f"load_quantized: unknown quant_method {method!r} in {cfg_path}; accepted: {QUANT_METHOD!r}")
    if qcfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load_quantized: format_version {qcfg.get('format_version')!r} in {cfg_path}; "
            f"this acs_hf reads {FORMAT_VERSION}"
        )
    if "architecture" not in cfg:
        raise ValueError(f"load_quantized: {cfg_path} has no 'architecture'")
    return cfg


def _read_tensors(path: Path, checkpoint_id: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"load_quantized: {weights} is missing")
    try:
        with safe_open(weights, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"load_quantized: {weights} is corrupt or truncated ({e})") from e
    if meta.get("checkpoint_id") != checkpoint_id:
        raise ValueError(
            f"load_quantized: {weights} and {CONFIG_NAME} come from different saves "
            f"(checkpoint ids {meta.get('checkpoint_id')!r} and {checkpoint_id!r}); save again"
        )
    return tensors, meta


def _layers_digest(layers: dict[str, Any]) -> str:
    """Hash of the layer table, stored in the weights file: an edited config.json is caught."""
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()


def _check_model_args(model_args: dict[str, Any], where: str) -> None:
    bad = sorted(set(model_args) - ALLOWED_MODEL_ARGS)
    if bad:
        raise ValueError(
            f"{where} has keys {bad} that are not architecture settings; accepted: {sorted(ALLOWED_MODEL_ARGS)}"
        )


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


def _weight_from_codes(name: str, packed: torch.Tensor, step: torch.Tensor, config: LayerQuantConfig, shape):
    """``w = (code - Qn) * step``, after checking the packed length and the code range."""
    bits, numel = config.weight_bits, math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_length(numel, bits):
        raise ValueError(
            f"load_quantized: layer {name!r}: {packed.numel()} packed bytes ({packed.dtype}) do not hold "
            f"{numel} codes of {bits} bits ({packed_length(numel, bits)} bytes expected); the checkpoint is "
            "corrupt or its config.json was edited"
        )
    codes = unpack_codes(packed, bits, numel).view(shape)
    qn, qp = quant_range(bits, True)
    if int(codes.max()) > qn + qp:
        raise ValueError(
            f"load_quantized: layer {name!r}: code {int(codes.max())} exceeds the {bits}-bit range 0..{qn + qp}; "
            "the checkpoint is corrupt or its config.json was edited"
        )
    expected_steps = shape[0] if config.per_channel else 1
    if step.numel() != expected_steps:
        raise ValueError(f"load_quantized: layer {name!r} has {step.numel()} weight steps, expected {expected_steps}")
    return (codes.float() - qn) * _broadcast_step(step, len(shape))


def load_quantized(directory_or_hub_id: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized` from a local directory or a Hub repo id.

    The timm architecture is created without pretrained weights, its layers are quantized as the
    checkpoint's layer table says, and filled from the unpacked codes (``w = code * step``), so its
    logits match the saved model's. Every table entry is checked against the architecture (type,
    shape, bits, packed length, code range): a mismatch names the layer. Hub ids go through
    ``huggingface_hub.snapshot_download`` (honours ``HF_HUB_OFFLINE`` and the cache).
    """
    import timm

    path = _resolve(directory_or_hub_id)
    cfg = _read_config(path)
    qcfg = cfg["quantization_config"]
    tensors, meta = _read_tensors(path, qcfg.get("checkpoint_id"))
    where = f"load_quantized: {path / CONFIG_NAME}"

    model_args = cfg.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise ValueError(f"{where}: model_args must be an object, got {model_args!r}")
    _check_model_args(model_args, f"{where}: model_args")
    model = timm.create_model(
        cfg["architecture"],
        pretrained=False,
        pretrained_cfg_overlay=cfg.get("pretrained_cfg"),
        **{**model_args, "num_classes": cfg.get("num_classes")},
    )
    layers = qcfg.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{where}: quantization_config.layers must be a non-empty object")
    digest = meta.get("layers_sha256")
    if digest is not None and digest != _layers_digest(layers):
        raise ValueError(
            f"{where}: the layer table does not match the one {WEIGHTS_NAME} was saved with (config.json was "
            "edited or mixed with another save); restore the original config.json"
        )
    modules = dict(model.named_modules())
    configs = {name: _layer_config(name, info, modules.get(name), where) for name, info in layers.items()}
    quantize_layers(model, configs)
    for name, config in configs.items():
        key, step_key = name + CODES_SUFFIX, f"{name}.weight_quantizer.step"
        if key not in tensors or step_key not in tensors:
            raise ValueError(f"load_quantized: {WEIGHTS_NAME} lacks {key!r} or {step_key!r}")
        shape = layers[name]["weight_shape"]
        tensors[f"{name}.weight"] = _weight_from_codes(name, tensors.pop(key), tensors[step_key], config, shape)
    result = model.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"load_quantized: state mismatch (missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
    if not quantizers_initialized(model):
        raise ValueError("load_quantized: the checkpoint holds uninitialised quantizers")
    return model.to(map_location).eval()
