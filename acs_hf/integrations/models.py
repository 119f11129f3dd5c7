"""Students and teachers by name: timm models, and transformers image-classification models.

``model_name`` is a timm id (``resnet18``), ``hf-hub:<repo>`` (a timm repo), a local folder (timm
or transformers, told apart by its ``config.json``) or a Hub id ``org/name`` of a transformers
model (``google/vit-base-patch16-224``), loaded with ``AutoModelForImageClassification``.

A transformers model gets a timm-style ``pretrained_cfg`` derived from its image processor
(input size, mean, std, interpolation, resize/crop), so one code path (timm's
``resolve_data_config`` + ``create_transform``) builds every model's transforms, and the same
first/last-layer rule picks its patch embedding and classifier.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..quantization.packed import CONFIG_NAME

__all__ = [
    "check_model_name",
    "create_model",
    "is_transformers_name",
    "model_size_kwargs",
    "processor_data_config",
    "load_image_processor",
    "image_processor_for",
]

logger = logging.getLogger(__name__)

#: PIL resampling codes (transformers' ``resample``) as timm interpolation names.
_INTERPOLATION = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def folder_config(folder: str) -> dict[str, Any]:
    """The ``config.json`` of a model folder as a dict (empty when it has none)."""
    path = Path(folder) / CONFIG_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def is_transformers_name(name: str) -> bool:
    """True for a transformers model: a folder whose ``config.json`` has a ``model_type`` (and is not
    a timm config), or a Hub id ``org/name`` that is not a timm name."""
    if name.startswith(("hf-hub:", "local-dir:")):
        return False
    if os.path.isdir(name):
        cfg = folder_config(name)
        return "model_type" in cfg and "pretrained_cfg" not in cfg
    return "/" in name and not timm.is_model(name)


def check_model_name(name: str) -> None:
    """Fail fast on a model id that neither timm nor transformers can build (before any data is loaded)."""
    if name.startswith(("hf-hub:", "local-dir:")) or os.path.isdir(name) or is_transformers_name(name):
        return
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(
            f"model_name={name!r} is not a timm model; use a timm id (e.g. {', '.join(close) or 'resnet18'}), "
            "an 'hf-hub:<repo>' id, a transformers Hub id ('org/name') or a local folder"
        )


def _timm_name(name: str) -> str:
    return f"local-dir:{name}" if os.path.isdir(name) else name


def _fixed_size(name: str) -> int | None:
    """The input size a timm model is built for when it cannot take another one without being built
    for it (ViT, DeiT, Swin: position embeddings and windows), else None. Hub ids are resolved by
    timm at creation and treated as fixed when their config says so."""
    if os.path.isdir(name):
        cfg = folder_config(name).get("pretrained_cfg", {})
    elif name.startswith("hf-hub:") or is_transformers_name(name):
        return None
    else:
        found = timm.models.get_pretrained_cfg(name.split(".")[0]) if timm.is_model(name) else None
        cfg = found.to_dict() if found is not None else {}
    return int(cfg["input_size"][-1]) if cfg.get("fixed_input_size") and cfg.get("input_size") else None


@functools.lru_cache(maxsize=8)
def model_size_kwargs(name: str, image_size: int | None) -> dict[str, int]:
    """``{"img_size": image_size}`` for a fixed-size timm model asked for another size, else ``{}``.

    The model is built once (random weights) at that size and run on one image, so that a size it
    cannot take fails here, before any data is loaded, with the size it was built for.
    """
    fixed = _fixed_size(name)
    if image_size is None or fixed is None or fixed == image_size:
        return {}
    try:
        probe = timm.create_model(_timm_name(name), pretrained=False, num_classes=2, img_size=image_size)
        with torch.no_grad():
            probe.eval()(torch.zeros(1, 3, image_size, image_size))
    except Exception as e:  # timm raises assertions, type and value errors for impossible sizes
        raise ValueError(
            f"model_name={name!r} cannot run at image_size={image_size} ({type(e).__name__}: {e}); it was built for "
            f"{fixed}x{fixed}: pick a size its patch and window sizes divide, or leave --image_size unset"
        ) from e
    return {"img_size": image_size}


def create_model(
    name: str,
    pretrained: bool,
    num_classes: int,
    image_size: int | None = None,
    id2label: dict[int, str] | None = None,
) -> nn.Module:
    """A timm model, or a transformers ``AutoModelForImageClassification`` (see the module docstring).

    Fixed-size timm models are built at ``image_size`` (timm resamples pretrained position
    embeddings to the new grid). A transformers model gets a new ``num_classes`` head (and
    ``id2label``); it can change ``image_size`` only when it is not pretrained (its position
    embeddings were learnt at its own size).
    """
    if is_transformers_name(name):
        return _create_transformers_model(name, pretrained, num_classes, image_size, id2label)
    kwargs = model_size_kwargs(name, image_size)
    model = timm.create_model(_timm_name(name), pretrained=pretrained, num_classes=num_classes, **kwargs)
    if kwargs:  # its data config (transforms, saved config.json) follows the size it was built for
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, image_size, image_size)}
    return model


def _create_transformers_model(
    name: str, pretrained: bool, num_classes: int, image_size: int | None, id2label: dict[int, str] | None
) -> nn.Module:
    from transformers import AutoConfig, AutoModelForImageClassification

    if id2label is not None and len(id2label) != num_classes:
        raise ValueError(f"id2label has {len(id2label)} classes, num_classes is {num_classes}")
    labels: dict[str, Any] = (
        {"id2label": dict(id2label), "label2id": {v: k for k, v in id2label.items()}}
        if id2label is not None
        else {"num_labels": num_classes}
    )
    config = AutoConfig.from_pretrained(name, **labels)
    own_size = getattr(config, "image_size", None)
    if image_size is not None and own_size is not None and own_size != image_size:
        if pretrained:
            raise ValueError(
                f"model_name={name!r} is a pretrained transformers model built for {own_size}x{own_size}; "
                f"image_size={image_size} would discard its position embeddings: leave --image_size unset, or "
                "use the timm version of the model (timm resamples them)"
            )
        config.image_size = image_size
    if pretrained:  # a new head for num_classes: its old size does not match, by design
        model = AutoModelForImageClassification.from_pretrained(name, config=config, ignore_mismatched_sizes=True)
    else:
        model = AutoModelForImageClassification.from_config(config)
    model.pretrained_cfg = processor_data_config(load_image_processor(name), image_size, own_size or 224)
    return model


def load_image_processor(name: str):
    """The image processor saved with a transformers model, or ``None`` when it has none."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name)
    except OSError:  # no preprocessor_config.json
        return None


