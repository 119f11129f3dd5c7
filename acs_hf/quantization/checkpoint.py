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
from .model import QuantConfig, quant_modules, quantize_model, quantizers_initialized

__all__ = ["save_quantized", "load_quantized", "pack_codes", "unpack_codes", "QUANT_METHOD"]

QUANT_METHOD = "lsq"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CODES_SUFFIX = ".weight_codes"


def _library_version() -> str:
    try:
        return importlib.metadata.version("acs_hf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _slot_bits(bits: int) -> int:
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


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
    s = wq.step.detach().float().cpu().clamp_min(STEP_FLOOR)
    if s.numel() > 1:
        s = s.view(-1, *([1] * (w.dim() - 1)))
    return (torch.round(w / s).clamp(-qn, qp) + qn).to(torch.uint8)


def save_quantized(model: nn.Module, directory: str | os.PathLike, model_args: dict | None = None) -> Path:
    """Save a quantized timm model as packed integer codes plus ``config.json``.

    Args:
        model: a timm model prepared with :func:`quantize_model` and calibrated.
        directory: where to write (created if missing; other files in it are left alone).
        model_args: extra ``timm.create_model`` kwargs to record, if timm did not record them.

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
    quant_cfg = getattr(model, "quant_config", None)
    quantization_config = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "library": "acs_hf",
        "library_version": _library_version(),
        "checkpoint_id": checkpoint_id,
        "config": quant_cfg.to_dict() if quant_cfg is not None else None,
        "layers": layers,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "quant_method": QUANT_METHOD, "checkpoint_id": checkpoint_id}
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


def _read_tensors(path: Path, checkpoint_id: str) -> dict[str, torch.Tensor]:
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
    return tensors


def load_quantized(directory_or_hub_id: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized` from a local directory or a Hub repo id.

    The timm architecture is created without pretrained weights, quantized with the saved config,
    and filled from the unpacked codes (``w = code * step``), so its logits match the saved model's.
    Hub ids go through ``huggingface_hub.snapshot_download`` (honours ``HF_HUB_OFFLINE`` and the cache).
    """
    import timm

    path = _resolve(directory_or_hub_id)
    cfg = _read_config(path)
    qcfg = cfg["quantization_config"]
    tensors = _read_tensors(path, qcfg.get("checkpoint_id"))

    model_args = {**cfg.get("model_args", {}), "num_classes": cfg.get("num_classes")}
    model = timm.create_model(
        cfg["architecture"], pretrained=False, pretrained_cfg_overlay=cfg.get("pretrained_cfg"), **model_args
    )
    quantize_model(model, QuantConfig(**(qcfg.get("config") or {})))
    qmods = dict(quant_modules(model))
    layers = qcfg.get("layers", {})
    if set(layers) != set(qmods):
        missing, extra = sorted(set(layers) - set(qmods)), sorted(set(qmods) - set(layers))
        raise ValueError(
            f"load_quantized: quantized layers differ from the rebuilt model (in checkpoint only: "
            f"{missing[:5]}, in model only: {extra[:5]})"
        )
    for name, info in layers.items():
        m = qmods[name]
        key = name + CODES_SUFFIX
        if key not in tensors:
            raise ValueError(f"load_quantized: {WEIGHTS_NAME} lacks {key!r}")
        bits, shape = info["weight_bits"], info["weight_shape"]
        if bits != m.weight_quantizer.bits or list(m.weight.shape) != shape:
            raise ValueError(f"load_quantized: layer {name!r} does not match the rebuilt model")
        numel = math.prod(shape)
        codes = unpack_codes(tensors.pop(key), bits, numel).view(shape)
        qn, _ = quant_range(bits, True)
        step = tensors[f"{name}.weight_quantizer.step"].float().clamp_min(STEP_FLOOR)
        if step.numel() > 1:
            step = step.view(-1, *([1] * (len(shape) - 1)))
        tensors[f"{name}.weight"] = (codes.float() - qn) * step
    result = model.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"load_quantized: state mismatch (missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
    if not quantizers_initialized(model):
        raise ValueError("load_quantized: the checkpoint holds uninitialised quantizers")
    return model.to(map_location).eval()
