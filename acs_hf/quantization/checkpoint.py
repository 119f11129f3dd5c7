"""Packed low-bit checkpoints: integer weight codes in uint8, written atomically, safetensors only.

Layout of a checkpoint directory (format 2):

- ``model.safetensors``: for every quantized layer ``<name>.weight`` holds the integer codes
  (offset to be non-negative, packed four 2-bit, two 3/4-bit or one 5..8-bit code per byte, a flat
  uint8 tensor) next to the layer's step sizes; every other tensor (BN, biases, FP layers,
  quantizer state) as is. A loader that does not know the format fails on the weight shapes
  instead of building a model with missing weights.
- ``config.json``: timm's model config (``architecture``, ``num_classes``, ``model_args``,
  ``pretrained_cfg`` with the eval data config) or, for other models, the ``model_config`` the
  caller passes (e.g. a transformers config), plus a ``quantization_config`` block whose
  ``quant_method`` is ``acs_hf_lsq``.

Both files carry the same ``checkpoint_id`` so that a directory mixing two saves is rejected. The
weights file's metadata also records what it was saved with: ``layers_sha256`` (the layer table),
``architecture_config`` (the config.json keys that build the model, see :func:`_architecture`) and
``tensors_sha256`` (a sha256 per tensor), checked by both loaders (:func:`read_checkpoint`).
Format 2 files saved before these were recorded load without those checks.
Format 1 (``quant_method: lsq``, codes under ``<name>.weight_codes``) is still read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import reprlib
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .._io import atomic_write
from .lsq import STEP_FLOOR, LSQQuantizer, quant_range
from .model import QuantConfig, quant_modules, quantize_layers, quantizers_initialized
from .modules import LayerQuantConfig, quant_class_for

__all__ = [
    "save_quantized",
    "load_quantized",
    "pack_codes",
    "unpack_codes",
    "layer_configs_from_table",
    "prepare_packed_weights",
    "unpack_weights",
    "unpack_state_dict",
    "read_checkpoint",
    "check_model_args",
    "check_tensor_names",
    "packed_state",
    "weights_metadata",
    "QUANT_METHOD",
    "WEIGHTS_NAME",
]

QUANT_METHOD = "acs_hf_lsq"  # named after the library: loaders that lack it print where to get it
FORMAT_VERSION = 2
#: quant_method -> format version, for every format this version reads.
READABLE_FORMATS = {QUANT_METHOD: FORMAT_VERSION, "lsq": 1}
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LEGACY_CODES_SUFFIX = ".weight_codes"  # format 1
#: ``model_args`` a checkpoint may pass to ``timm.create_model``: architecture only. Anything else
#: (``checkpoint_path``, ``pretrained_cfg``, ...) could make loading read files of the config's choosing.
ALLOWED_MODEL_ARGS = frozenset(
    {"num_classes", "img_size", "in_chans", "global_pool", "patch_size", "window_size", "class_token", "output_stride"}
)
#: config.json keys outside the architecture digest: the layer table (its own digest), timm's
#: preprocessing and class names. Every other key (``architecture``, ``model_args``, a transformers
#: config's sizes, ...) must be as saved.
NON_ARCHITECTURE_KEYS = frozenset({"quantization_config", "pretrained_cfg", "label_names", "label_descriptions"})

logger = logging.getLogger(__name__)


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


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    model_args: dict | None = None,
    config: QuantConfig | None = None,
    data_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    label_names: list[str] | None = None,
) -> Path:
    """Save a quantized model as packed integer codes plus ``config.json``.

    Args:
        model: a model prepared with :func:`quantize_model` and calibrated.
        directory: where to write (created if missing; other files in it are left alone).
        model_args: extra ``timm.create_model`` kwargs to record (architecture keys only, see
            :data:`ALLOWED_MODEL_ARGS`), if timm did not record them.
        config: the :class:`QuantConfig` the model was quantized with, recorded for reference;
            loading needs only the per-layer table that is always written.
        data_config: the eval preprocessing the model was evaluated with (timm's
            ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``),
            recorded in ``pretrained_cfg`` so that loaders (timm, transformers' image processor)
            preprocess as the run did.
        model_config: for a model that is not a timm model, the JSON-able config that rebuilds its
            architecture (e.g. a transformers ``config.to_dict()``); written as ``config.json``
            with the ``quantization_config`` block added. Timm models leave it ``None``.
        label_names: class names by class index, recorded for timm models (transformers'
            ``pipeline`` shows them; a ``model_config`` carries its own ``id2label``).

    Returns the directory. Each file is written under a temporary name and renamed into place.
    """
    _check_packable(model, "save_quantized")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if model_config is None and "architecture" not in cfg:
        raise ValueError(
            "save_quantized needs a timm model (one with pretrained_cfg['architecture']) or, for other models, "
            "model_config (the config that rebuilds the architecture)"
        )
    check_model_args(model_args, "save_quantized: model_args")

    state, quantization_config = packed_state(model, config.to_dict() if config is not None else None)
    if model_config is not None:
        content = {**model_config, "quantization_config": quantization_config}
    else:
        content = _timm_config(model, quantization_config, model_args, data_config, label_names)
    config_text = json.dumps(content, indent=2)
    metadata = weights_metadata(quantization_config, json.loads(config_text), state)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, p, metadata=metadata))
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(config_text))
    return directory


def _check_packable(model: nn.Module, where: str) -> None:
    if not quant_modules(model):
        raise ValueError(f"{where}: the model has no quantized layers; call quantize_model first")
    if not quantizers_initialized(model):
        raise RuntimeError(f"{where}: some quantizers are uninitialised; call calibrate_quantizers first")


def packed_state(
    model: nn.Module, config: dict[str, Any] | None = None, where: str = "save_quantized"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What :func:`save_quantized` writes for the quantized ``model``: its tensors by state-dict
    name (each quantized weight as packed codes, on the CPU) and the ``quantization_config`` block
    (layer table, a new ``checkpoint_id``, ``config``: the :class:`QuantConfig` as a dict, or
    ``None``). transformers' ``save_pretrained`` of a loaded model writes the same
    (:class:`acs_hf.hf_quantizer.LSQHfQuantizer`); ``where`` names the caller in errors."""
    _check_packable(model, where)
    state, layers = _packed_state(model, quant_modules(model))
    quantization_config = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "library": "acs_hf",
        "library_version": _library_version(),
        "checkpoint_id": uuid.uuid4().hex,
        "config": config,
        "layers": layers,
    }
    return state, quantization_config


