"""What makes a checkpoint trustworthy: the digests a save records and the checks a load makes.

The weights file's metadata records the ``checkpoint_id`` of its save, ``layers_sha256`` (the layer
table), ``architecture_config`` (the config.json keys that build the model, see
:func:`_architecture`) and ``tensors_sha256`` (a sha256 per tensor). Both loaders
(:func:`acs_hf.load_quantized`, transformers' ``from_pretrained``) check them, and the
``model_args`` a config may pass to timm, before building anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import reprlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .packed import CONFIG_NAME, QUANT_METHOD, READABLE_FORMATS, WEIGHTS_NAME

__all__ = [
    "check_digest",
    "check_model_args",
    "check_saved_digests",
    "check_quantization_config",
    "check_tensor_names",
    "weights_metadata",
]

logger = logging.getLogger(__name__)

#: ``model_args`` a checkpoint may pass to ``timm.create_model``: architecture only. Anything else
#: (``checkpoint_path``, ``pretrained_cfg``, ...) could make loading read files of the config's choosing.
ALLOWED_MODEL_ARGS = frozenset(
    {"num_classes", "img_size", "in_chans", "global_pool", "patch_size", "window_size", "class_token", "output_stride"}
)
#: config.json keys outside the architecture digest: the layer table (its own digest), timm's
#: preprocessing and class names. Every other key (``architecture``, ``model_args``, a transformers
#: config's sizes, ...) must be as saved.
NON_ARCHITECTURE_KEYS = frozenset({"quantization_config", "pretrained_cfg", "label_names", "label_descriptions"})


def weights_metadata(
    quantization_config: dict[str, Any], config_json: dict[str, Any], state: Mapping[str, torch.Tensor]
) -> dict[str, str]:
    """The weights file's metadata for ``state`` (as :func:`.packed.packed_state` gives it) saved beside
    ``config_json``, the config.json as a loader will read it back (with ``quantization_config``):
    the checkpoint id and the digests that :func:`.serialization.read_checkpoint` checks."""
    return _weights_metadata(quantization_config["checkpoint_id"], _tables(quantization_config), config_json, state)


def _tables(qcfg: dict[str, Any]) -> dict[str, Any]:
    """What the layer digest covers: the layer table, and the output quantizers' table where there is one
    (older checkpoints have none, and keep their digests)."""
    return qcfg["layers"] if qcfg.get("outputs") is None else {"layers": qcfg["layers"], "outputs": qcfg["outputs"]}


def _weights_metadata(checkpoint_id: str, layers: dict, cfg: dict, state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The weights file's metadata: what :func:`.serialization.read_checkpoint` checks. ``cfg`` is config.json as a
    loader reads it back (JSON turns tuples into lists, int keys into strings)."""
    return {
        "format": "pt",
        "quant_method": QUANT_METHOD,
        "checkpoint_id": checkpoint_id,
        "layers_sha256": _layers_digest(layers),
        "architecture_config": _dumps(_architecture(cfg)),
        "tensors_sha256": _dumps({k: _tensor_digest(v) for k, v in state.items()}),
    }


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


def _layers_digest(layers: dict[str, Any]) -> str:
    """Hash of the layer table, stored in the weights file: an edited config.json is caught."""
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()


def check_quantization_config(qcfg: dict[str, Any], where: str) -> None:
    """Refuse a ``quantization_config`` block of a method or format version this acs_hf cannot read."""
    method = qcfg.get("quant_method")
    if method not in READABLE_FORMATS:
        raise ValueError(f"{where}: unknown quant_method {method!r}; accepted: {sorted(READABLE_FORMATS)}")
    if qcfg.get("format_version") not in READABLE_FORMATS[method]:
        raise ValueError(
            f"{where}: format_version {qcfg.get('format_version')!r} with quant_method {method!r}; this acs_hf "
            f"reads {' or '.join(map(str, READABLE_FORMATS[method]))} (upgrade acs_hf for newer checkpoints)"
        )
    layers = qcfg.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{where}: quantization_config.layers must be a non-empty object")


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


def check_digest(meta: dict[str, str], qcfg: dict[str, Any], where: str) -> None:
    """Refuse weights whose metadata names another save, or a layer table edited since saving."""
    if meta.get("checkpoint_id") != qcfg.get("checkpoint_id"):
        raise ValueError(
            f"{where}: {WEIGHTS_NAME} and {CONFIG_NAME} come from different saves "
            f"(checkpoint ids {meta.get('checkpoint_id')!r} and {qcfg.get('checkpoint_id')!r}); save again"
        )
    digest = meta.get("layers_sha256")
    if digest is not None and digest != _layers_digest(_tables(qcfg)):
        raise ValueError(
            f"{where}: the layer table does not match the one {WEIGHTS_NAME} was saved with ({CONFIG_NAME} was "
            f"edited or mixed with another save); restore the original {CONFIG_NAME}"
        )


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
            f"{where}: the architecture does not match the one {WEIGHTS_NAME} was saved with ({diffs}); {CONFIG_NAME} "
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


def check_saved_digests(
    meta: dict[str, str], cfg: dict[str, Any], tensors: Mapping[str, torch.Tensor], where: str, weights_where: str
) -> None:
    """Refuse a checkpoint whose weights-file ``meta`` names another save, or whose layer table, the
    architecture keys of config.json ``cfg`` or a tensor's bytes differ from what was saved (for files
    that record them). ``where`` names config.json in errors, ``weights_where`` the weights file."""
    check_digest(meta, cfg["quantization_config"], where)
    if "architecture_config" not in meta or "tensors_sha256" not in meta:
        logger.info("%s records no architecture or tensor digests (an older save): not checked", weights_where)
    if "architecture_config" in meta:
        _check_architecture(json.loads(meta["architecture_config"]), _architecture(cfg), where)
    if "tensors_sha256" in meta:
        _check_tensor_data(json.loads(meta["tensors_sha256"]), tensors, weights_where)