def processor_data_config(processor, image_size: int | None = None, default_size: int = 224) -> dict[str, Any]:
    """A timm data config (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``,
    ``crop_mode``) that preprocesses as a transformers image processor does.

    ``{"height", "width"}`` sizes resize to that size regardless of aspect (timm's ``squash``),
    ``{"shortest_edge"}`` sizes keep the aspect and centre-crop (timm's ``center``); a
    ``crop_size`` (``do_center_crop``) or the processor's ``crop_pct`` sets timm's ``crop_pct``.
    Without a processor: ImageNet mean/std, bicubic, ``image_size`` (or ``default_size``), no crop.
    ``image_size`` given: the input size becomes ``image_size`` squared, no crop (what
    :func:`image_processor_for` saves for such a run).
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg: dict[str, Any] = {
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "crop_pct": 1.0,
        "crop_mode": "squash",
    }
    if processor is None:
        logger.warning("No image processor found: ImageNet mean/std, bicubic resize to the model's input size")
        size = image_size or default_size
        return {**cfg, "input_size": (3, size, size)}
    cfg["mean"] = tuple(getattr(processor, "image_mean", None) or cfg["mean"])
    cfg["std"] = tuple(getattr(processor, "image_std", None) or cfg["std"])
    resample = getattr(processor, "resample", None)
    cfg["interpolation"] = _INTERPOLATION.get(int(resample), "bilinear") if resample is not None else "bilinear"
    if image_size is not None:
        return {**cfg, "input_size": (3, image_size, image_size)}
    size = dict(getattr(processor, "size", None) or {})
    crop = dict(getattr(processor, "crop_size", None) or {}) if getattr(processor, "do_center_crop", False) else {}
    if "shortest_edge" in size:
        edge = size["shortest_edge"]
        out = (crop.get("height", edge), crop.get("width", edge))
        crop_pct = getattr(processor, "crop_pct", None) or (out[0] / edge if crop else 1.0)
        return {**cfg, "input_size": (3, *out), "crop_pct": float(crop_pct), "crop_mode": "center"}
    if "height" in size and "width" in size:
        out = (crop.get("height", size["height"]), crop.get("width", size["width"]))
        return {**cfg, "input_size": (3, *out), "crop_pct": out[0] / size["height"]}
    raise ValueError(f"cannot read the image processor's size {size!r}; expected height/width or shortest_edge")


def image_processor_for(name: str, data_config: dict[str, Any], image_size: int | None = None):
    """The image processor to save with a transformers student: its own, or, when the run changed
    its input size or it has none, a ``ViTImageProcessor`` (resize to the input size, rescale,
    normalise) that matches ``data_config`` (see :func:`processor_data_config`)."""
    processor = load_image_processor(name)
    if processor is not None and image_size is None:
        return processor
    from transformers import ViTImageProcessor

    resample = {v: k for k, v in _INTERPOLATION.items()}.get(data_config["interpolation"], 3)
    _, height, width = data_config["input_size"]
    return ViTImageProcessor(
        size={"height": height, "width": width},
        resample=resample,
        image_mean=list(data_config["mean"]),
        image_std=list(data_config["std"]),
    )
