"""One model on every process: every collective of acs_hf (the broadcasts that make the processes
of a run agree, the gather of per-sample statistics) and the checks that they do agree.

Data-parallel training keeps *parameters* equal across processes, but not everything a run
depends on: DDP copies buffers from process 0 only at the start of each training forward, so the
BatchNorm statistics of the last step stay local (after an FP warm-up they differ on every
process), and a teacher is never wrapped by DDP at all. Anything hashed or scored from such a
model would differ by process. :func:`broadcast_module_state` makes a module process 0's, and
:func:`check_same_across_processes` turns any disagreement of a fingerprint into an error that
names the processes, instead of a silently inconsistent run.

Every function here is a collective: call it on every process, in the same order. With one
process (or no process group) each is free and does nothing.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn

from ..data.batch import INDEX_KEY

__all__ = [
    "broadcast_module_state",
    "broadcast_object",
    "gather_statistics",
    "check_same_across_processes",
    "ORDER_KEY",
    "distributed",
    "module_fingerprint",
    "processes_by_value",
]

#: Optional key of :func:`gather_statistics`' input: when an index comes more than once (from several
#: processes or batches), the entry with the largest order wins.
ORDER_KEY = "order"


def distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def module_fingerprint(module: nn.Module) -> str:
    """Content hash of a module's parameters and buffers (names, shapes, dtypes, values)."""
    digest = hashlib.sha256(type(module).__name__.encode())
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def _backend_device(like: torch.Tensor) -> torch.device:
    # NCCL moves only CUDA tensors, gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def broadcast_module_state(module: nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Overwrite every parameter and buffer of ``module`` (only its buffers with ``buffers_only``)
    with process ``src``'s values, in place.

    One broadcast per tensor; a one-time cost (ResNet-18: ~100 tensors, 45 MB). Boolean buffers
    travel as uint8 (gloo has no bool).
    """
    if not distributed():
        return
    tensors = [*([] if buffers_only else module.parameters()), *module.buffers()]
    for t in tensors:
        device = _backend_device(t)
        wire = t.detach().to(device, torch.uint8 if t.dtype == torch.bool else t.dtype).contiguous()
        dist.broadcast(wire, src=src)
        t.copy_(wire.to(t.device, t.dtype))


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Process ``src``'s ``value`` (any picklable object), on every process."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def processes_by_value(value: str) -> dict[str, list[int]] | None:
    """Every process's ``value``, gathered: each distinct value with the processes that hold it,
    or None when all agree (or there is one process)."""
    if not distributed():
        return None
    values: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) == 1:
        return None
    groups: dict[str, list[int]] = {}
    for rank, v in enumerate(values):
        groups.setdefault(str(v), []).append(rank)
    return groups


def check_same_across_processes(what: str, value: str) -> None:
    """Raise on every process unless all processes pass the same ``value``.

    ``what`` names the thing compared in the error (e.g. ``"teacher weights"``), which lists the
    processes of each distinct value.
    """
    groups = processes_by_value(value)
    if groups:
        detail = "; ".join(f"processes {ranks}: {v}" for v, ranks in groups.items())
        raise RuntimeError(
            f"the processes of this run disagree on the {what} ({detail}); every process must hold the same "
            "models and data. This is a bug or a changed file during the run: report it with this message"
        )


def gather_statistics(
    local: dict[str, list[torch.Tensor]],
    num_samples: int,
    accelerator: Accelerator,
    expected: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every process's per-batch statistics (lists under their names, dataset indices under
    :data:`INDEX_KEY`) as full ``[N]`` CPU tensors in dataset order, on every process.

    Every index in ``expected`` (an [N] bool mask; default: all) must have been scored by some
    process; float statistics of the other samples are NaN. An index given more than once keeps
    the entry with the largest :data:`ORDER_KEY` value (int64 lists under that key, when given).
    A collective: call on every process.
    """
    device = accelerator.device
    integer_keys = ("labels", INDEX_KEY, ORDER_KEY)
    cat = {
        k: torch.cat(v) if v else torch.empty(0, dtype=torch.long if k in integer_keys else torch.float32)
        for k, v in local.items()
    }
    cat = {k: v.to(device) for k, v in cat.items()}
    if accelerator.num_processes > 1:
        # Shards may differ in length: pad (index -1 marks padding), gather, drop the padding.
        cat[INDEX_KEY] = accelerator.pad_across_processes(cat[INDEX_KEY], pad_index=-1)
        cat = {k: accelerator.pad_across_processes(v) if k != INDEX_KEY else v for k, v in cat.items()}
        cat = {k: accelerator.gather(v) for k, v in cat.items()}
    index = cat.pop(INDEX_KEY).cpu()
    order = cat.pop(ORDER_KEY, None)
    rows = (index >= 0).nonzero().flatten()  # padding dropped
    if order is not None:
        rows = _latest_rows(index, order.cpu(), rows)
    index = index[rows]
    seen = torch.zeros(num_samples, dtype=torch.bool)
    if index.numel() and (index.max() >= num_samples):
        raise RuntimeError(f"scoring pass: dataset index {int(index.max())} >= num_samples={num_samples}")
    seen[index] = True
    expected = torch.ones(num_samples, dtype=torch.bool) if expected is None else expected.cpu().bool()
    missing = (expected & ~seen).nonzero().flatten()
    if missing.numel():
        raise RuntimeError(
            f"scoring pass: {missing.numel()} of {int(expected.sum())} samples were never scored (first index "
            f"{int(missing[0])}); the score dataloader must cover every sample to be scored"
        )
    out = {}
    for k, v in cat.items():
        full = (
            torch.full((num_samples,), math.nan, dtype=v.dtype)
            if v.is_floating_point()
            else torch.zeros(num_samples, dtype=v.dtype)
        )
        full[index] = v.cpu()[rows]
        out[k] = full
    return out


def _latest_rows(index: torch.Tensor, order: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Of ``rows``, the one with the largest ``order`` for each distinct ``index``."""
    by_order = rows[torch.argsort(order[rows], stable=True)]
    ranked = by_order[torch.argsort(index[by_order], stable=True)]  # by index, then by order
    last = torch.ones(ranked.numel(), dtype=torch.bool)
    last[:-1] = index[ranked][1:] != index[ranked][:-1]
    return ranked[last]