def weights_metadata(
    quantization_config: dict[str, Any], config_json: dict[str, Any], state: Mapping[str, torch.Tensor]
) -> dict[str, str]:
    """The weights file's metadata for ``state`` (as :func:`packed_state` gives it) saved beside
    ``config_json``, the config.json as a loader will read it back (with ``quantization_config``):
    the checkpoint id and the digests that :func:`read_checkpoint` checks."""
    return _weights_metadata(quantization_config["checkpoint_id"], quantization_config["layers"], config_json, state)


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


def _weights_metadata(checkpoint_id: str, layers: dict, cfg: dict, state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The weights file's metadata: what :func:`read_checkpoint` checks. ``cfg`` is config.json as a
    loader reads it back (JSON turns tuples into lists, int keys into strings)."""
    return {
        "format": "pt",
        "quant_method": QUANT_METHOD,
        "checkpoint_id": checkpoint_id,
        "layers_sha256": _layers_digest(layers),
        "architecture_config": _dumps(_architecture(cfg)),
        "tensors_sha256": _dumps({k: _tensor_digest(v) for k, v in state.items()}),
    }


def _timm_config(model, quantization_config: dict, model_args, data_config, label_names) -> dict[str, Any]:
    from ..upstream import save_timm_config

    model_config = {"quantization_config": quantization_config}
    if label_names:
        model_config["label_names"] = list(label_names)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONFIG_NAME
        save_timm_config(model, str(path), model_config=model_config, model_args=model_args, data_config=data_config)
        cfg = json.loads(path.read_text())
    # The root num_classes is the one timm and transformers' TimmWrapper read; the wrapper also
    # passes model_args to timm.create_model, and a second num_classes there is a TypeError.
    (cfg.get("model_args") or {}).pop("num_classes", None)
    return cfg


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def _architecture(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config.json keys that build the model: all but :data:`NON_ARCHITECTURE_KEYS`."""
    return {k: v for k, v in cfg.items() if k not in NON_ARCHITECTURE_KEYS}


def _tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{tensor.dtype}{list(tensor.shape)}".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _resolve(directory_or_hub_id: str | os.PathLike) -> Path:
    path = Path(directory_or_hub_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"load_quantized: {str(path)!r} is a file; pass the checkpoint directory")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(directory_or_hub_id), allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, "*.md"]))


def _read_config(path: Path, loader: str) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{loader}: {cfg_path} is missing; not an acs_hf checkpoint")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{loader}: {cfg_path} is not valid JSON ({e})") from e
    qcfg = cfg.get("quantization_config")
    if not isinstance(qcfg, dict):
        raise ValueError(f"{loader}: {cfg_path} has no quantization_config block")
    check_quantization_config(qcfg, f"{loader}: {cfg_path}")
    return cfg


