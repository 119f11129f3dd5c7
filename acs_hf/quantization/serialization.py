"""Packed low-bit checkpoints on disk: ``save_quantized``, ``load_quantized``, ``read_checkpoint``.

Layout of a checkpoint directory (format 2):

- ``model.safetensors``: the packed state (:mod:`.packed`): each quantized layer's ``<name>.weight``
  as packed uint8 codes next to its step sizes; every other tensor (BN, biases, FP layers,
  quantizer state) as is. A loader that does not know the format fails on the weight shapes
  instead of building a model with missing weights.
- ``config.json``: timm's model config (``architecture``, ``num_classes``, ``model_args``,
  ``pretrained_cfg`` with the eval data config) or, for other models, the ``model_config`` the
  caller passes (e.g. a transformers config), plus a ``quantization_config`` block whose
  ``quant_method`` is ``acs_hf_lsq``.

Both files carry the same ``checkpoint_id`` so that a directory mixing two saves is rejected; the
weights file's metadata holds the digests of :mod:`.integrity`, checked by both loaders
(:func:`read_checkpoint`). Format 2 files saved before digests were recorded load without those
checks. Format 1 (``quant_method: lsq``, codes under ``<name>.weight_codes``) is still read. Files
are written under a temporary name and renamed into place, safetensors only.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..utils.io import atomic_write, save_safetensors
from .integrity import (
    check_model_args,
    check_quantization_config,
    check_saved_digests,
    check_tensor_names,
    weights_metadata,
)
from .model import QuantConfig
from .packed import (
    CONFIG_NAME,
    LEGACY_CODES_SUFFIX,
    WEIGHTS_NAME,
    check_packable,
    check_packed_length,
    packed_state,
    prepare_packed_weights,
    unpack_weights,
)

__all__ = ["load_quantized", "read_checkpoint", "save_quantized"]


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
            :data:`.integrity.ALLOWED_MODEL_ARGS`), if timm did not record them.
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
    check_packable(model, "save_quantized")
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
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_safetensors(state, p, metadata))
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(config_text))
    return directory


def _timm_config(model, quantization_config: dict, model_args, data_config, label_names) -> dict[str, Any]:
    from ..utils.upstream import save_timm_config

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
    check_saved_digests(meta, cfg, tensors, where, f"{loader}: {weights}")
    return cfg, tensors


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
    prepare_packed_weights(model, layers, where, outputs=qcfg.get("outputs"))
    if qcfg.get("format_version") == 1:  # codes under <layer>.weight_codes
        legacy = {n + LEGACY_CODES_SUFFIX: f"{n}.weight" for n in layers}
        tensors = {legacy.get(k, k): v for k, v in tensors.items()}
    for name, info in layers.items():
        packed = tensors.get(f"{name}.weight")
        if packed is None or f"{name}.weight_quantizer.step" not in tensors:
            raise ValueError(f"{where}: {WEIGHTS_NAME} lacks the codes or the step of layer {name!r}")
        # here, not in load_state_dict: a wrong length is named as a corrupt or edited checkpoint
        check_packed_length(name, packed, model.get_submodule(name).layer_config, info["weight_shape"], where)
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
