"""transformers loads acs_hf checkpoints natively: ``from_pretrained`` and ``pipeline``.

``import acs_hf`` arranges for this module to register, the moment transformers' quantizer
registry is imported, our ``quantization_config`` class and :class:`LSQHfQuantizer` under the
checkpoints' ``quant_method`` (``acs_hf_lsq``). Then::

    import acs_hf  # noqa: F401
    from transformers import AutoModelForImageClassification, pipeline

    model = AutoModelForImageClassification.from_pretrained("user/resnet18-w4a4-acs")
    classify = pipeline("image-classification", model="user/resnet18-w4a4-acs")

work for timm students (transformers wraps them in ``TimmWrapperForImageClassification``) and for
transformers image models alike. Before the weights are read the quantizer swaps the layers the
checkpoint's table names for LSQ layers whose weight is a uint8 placeholder of the packed length,
so transformers copies the packed codes in as they are; afterwards it unpacks them into the float
weights ``(code - Qn) * step``: the model computes exactly what :func:`acs_hf.load_quantized`
builds. Without acs_hf, transformers stops on the packed weights' shapes (after a warning that
names ``acs_hf_lsq``) instead of returning a model with missing weights.

Such a model also goes back: ``save_pretrained`` (and so ``push_to_hub`` and the checkpoints of a
plain ``transformers.Trainer``, which may continue its QAT: the step sizes are parameters) writes
the folder :func:`acs_hf.save_quantized` writes, packed codes and checkpoint id included.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from torch import nn

# Submodules, not ``transformers.quantizers``: this runs right after ``quantizers.auto`` is
# imported, while the package's ``__init__`` may still be half-way through.
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..quantization.integrity import check_model_args, check_quantization_config, check_tensor_names, weights_metadata
from ..quantization.packed import (
    CONFIG_NAME,
    QUANT_METHOD,
    WEIGHTS_NAME,
    packed_state,
    prepare_packed_weights,
    unpack_state_dict,
    unpack_weights,
)
from ..quantization.serialization import read_checkpoint

__all__ = ["CheckedSavePretrained", "LSQQuantizationConfig", "LSQHfQuantizer", "quantized_root"]


class LSQQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` block of an acs_hf checkpoint, as transformers holds it.

    Written by :func:`acs_hf.save_quantized`, not by hand: ``layers`` is the per-layer table
    (type, weight shape, bits, signedness), ``checkpoint_id`` ties it to its weights file. Every
    key is kept as read, so ``to_dict`` gives back the block it came from.
    """

    def __init__(self, layers: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.quant_method = kwargs.pop("quant_method", QUANT_METHOD)
        self.layers = layers
        for key, value in kwargs.items():
            setattr(self, key, value)
        check_quantization_config(self.to_dict(), "acs_hf quantization_config")


class LSQHfQuantizer(HfQuantizer):
    """Loads a pre-quantized acs_hf checkpoint into transformers' ``from_pretrained``, and saves
    the loaded model (``save_pretrained``) in the same packed format.

    It does not quantize float models on the fly: quantization happens in training
    (:func:`acs_hf.quantize_model`, ``recipes/run_acs.py``), which learns the step sizes.
    """

    requires_calibration = True  # loads pre-quantized checkpoints only

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                f"device_map={device_map!r} offloads to disk; acs_hf checkpoints unpack their weights after "
                "loading and need them in memory: use a device_map without 'disk'"
            )

    def update_attn_implementation(self, config: Any) -> Any:
        # The one hook that sees the config before the model is built, and transformers' TimmWrapper
        # builds it with timm.create_model(**model_args): checkpoint_path & co. are refused here.
        check_model_args(getattr(config, "model_args", None), f"from_pretrained({config.name_or_path!r}): model_args")
        return config

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        where = f"from_pretrained({model.config.name_or_path!r})"
        files = [Path(p) for p in kwargs.get("checkpoint_files") or []]
        if len(files) != 1 or files[0].name != WEIGHTS_NAME:
            raise ValueError(
                f"{where}: an acs_hf checkpoint is one {WEIGHTS_NAME} beside its {CONFIG_NAME}; transformers "
                f"resolved {[str(f) for f in files]}"
            )
        # Before transformers reads a tensor, the checks of acs_hf.load_quantized: format, model_args,
        # layer table, architecture and tensor data as saved, then every tensor of the model present.
        cfg, tensors = read_checkpoint(files[0].parent, where)
        self.layers = cfg["quantization_config"]["layers"]  # the table checked, not another config's
        outputs = cfg["quantization_config"].get("outputs")
        prepare_packed_weights(quantized_root(model), self.layers, where, outputs=outputs)
        check_tensor_names(quantized_root(model), tensors, f"{where}: {files[0]}")
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        where = f"from_pretrained({model.config.name_or_path!r})"
        root = quantized_root(model)
        unpack_weights(root, self.layers, where)
        # load_state_dict of a saved folder's tensors (a Trainer resuming from its checkpoint)
        root.register_load_state_dict_pre_hook(functools.partial(_unpack_incoming, layers=self.layers))
        # The quantizer's save hooks never see save_pretrained's arguments: the model's own method checks them.
        model.save_pretrained = CheckedSavePretrained(model)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        # save_pretrained writes what get_state_dict_and_metadata gives: the packed format.
        return True

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What ``save_pretrained`` writes: the tensors :func:`acs_hf.save_quantized` writes (packed
        codes, step sizes, under the layer table's names) with their metadata (checkpoint id and the
        digests the loaders check), and a new ``quantization_config`` block on ``model.config``, which
        transformers writes to config.json right after this call."""
        where = f"save_pretrained({model.config.name_or_path!r})"
        previous = self.quantization_config.to_dict()
        state, block = packed_state(quantized_root(model), previous.get("config"), where)
        self.quantization_config = model.config.quantization_config = LSQQuantizationConfig(**block)
        self.layers = block["layers"]
        written = _config_as_saved(model)
        return state, weights_metadata(block, written, state)

    @property
    def is_trainable(self) -> bool:
        # The LSQ step sizes (and the float weights) are parameters, and Trainer checkpoints go
        # through save_pretrained, which writes the packed format: a plain Trainer continues QAT.
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


class CheckedSavePretrained:
    """``save_pretrained`` of a model loaded from an acs_hf checkpoint (and so ``push_to_hub`` and a
    plain Trainer's checkpoints): refuses, before anything is written, the arguments that would write
    a checkpoint no loader reads (both read one ``model.safetensors``), then saves as transformers does.
    A module-level class holding its model, so that the model still pickles and deep-copies."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        model, method = self.model, type(self.model).save_pretrained
        given = inspect.signature(method).bind(model, save_directory, *args, **kwargs).arguments
        if given.get("variant") is not None:
            raise ValueError(
                f"save_pretrained(variant={given['variant']!r}): an acs_hf checkpoint is one {WEIGHTS_NAME}, and "
                f"neither from_pretrained nor acs_hf.load_quantized reads model.{given['variant']}.safetensors; "
                "accepted: variant=None (save into another folder instead)"
            )
        if "max_shard_size" in given:
            _check_unsharded(quantized_root(model), given["max_shard_size"])
        return method(model, save_directory, *args, **kwargs)


def _check_unsharded(root: nn.Module, max_shard_size: Any) -> None:
    """Refuse a ``max_shard_size`` that would split the packed checkpoint of ``root`` into shards."""
    state, _ = packed_state(root, None, f"save_pretrained(max_shard_size={max_shard_size!r})")
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    if split.is_sharded:
        size = sum(t.numel() * t.element_size() for t in state.values())
        raise ValueError(
            f"save_pretrained(max_shard_size={max_shard_size!r}) would split the {size:,}-byte packed checkpoint "
            f"into {len(split.filename_to_tensors)} shards, which neither from_pretrained nor acs_hf.load_quantized "
            f"reads (an acs_hf checkpoint is one {WEIGHTS_NAME}); accepted: a max_shard_size of at least "
            f"{size:,} bytes (the default, 50GB)"
        )


def _unpack_incoming(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, *args: Any, layers: dict) -> None:
    unpack_state_dict(module, state, layers, prefix, f"load_state_dict({type(module).__name__})")


def _config_as_saved(model: nn.Module) -> dict[str, Any]:
    """config.json as ``save_pretrained`` is about to write it: what the weights' digests are of.

    transformers sets ``dtype`` and ``architectures`` after asking for the state dict, so they are
    set here first, to the same values; timm's ``pretrained_cfg`` gets back the ``num_classes`` that
    transformers drops on loading, as :func:`acs_hf.save_quantized` writes it.
    """
    config = model.config
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    if "transformers_weights" in config:  # config.save_pretrained drops it before writing
        delattr(config, "transformers_weights")
    pretrained_cfg = getattr(config, "pretrained_cfg", None)
    if config.model_type == "timm_wrapper" and isinstance(pretrained_cfg, dict):
        pretrained_cfg.setdefault("num_classes", config.num_labels)
    return json.loads(config.to_json_string(use_diff=True))


def quantized_root(model: nn.Module) -> nn.Module:
    """The module whose names the checkpoint's layer table uses: the timm model inside
    transformers' ``TimmWrapper*`` classes (timm checkpoints name layers without the wrapper's
    ``timm_model.`` prefix), the transformers model itself otherwise."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "timm_wrapper" and hasattr(model, "timm_model"):
        return model.timm_model
    return model


def register() -> None:
    """Register the config class and the quantizer with transformers (idempotent)."""
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is LSQHfQuantizer:
        return
    register_quantization_config(QUANT_METHOD)(LSQQuantizationConfig)
    register_quantizer(QUANT_METHOD)(LSQHfQuantizer)


register()
