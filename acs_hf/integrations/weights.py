"""Starting weights from a local file (``--pretrained_weights``): read, checked tensor by tensor, loaded.

A file is safetensors, or a torch checkpoint read with ``weights_only=True`` (no code runs): a state
dict, or a dict holding one under ``state_dict`` / ``model``; the wrapper prefixes that
``DataParallel`` / ``DistributedDataParallel`` (``module.``) and ``torch.compile`` (``_orig_mod.``)
add are removed (timm's reader). Every tensor of the model must be in the file with the model's
shape, and nothing else: a mismatch is an error naming the tensors, raised by
:func:`check_weights_file` before any data is loaded.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..quantization.model import find_first_last
from .models import create_model

__all__ = [
    "read_weights",
    "check_weights",
    "load_weights",
    "check_weights_file",
    "has_downloadable_weights",
    "describe_weights",
    "weights_source",
    "file_digest",
]

logger = logging.getLogger(__name__)

#: Tensors a file may lack: BatchNorm's step counter (absent from checkpoints saved before torch 0.4.1).
_OPTIONAL = ("num_batches_tracked",)
#: How many names of each kind an error lists.
_LISTED = 8


def read_weights(path: str | os.PathLike, argument: str = "pretrained_weights") -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (module docstring), on the CPU."""
    from timm.models import load_state_dict

    if not os.path.isfile(path):
        raise ValueError(f"{argument}={str(path)!r} is not a file (a .safetensors or torch checkpoint file)")
    try:
        state = load_state_dict(str(path), use_ema=False, device="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for a foreign or damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{argument}={str(path)!r} cannot be read as weights only ({type(e).__name__}: {first}); acs_hf never "
            "unpickles code: give a .safetensors file, or re-save the tensors alone, e.g. "
            "torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pt') on a file you trust"
        ) from e
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)] if isinstance(state, Mapping) else None
    if bad is None or bad or not state:
        what = f"non-tensor entries {bad[:_LISTED]}" if bad else "no tensors"
        raise ValueError(f"{argument}={str(path)!r} holds {what}; expected a state dict of tensors")
    return dict(state)


def _listed(names: list[str]) -> str:
    more = len(names) - _LISTED
    return ", ".join(names[:_LISTED]) + (f" and {more} more" if more > 0 else "")


def check_weights(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    argument: str = "pretrained_weights",
    heads_any_classes: bool = False,
) -> None:
    """Raise ``ValueError`` naming every tensor of ``state`` that ``model`` lacks, every tensor of
    ``model`` that ``state`` lacks and every shape that differs. ``heads_any_classes``: the classifier's
    number of outputs (its first dimension) may differ (checked again once the data's classes are known)."""
    own = model.state_dict()
    heads = sorted(find_first_last(model)[1])
    head_prefixes = tuple(f"{h}." for h in heads)
    missing = [k for k in own if k not in state and not k.endswith(_OPTIONAL)]
    unexpected = [k for k in state if k not in own]
    shapes = []
    for k in own.keys() & state.keys():
        a, b = tuple(own[k].shape), tuple(state[k].shape)
        if a != b and not (heads_any_classes and k.startswith(head_prefixes) and a[1:] == b[1:]):
            shapes.append(f"{k} {list(b)} in the file, {list(a)} in the model")
    problems = [
        f"{label}: {_listed(sorted(names))}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes))
        if names
    ]
    if problems:
        hint = (
            f" (the classifier {', '.join(heads)} must have one output per class of the data)"
            if any(s.startswith(head_prefixes) for s in shapes)
            else ""
        )
        raise ValueError(f"{argument}={str(path)!r} does not fit {type(model).__name__}: " + "; ".join(problems) + hint)


def load_weights(model: nn.Module, path: str | os.PathLike, argument: str = "pretrained_weights") -> nn.Module:
    """Load the weights file ``path`` into ``model`` in place, after :func:`check_weights`; returns ``model``."""
    state = read_weights(path, argument)
    check_weights(model, state, path, argument)
    for k, v in model.state_dict().items():  # keep the model's own step counters where the file has none
        state.setdefault(k, v)
    model.load_state_dict(state)
    logger.info("%s: %d tensors loaded from %s", argument, len(state), path)
    return model


def check_weights_file(
    name: str, path: str, image_size: int | None = None, argument: str = "pretrained_weights"
) -> None:
    """Check the weights file ``path`` against model ``name`` before any data is loaded. The model is
    built without memory (``meta`` device) and for two classes: the classifier's output count is
    checked by :func:`load_weights` once the data's classes are known."""
    state = read_weights(path, argument)
    with torch.device("meta"):
        model = create_model(name, False, 2, image_size)
    check_weights(model, state, path, argument, heads_any_classes=True)


def has_downloadable_weights(name: str) -> bool:
    """False only for a plain timm name whose ``pretrained_cfg`` gives no URL, Hub repo or file (e.g.
    ``cifar_resnet20``); Hub ids, folders and transformers models are left to their loaders."""
    import timm

    if os.path.isdir(name) or ":" in name or not timm.is_model(name):
        return True
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg is None or any(getattr(cfg, k, None) for k in ("url", "hf_hub_id", "file", "state_dict"))


def describe_weights(student: str | None, teacher: str | None = None) -> str | None:
    """The model card's words for the local weights files a run started from (names and digests, no paths)."""
    words = [f"the weights file `{weights_source(student)}`"] if student else []
    words += [f"a teacher from `{weights_source(teacher)}`"] if teacher else []
    return " and ".join(words) or None


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    """The start of the file's sha256 (16 hex digits; read once per file version)."""
    stat = os.stat(path)
    return _digest(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


def weights_source(path: str | os.PathLike) -> str:
    """The file's name and the start of its sha256, for the model card (never the local path)."""
    return f"{Path(path).name} (sha256 {file_digest(path)})"
