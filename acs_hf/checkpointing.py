"""The selection state inside Trainer checkpoints, and what makes a checkpoint safe to resume.

ACSTrainer writes, into ``checkpoint-<step>/`` and before the Trainer's own files:

- ``acs_subset.npy``: the current coreset (and ``acs_selector_subset.npy`` for stateful selectors);
- ``acs_state.json``: round counters, the selection history, the hash of the subset, the process
  count and optimizer steps per epoch it was taken with, and the fingerprint of the training data.

A checkpoint is complete only when both ``acs_state.json`` and the Trainer's ``trainer_state.json``
(written last by the Trainer, before it rotates old checkpoints) are there.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._io import atomic_save_npy, atomic_write_json
from .sampler import subset_hash

if TYPE_CHECKING:
    from .trainer import ACSTrainer

__all__ = ["save_acs_state", "load_acs_state", "is_complete_checkpoint", "latest_complete_checkpoint"]

STATE_NAME = "acs_state.json"
SUBSET_NAME = "acs_subset.npy"
SELECTOR_STATE_NAME = "acs_selector_subset.npy"
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def is_complete_checkpoint(path: str | os.PathLike, needs_acs_state: bool = True) -> bool:
    path = Path(path)
    return (path / TRAINER_STATE_NAME).is_file() and (not needs_acs_state or (path / STATE_NAME).is_file())


def _checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_complete_checkpoint(output_dir: str | os.PathLike, needs_acs_state: bool = True) -> Path | None:
    """The newest ``checkpoint-<step>`` in ``output_dir`` whose save finished (``None`` if none did)."""
    complete = [p for p in _checkpoints(output_dir) if is_complete_checkpoint(p, needs_acs_state)]
    return complete[-1] if complete else None


def _epoch_boundary_checkpoints(output_dir: Path) -> list[Path]:
    out = []
    for p in _checkpoints(output_dir):
        try:
            state = json.loads((p / STATE_NAME).read_text())
        except (OSError, ValueError):
            continue
        if is_complete_checkpoint(p) and state.get("at_epoch_boundary"):
            out.append(p)
    return out


def save_acs_state(trainer: ACSTrainer, checkpoint_dir: str | os.PathLike) -> None:
    """Write the selection state of ``trainer`` into ``checkpoint_dir`` (main process only)."""
    ckpt = Path(checkpoint_dir)
    steps_per_epoch = trainer.steps_per_epoch
    state: dict[str, Any] = {
        "selection_round": trainer.selection_round,
        "selected_epoch": trainer.selected_epoch,
        "method": trainer.acs_args.selection_method,
        "fraction": trainer.acs_args.fraction,
        "num_samples": trainer.num_samples,
        "data_fingerprint": trainer.data_fingerprint,
        "subset_hash": subset_hash(trainer.subset),
        "world_size": trainer.accelerator.num_processes,
        "global_step": trainer.state.global_step,
        "steps_per_epoch": steps_per_epoch,
        "at_epoch_boundary": bool(steps_per_epoch) and trainer.state.global_step % steps_per_epoch == 0,
        "history": trainer.history,
    }
    atomic_save_npy(ckpt / SUBSET_NAME, trainer.subset.numpy())
    selector_subset = trainer.selector.state_dict().get("subset")
    if selector_subset is not None:
        atomic_save_npy(ckpt / SELECTOR_STATE_NAME, selector_subset.numpy())
    atomic_write_json(ckpt / STATE_NAME, state)


def _read_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{ckpt} has no {STATE_NAME}: it was not written by ACSTrainer, or its save was interrupted; "
            f"resume from an earlier checkpoint (the latest complete one in {ckpt.parent}: "
            f"{latest_complete_checkpoint(ckpt.parent)})"
        )
    if not (ckpt / TRAINER_STATE_NAME).is_file():
        raise FileNotFoundError(
            f"{ckpt} has no {TRAINER_STATE_NAME}: its save was interrupted; resume from the latest complete "
            f"checkpoint in {ckpt.parent} ({latest_complete_checkpoint(ckpt.parent)})"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is corrupt ({e}); resume from an earlier checkpoint") from e


def _load_npy(path: Path) -> torch.Tensor:
    try:
        return torch.from_numpy(np.load(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is missing or corrupt ({e}); resume from an earlier checkpoint") from e


def load_acs_state(trainer: ACSTrainer, checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Restore the selection state of ``trainer`` from ``checkpoint``, refusing what would not
    reproduce the interrupted run: another method, other data, a damaged file."""
    ckpt = Path(checkpoint)
    state = _read_state(ckpt)
    args = trainer.acs_args
    if state["method"] != args.selection_method or state["num_samples"] != trainer.num_samples:
        raise ValueError(
            f"checkpoint {ckpt} selected with method={state['method']!r} over {state['num_samples']} samples; "
            f"this run uses {args.selection_method!r} over {trainer.num_samples}"
        )
    saved_fp = state.get("data_fingerprint")
    if saved_fp is not None and trainer.data_fingerprint is not None and saved_fp != trainer.data_fingerprint:
        raise ValueError(
            f"checkpoint {ckpt} was trained on other data: training-set fingerprint {saved_fp} there, "
            f"{trainer.data_fingerprint} now (same size, but another seed, --max_train_samples draw, data "
            "folder or dataset revision?). Resume with the original data settings, or start a new run."
        )
    subset = _load_npy(ckpt / SUBSET_NAME)
    if subset_hash(subset) != state["subset_hash"]:
        raise ValueError(f"{ckpt / SUBSET_NAME} does not match the hash in {STATE_NAME}; the checkpoint is damaged")
    if (ckpt / SELECTOR_STATE_NAME).is_file():
        trainer.selector.load_state_dict({"subset": _load_npy(ckpt / SELECTOR_STATE_NAME)})
    trainer.subset, trainer.selected_epoch = subset, state["selected_epoch"]
    trainer.selection_round, trainer.history = state["selection_round"], state["history"]
    return state


def check_resume_layout(state: dict[str, Any], ckpt: Path, world_size: int) -> int | None:
    """The epochs a checkpoint taken on another number of processes completed, or raise.

    Returns ``None`` when the process count is unchanged (the Trainer's own step arithmetic
    holds). A checkpoint at an epoch boundary resumes on any count; one inside an epoch cannot,
    since the batches already trained were sharded for the old count.
    """
    old = state.get("world_size")
    if old is None or old == world_size:
        return None
    steps_per_epoch = state.get("steps_per_epoch")
    if state.get("at_epoch_boundary") and steps_per_epoch:
        return state["global_step"] // steps_per_epoch
    step = state.get("global_step", 0)
    boundary = [p for p in _epoch_boundary_checkpoints(ckpt.parent) if int(p.name.rsplit("-", 1)[1]) <= step]
    hint = (
        f"resume from {boundary[-1]} (an epoch boundary) instead"
        if boundary
        else "no epoch-boundary checkpoint exists in that folder (save with --save_strategy epoch to get them)"
    )
    raise ValueError(
        f"checkpoint {ckpt} was saved inside an epoch by {old} process(es); this run has {world_size}. "
        f"A mid-epoch checkpoint resumes only on {old} process(es): {hint}, or relaunch with "
        f"--num_processes {old}."
    )
