"""Model card and Hub upload of a quantized checkpoint folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from ..layout import RunLayout
from ..quantization.packed import WEIGHTS_NAME
from ..selection import SELECTORS
from ..utils.io import atomic_write_bytes
from .models import folder_config, is_transformers_name

__all__ = [
    "write_model_card",
    "base_model_id",
    "display_name",
    "method_summary",
    "push_folder_to_hub",
    "HubPushError",
    "UPLOAD_IGNORE",
]

logger = logging.getLogger(__name__)

#: Trainer by-products that do not belong in a published model repo (the run's work folders).
UPLOAD_IGNORE = RunLayout.upload_ignore()


class HubPushError(RuntimeError):
    """The upload failed; the local folder is untouched (its path is in the message)."""


TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "model_card.md"


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def base_model_id(model_name: str, pretrained: bool = True) -> str | None:
    """The Hub id of the weights a student started from, for the card's ``base_model``: timm names
    map to timm's Hub repos (``resnet18.tv_in1k`` -> ``timm/resnet18.tv_in1k``), ``hf-hub:org/x``
    to ``org/x``, a local folder to the ``hf_hub_id`` its config names, a transformers Hub id
    (``org/name``, not a timm name) to itself. None when the model was not pretrained or no Hub
    id is known."""
    if not pretrained:
        return None
    import timm

    if model_name.startswith("hf-hub:"):
        return model_name.removeprefix("hf-hub:").split("@")[0]
    if os.path.isdir(model_name):
        return folder_config(model_name).get("pretrained_cfg", {}).get("hf_hub_id") or None
    if is_transformers_name(model_name):
        return model_name.split("@")[0]
    found = timm.models.get_pretrained_cfg(model_name) if timm.is_model(model_name) else None
    return getattr(found, "hf_hub_id", None) or None


def display_name(model_name: str) -> str:
    """A model's name for titles: never a local path. ``hf-hub:org/x`` and ``org/x`` give ``x``; a
    local folder gives the architecture its ``config.json`` names (else the folder's name)."""
    name = model_name.removeprefix("hf-hub:").removeprefix("local-dir:").split("@")[0]
    if os.path.isdir(name):
        cfg = folder_config(name)
        return str(cfg.get("architecture") or (cfg.get("architectures") or [None])[0] or cfg.get("model_type")
                   or Path(name).resolve().name)  # fmt: skip
    return name.rstrip("/").split("/")[-1]


def method_summary(method: str) -> str:
    """One sentence on how the training data was chosen: the selector's own description."""
    doc = (SELECTORS[method].__doc__ or method).strip().split("\n\n")[0]
    return " ".join(doc.split())


def write_model_card(
    directory: str | os.PathLike,
    *,
    model_name: str,
    dataset_name: str,
    quant_config: dict[str, Any],
    acs_settings: dict[str, Any],
    results: dict[str, Any],
    fp32_bytes: int,
    checkpoint_bytes: int,
    plot_name: str | None = None,
    base_model: str | None = None,
    weights_source: str | None = None,
    eval_split: str = "validation",
    image_size: int | None = None,
    repo_id: str | None = None,
    library: str = "timm",
) -> Path:
    """Render ``README.md`` from ``templates/model_card.md`` with ``huggingface_hub.ModelCard``.

    Metadata: ``base_model`` (a Hub id, see :func:`base_model_id`) with ``base_model_relation:
    quantized``, ``model-index`` with the quantized model's top-1 and top-5 on ``dataset_name`` /
    ``eval_split``, and tags for the bit widths (``4-bit``, ``w4a4``) and the method.
    ``results`` keys ``top-1 (quantized)`` / ``top-5 (quantized)`` are fractions in [0, 1].
    ``library``: ``timm`` or ``transformers``, the library of the student's architecture;
    ``weights_source``: words naming the local weights files the run started from (names and digests)."""
    wb, scheme = quant_config.get("weight_bits"), _scheme(quant_config)
    eval_results = _eval_results(results, dataset_name, eval_split)
    method = str(acs_settings.get("selection_method", "acs"))
    selector = SELECTORS[method]
    short = display_name(model_name)
    data = _card_data(
        library, scheme, wb, selector, dataset_name, base_model, f"{short}-{scheme}-{method}", eval_results
    )
    card = ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        title=f"{short} {scheme.upper()} (LSQ QAT, {method})",
        method=method,
        method_summary=method_summary(method),
        full_data=selector.selects_all,
        acs_family=selector.acs_family,
        dataset_name=dataset_name,
        base_model=base_model,
        weights_source=weights_source,
        weight_bits=wb,
        results={k: _fmt(v) for k, v in results.items()},
        eval_split=eval_split,
        checkpoint_mib=f"{checkpoint_bytes / 2**20:.2f}",
        fp32_mib=f"{fp32_bytes / 2**20:.2f}",
        compression=f"{fp32_bytes / max(checkpoint_bytes, 1):.1f}",
        quant_config={k: _fmt(v) for k, v in quant_config.items()},
        acs_settings={k: _fmt(v) for k, v in acs_settings.items()},
        plot_name=plot_name,
        repo_id=repo_id or "<this repo id or local folder>",
        image_size=image_size or 224,
        library=library,
    )
    atomic_write_bytes(Path(directory) / RunLayout.MODEL_CARD, str(card).encode())
    return Path(directory) / RunLayout.MODEL_CARD


