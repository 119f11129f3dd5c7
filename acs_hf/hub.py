"""Model card and Hub upload of a quantized checkpoint folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData

from ._io import atomic_write_bytes
from .quantization.checkpoint import WEIGHTS_NAME

__all__ = ["write_model_card", "push_folder_to_hub", "HubPushError", "UPLOAD_IGNORE"]

logger = logging.getLogger(__name__)

#: Trainer by-products that do not belong in a published model repo.
UPLOAD_IGNORE = ["checkpoint-*", "checkpoint-*/**", "teacher_cache/**", "fp_warmup/**", "runs/**", "*.tmp", ".*"]


class HubPushError(RuntimeError):
    """The upload failed; the local folder is untouched (its path is in the message)."""


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


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
) -> Path:
    """Write ``README.md`` with Hub metadata (library_name timm, tags, datasets, metrics) and a
    results table, the selection settings, the size against fp32 and the selection plot."""
    directory = Path(directory)
    data = ModelCardData(
        library_name="timm",
        license="apache-2.0",
        tags=["image-classification", "timm", "quantization", "lsq", "coreset", "acs_hf"],
        datasets=[dataset_name],
        metrics=["accuracy"],
        base_model=model_name if "/" in model_name else None,
        pipeline_tag="image-classification",
    )
    wb, ab = quant_config.get("weight_bits"), quant_config.get("act_bits")
    title = f"{model_name} W{wb}A{ab if ab is not None else '32'} (LSQ, ACS coreset QAT)"
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in results.items())
    settings = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in acs_settings.items())
    qrows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in quant_config.items())
    plot = f"\n## Selection history\n\n![selection history]({plot_name})\n" if plot_name else ""
    body = f"""
# {title}

Quantization-aware training with learned step sizes (LSQ) on adaptively selected coresets
([ACS, Huang et al., TMLR 2024](https://arxiv.org/abs/2306.07215)), trained with acs_hf on
`{dataset_name}`. Weights are stored as packed integer codes plus step sizes.

## Results

| metric | value |
|---|---|
{rows}

## Size

Packed integer checkpoint: {checkpoint_bytes / 2**20:.2f} MiB, against {fp32_bytes / 2**20:.2f} MiB in fp32
({fp32_bytes / max(checkpoint_bytes, 1):.1f}x smaller).

## Quantization

| setting | value |
|---|---|
{qrows}

## Coreset selection

| setting | value |
|---|---|
{settings}
{plot}
## Usage

```python
import acs_hf
model = acs_hf.load_quantized("<this repo id or local folder>")
```
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    path = directory / "README.md"
    atomic_write_bytes(path, str(card).encode())
    return path


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