def check_quantization_config(qcfg: dict[str, Any], where: str) -> None:
    """Refuse a ``quantization_config`` block of a method or format version this acs_hf cannot read."""
    method = qcfg.get("quant_method")
    if method not in READABLE_FORMATS:
        raise ValueError(f"{where}: unknown quant_method {method!r}; accepted: {sorted(READABLE_FORMATS)}")
    if qcfg.get("format_version") != READABLE_FORMATS[method]:
        raise ValueError(
            f"{where}: format_version {qcfg.get('format_version')!r} with quant_method {method!r}; this acs_hf "
            f"reads {READABLE_FORMATS[method]} (upgrade acs_hf for newer checkpoints)"
        )
    layers = qcfg.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{where}: quantization_config.layers must be a non-empty object")


def _read_tensors(path: Path, loader: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{loader}: {weights} is missing")
    try:
        with safe_open(weights, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{loader}: {weights} is corrupt or truncated ({e})") from e
    return tensors, meta


def read_checkpoint(path: Path, loader: str = "load_quantized") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the tensors of the checkpoint folder ``path``, after every check both loaders
    (``loader`` names the one in errors) make before building the model: known format, ``model_args``
    of architecture keys only, one save, and the layer table, the architecture keys of config.json and
    each tensor's bytes as saved (for files that record them). A mismatch names the file and the value."""
    cfg = _read_config(path, loader)
    tensors, meta = _read_tensors(path, loader)
    where, weights = f"{loader}: {path / CONFIG_NAME}", path / WEIGHTS_NAME
    check_model_args(cfg.get("model_args"), f"{where}: model_args")
    check_digest(meta, cfg["quantization_config"], where)
    if "architecture_config" not in meta or "tensors_sha256" not in meta:
        logger.info("%s: %s records no architecture or tensor digests (an older save): not checked", loader, weights)
    if "architecture_config" in meta:
        _check_architecture(json.loads(meta["architecture_config"]), _architecture(cfg), where)
    if "tensors_sha256" in meta:
        _check_tensor_data(json.loads(meta["tensors_sha256"]), tensors, f"{loader}: {weights}")
    return cfg, tensors


def _check_architecture(saved: dict[str, Any], found: dict[str, Any], where: str) -> None:
    absent = "<absent>"
    changed = [
        k for k in sorted(saved.keys() | found.keys()) if _dumps(saved.get(k, absent)) != _dumps(found.get(k, absent))
    ]
    if changed:
        diffs = "; ".join(
            f"{k} is {reprlib.repr(found.get(k, absent))}, saved {reprlib.repr(saved.get(k, absent))}" for k in changed
        )
        raise ValueError(
            f"{where}: the architecture does not match the one {WEIGHTS_NAME} was saved with ({diffs}); config.json "
            "was edited or mixed with another save: restore the saved values"
        )


def _check_tensor_data(saved: dict[str, str], tensors: Mapping[str, torch.Tensor], where: str) -> None:
    missing, extra = sorted(saved.keys() - tensors.keys()), sorted(tensors.keys() - saved.keys())
    if missing or extra:
        raise ValueError(
            f"{where}: the file lacks saved tensors {missing[:10]} and holds unsaved ones {extra[:10]}; "
            "it was modified after saving: save or download it again"
        )
    for name, digest in saved.items():
        found = _tensor_digest(tensors[name])
        if found != digest:
            raise ValueError(
                f"{where}: tensor {name!r} has sha256 {found[:16]}..., saved {digest[:16]}...; the file is corrupt "
                "or was modified after saving: save or download it again"
            )


def check_tensor_names(model: nn.Module, names: Mapping[str, Any], where: str) -> None:
    """Refuse a weights file that lacks tensors of ``model``'s state or holds tensors it has not."""
    expected = model.state_dict().keys()
    missing, unexpected = sorted(expected - names.keys()), sorted(names.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"{where}: the file does not hold the tensors of the architecture: {len(missing)} missing "
            f"{missing[:10]}, {len(unexpected)} unexpected {unexpected[:10]}; accepted: exactly the model's tensors"
        )


def _layers_digest(layers: dict[str, Any]) -> str:
    """Hash of the layer table, stored in the weights file: an edited config.json is caught."""
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()


def check_model_args(model_args: Any, where: str) -> None:
    """Refuse ``model_args`` (``timm.create_model`` kwargs) other than architecture keys."""
    if model_args is None:
        return
    if not isinstance(model_args, dict):
        raise ValueError(f"{where} must be an object, got {model_args!r}")
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


def _check_packed(name: str, packed: torch.Tensor, config: LayerQuantConfig, shape, where: str) -> None:
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
    _check_packed(name, packed, config, shape, where)
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


def prepare_packed_weights(model: nn.Module, layers: dict[str, Any], where: str = "load_quantized") -> nn.Module:
    """Quantize the float architecture ``model`` as the layer table says, each quantized weight a
    flat uint8 placeholder of its packed length, in place.

    A loader that copies tensors by name (``load_state_dict``, transformers' ``from_pretrained``)
    then fills in the checkpoint's packed codes and step sizes; :func:`unpack_weights` turns the
    codes into the float weights afterwards.
    """
    configs = layer_configs_from_table(model, layers, where)
    quantize_layers(model, configs)
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


def check_digest(meta: dict[str, str], qcfg: dict[str, Any], where: str) -> None:
    """Refuse weights whose metadata names another save, or a layer table edited since saving."""
    if meta.get("checkpoint_id") != qcfg.get("checkpoint_id"):
        raise ValueError(
            f"{where}: {WEIGHTS_NAME} and {CONFIG_NAME} come from different saves "
            f"(checkpoint ids {meta.get('checkpoint_id')!r} and {qcfg.get('checkpoint_id')!r}); save again"
        )
    digest = meta.get("layers_sha256")
    if digest is not None and digest != _layers_digest(qcfg["layers"]):
        raise ValueError(
            f"{where}: the layer table does not match the one {WEIGHTS_NAME} was saved with (config.json was "
            "edited or mixed with another save); restore the original config.json"
        )


def load_quantized(
    directory_or_hub_id: str | os.PathLike, map_location: str | torch.device = "cpu", model: nn.Module | None = None
) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized` from a local directory or a Hub repo id.

    The timm architecture is created without pretrained weights (or ``model``, a float instance of
    the saved architecture, is used: the way to load a checkpoint of a non-timm model here), its
    layers are quantized as the checkpoint's layer table says, and filled from the unpacked codes
    (``w = code * step``), so its logits match the saved model's. Every table entry is checked
    against the architecture (type, shape, bits, packed length, code range): a mismatch names the
    layer. Hub ids go through ``huggingface_hub.snapshot_download`` (honours ``HF_HUB_OFFLINE`` and
    the cache). After ``import acs_hf``, transformers' ``from_pretrained`` loads the same folders.
    """
    path = _resolve(directory_or_hub_id)
    cfg, tensors = read_checkpoint(path)
    qcfg = cfg["quantization_config"]
    where = f"load_quantized: {path / CONFIG_NAME}"
    if model is None:
        model = _build_timm_model(cfg, where)
    layers = qcfg["layers"]
    prepare_packed_weights(model, layers, where)
    if qcfg.get("format_version") == 1:  # codes under <layer>.weight_codes
        legacy = {n + LEGACY_CODES_SUFFIX: f"{n}.weight" for n in layers}
        tensors = {legacy.get(k, k): v for k, v in tensors.items()}
    for name, info in layers.items():
        packed = tensors.get(f"{name}.weight")
        if packed is None or f"{name}.weight_quantizer.step" not in tensors:
            raise ValueError(f"{where}: {WEIGHTS_NAME} lacks the codes or the step of layer {name!r}")
        # here, not in load_state_dict: a wrong length is named as a corrupt or edited checkpoint
        _check_packed(name, packed, model.get_submodule(name).layer_config, info["weight_shape"], where)
    check_tensor_names(model, tensors, f"load_quantized: {path / WEIGHTS_NAME}")
    model.load_state_dict(tensors)
    unpack_weights(model, layers, where)
    return model.to(map_location).eval()


def _build_timm_model(cfg: dict[str, Any], where: str) -> nn.Module:
    import timm

    if "architecture" not in cfg:
        kind = f"a {cfg['model_type']!r} model" if "model_type" in cfg else "not a timm model"
        raise ValueError(
            f"{where}: the checkpoint is {kind} (no 'architecture'); pass its float architecture as model=..., "
            "or, after `import acs_hf`, load it with transformers' AutoModelForImageClassification.from_pretrained"
        )
    model_args = cfg.get("model_args") or {}  # architecture keys only: checked by read_checkpoint
    return timm.create_model(
        cfg["architecture"],
        pretrained=False,
        pretrained_cfg_overlay=cfg.get("pretrained_cfg"),
        **{**model_args, "num_classes": cfg.get("num_classes")},
    )
