"""Checks a resume makes before any data is loaded: the checkpoint was trained with the same quantization
settings and started from the same weights as the command line gives, so that its student and teacher
are the interrupted run's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from ..layout import RunLayout
from ..quantization.packed import WEIGHTS_NAME
from ..training.checkpoint_state import quantization_changes, quantization_settings, setting_changes

__all__ = ["check_resume_quantization", "check_resume_start"]


def _recorded(ckpt: Path, key: str) -> dict[str, Any] | None:
    """What a checkpoint's ``acs_state.json`` records under ``key``; ``None`` for a checkpoint of an older
    version or of the ``full`` selector (no such file or entry)."""
    try:
        recorded = json.loads((ckpt / RunLayout.ACS_STATE).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, dict) else None


def _checkpoint_quantization(ckpt: Path) -> dict[str, Any]:
    """The quantization settings a checkpoint records; for one that records none, what its weights show:
    output quantizers mean ``integer_graph``."""
    recorded = _recorded(ckpt, "quantization")
    if recorded is not None:
        return recorded
    weights = ckpt / WEIGHTS_NAME
    if not weights.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            names = list(f.keys())
    except Exception:  # noqa: BLE001 - a damaged file is the Trainer's to refuse, with its own message
        return {}
    return {"integer_graph": any(".output_quantizer." in name for name in names)}


def check_resume_quantization(args: TrainingArguments, config: Any) -> None:
    """Refuse, before any data is loaded, a resume whose quantization settings (a ``QuantConfig``)
    differ from those its checkpoint was trained with, naming each setting and both values. Call
    after :func:`preflight` (which resolves ``resume_from_checkpoint=true``)."""
    ckpt = args.resume_from_checkpoint
    if not ckpt:
        return
    changes = quantization_changes(
        _checkpoint_quantization(Path(ckpt)), quantization_settings(config), now="on the command line"
    )
    if changes:
        raise ValueError(
            f"resume_from_checkpoint={str(ckpt)!r} was trained with other quantization settings "
            f"({'; '.join(changes)}); resume with the checkpoint's settings, or start a new run (another "
            "--output_dir, without --resume_from_checkpoint)"
        )


def check_resume_start(args: TrainingArguments, start: dict[str, Any]) -> None:
    """Refuse, before any data is loaded, a resume whose starting weights (``ModelArguments.start_settings``)
    differ from those its checkpoint records: the teacher would not be the interrupted run's."""
    if not args.resume_from_checkpoint:
        return
    saved = _recorded(Path(args.resume_from_checkpoint), "start") or {}
    changes = setting_changes(saved, start, now="on the command line")
    if changes:
        raise ValueError(
            f"resume_from_checkpoint={str(args.resume_from_checkpoint)!r} started from other weights "
            f"({'; '.join(changes)}); resume with the same weights flags, or start a new run"
        )
