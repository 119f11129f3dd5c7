"""One model on every process: the collectives that make the processes of a run agree, and the
checks that they do.

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

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "broadcast_module_state",
    "check_same_across_processes",
    "distributed",
    "module_fingerprint",
    "processes_by_value",
]


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
def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of ``module`` with process ``src``'s values, in place.

    One broadcast per tensor; a one-time cost (ResNet-18: ~100 tensors, 45 MB). Boolean buffers
    travel as uint8 (gloo has no bool).
    """
    if not distributed():
        return
    tensors = [*module.parameters(), *module.buffers()]
    for t in tensors:
        device = _backend_device(t)
        wire = t.detach().to(device, torch.uint8 if t.dtype == torch.bool else t.dtype).contiguous()
        dist.broadcast(wire, src=src)
        t.copy_(wire.to(t.device, t.dtype))


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