def _scheme(quant_config: dict[str, Any]) -> str:
    """``w4a4``, or ``w4`` for weight-only quantization."""
    wb, ab = quant_config.get("weight_bits"), quant_config.get("act_bits")
    return f"w{wb}a{ab}" if ab is not None else f"w{wb}"


def _eval_results(results: dict[str, Any], dataset_name: str, eval_split: str) -> list[EvalResult]:
    """The quantized model's top-1 and top-5 (those known) for the card's ``model-index``."""
    return [
        EvalResult(
            task_type="image-classification",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            dataset_split=eval_split,
            metric_type=metric,
            metric_name=label,
            metric_value=round(value * 100, 2),
        )  # fmt: skip
        for key, metric, label in (
            ("top-1 (quantized)", "accuracy", "top-1 accuracy"),
            ("top-5 (quantized)", "top_5_accuracy", "top-5 accuracy"),
        )
        if (value := results.get(key)) is not None
    ]


def _card_data(
    library: str,
    scheme: str,
    weight_bits: Any,
    selector: type,
    dataset_name: str,
    base_model: str | None,
    name: str,
    eval_results: list[EvalResult],
) -> ModelCardData:
    """The card's metadata: tags for the bit widths and the method, the base model, the results."""
    if library not in ("timm", "transformers"):
        raise ValueError(f"library must be 'timm' or 'transformers', got {library!r}")
    method_tags = [] if selector.selects_all else ["coreset", *(["acs"] if selector.acs_family else [])]
    return ModelCardData(
        library_name=library,
        license="apache-2.0",
        tags=[
            "image-classification",
            library,
            "quantized",
            f"{weight_bits}-bit",
            scheme,
            "lsq",
            "qat",
            *method_tags,
            "acs_hf",
        ],  # fmt: skip
        datasets=[dataset_name],
        metrics=["accuracy"],
        base_model=base_model,
        base_model_relation="quantized" if base_model else None,
        pipeline_tag="image-classification",
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
    )


def push_folder_to_hub(
    directory: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload quantized model (acs_hf)",
    api: HfApi | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``directory`` (minus :data:`UPLOAD_IGNORE`).

    Returns the commit URL. Raises :class:`HubPushError` naming the local path on any failure;
    nothing local is deleted or changed.
    """
    directory = Path(directory)
    if not (directory / WEIGHTS_NAME).is_file():
        raise ValueError(f"{directory} holds no {WEIGHTS_NAME}; save the model before pushing")
    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(directory),
            repo_id=repo_id,
            repo_type="model",
            commit_message=commit_message,
            ignore_patterns=UPLOAD_IGNORE,
        )
    except Exception as e:  # network, auth, quota: all leave the local folder as it is
        raise HubPushError(f"push to {repo_id!r} failed ({e}); the checkpoint is intact at {directory}") from e
    url = getattr(info, "commit_url", None) or str(info)
    logger.info("Pushed %s to %s", directory, url)
    return url
