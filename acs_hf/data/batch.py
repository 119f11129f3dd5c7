"""What a batch of acs_hf carries, and the one forward every trainer and scoring pass calls."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["INDEX_KEY", "default_forward"]

#: Batch key holding each example's index in the (full) training set.
INDEX_KEY = "index"


def default_forward(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Logits for a batch dict with ``pixel_values``: a timm model's output, or the ``.logits`` of
    a transformers model's output."""
    out = model(batch["pixel_values"])
    return out if isinstance(out, torch.Tensor) else out.logits
