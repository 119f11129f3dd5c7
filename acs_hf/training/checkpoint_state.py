"""The selection state's files in a checkpoint: written and read here, and nowhere else.

Into ``checkpoint-<step>/``, before the Trainer's own files, :meth:`SelectionCheckpointer.save` writes
(names from :class:`~acs_hf.layout.RunLayout`):

- ``acs_subset.npy``: the current coreset (and ``acs_selector_subset.npy`` for stateful selectors);
- ``acs_training_scores.npz`` (with ``reuse_training_scores``): the training-pass records of every
  process since the last round, which the next round reuses;
- ``acs_state.json``: round counters, the selection history, the hash of the subset, the process
  count and optimizer steps per epoch it was taken with, the fingerprint of the training data, and
  the identity of the save: the run's id (made once per run and kept by its resumes) and an id of
  this save, also recorded in the Trainer's ``trainer_state.json``; and, when the trainer was given
  them, the student's quantization settings (:data:`QUANT_SETTINGS`).

:meth:`SelectionCheckpointer.restore` refuses what would not reproduce the interrupted run. Which
folders are complete and whose run they belong to is :mod:`acs_hf.training.checkpoints`' job.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.batch import INDEX_KEY
from ..layout import RunLayout
from ..selection import Selector
from ..utils.io import atomic_save_npy, atomic_save_npz, atomic_write_json
from .checkpoints import (
    check_checkpoints_ahead,
    clear_for_save,
    epoch_boundary_checkpoints,
    read_state,
    run_identity,
    step_of,
)
from .sampler import subset_hash
from .selection_state import SelectionState

__all__ = [
    "QUANT_SETTINGS",
    "SelectionCheckpointer",
    "check_resume_layout",
    "continue_schedule",
    "quantization_changes",
    "setting_changes",
    "quantization_settings",
    "read_array",
    "read_arrays",
]

logger = logging.getLogger(__name__)

STATE, SUBSET, SELECTOR_SUBSET = RunLayout.ACS_STATE, RunLayout.SUBSET, RunLayout.SELECTOR_SUBSET
TRAINING_SCORES = RunLayout.TRAINING_SCORES

#: The ``QuantConfig`` fields a resume must keep: they decide which quantizers exist and their ranges
#: (``compile_kernels`` only picks the kernels computing them, and may change).
QUANT_SETTINGS = ("weight_bits", "act_bits", "first_last_bits", "per_channel_weights", "exclude", "integer_graph")


def quantization_settings(config: Any) -> dict[str, Any] | None:
    """The :data:`QUANT_SETTINGS` of a ``QuantConfig`` (or of its ``to_dict()``), as a checkpoint records them."""
    if config is None:
        return None
    values = config if isinstance(config, Mapping) else config.to_dict()
    return {name: values[name] for name in QUANT_SETTINGS if name in values}


def setting_changes(saved: Mapping[str, Any], current: Mapping[str, Any], now: str = "in this run") -> list[str]:
    """Each key that ``saved`` (a checkpoint's) and ``current`` both give with other values, as
    ``"name: <saved> in the checkpoint, <current> <now>"``."""
    return [
        f"{name}: {saved[name]!r} in the checkpoint, {current[name]!r} {now}"
        for name in current
        if name in saved and saved[name] != current[name]
    ]


def quantization_changes(saved: Mapping[str, Any], current: Mapping[str, Any], now: str = "in this run") -> list[str]:
    """:func:`setting_changes` of the :data:`QUANT_SETTINGS` alone."""
    return setting_changes(saved, {name: current[name] for name in QUANT_SETTINGS if name in current}, now)


def read_array(path: Path) -> torch.Tensor:
    """A checkpoint's ``.npy`` array as a tensor, refused when missing or corrupt."""
    try:
        return torch.from_numpy(np.load(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is missing or corrupt ({e}); resume from an earlier checkpoint") from e


def read_arrays(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's ``.npz`` arrays as tensors by name, refused when missing or corrupt."""
    try:
        with np.load(path) as arrays:
            return {name: torch.from_numpy(arrays[name]) for name in arrays.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is missing or corrupt ({e}); resume from an earlier checkpoint") from e


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
    boundary = [p for p in epoch_boundary_checkpoints(ckpt.parent) if step_of(p) <= step]
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


def continue_schedule(lr_scheduler: Any, global_step: int) -> None:
    """Set a resumed learning-rate schedule to ``global_step`` of this run, after a checkpoint of
    another process count whose schedule counted other steps (the same epoch)."""
    from torch.optim.lr_scheduler import LambdaLR

    if not isinstance(lr_scheduler, LambdaLR):
        raise ValueError(
            f"resuming on another process count needs a LambdaLR schedule (every lr_scheduler_type of "
            f"transformers), got {type(lr_scheduler).__name__}; relaunch on the original count"
        )
    # One public step() from the step before sets every group's LR (and get_last_lr()) for
    # global_step; torch warns that no optimizer step came first, which is the point here.
    lr_scheduler.last_epoch = global_step - 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        lr_scheduler.step()


@dataclass
class SelectionCheckpointer:
    """Saves and restores a run's selection state in its checkpoints.

    Args:
        method: the selection method (a checkpoint of another one is refused).
        fraction: the coreset fraction (recorded).
        num_samples: N (a checkpoint over another N is refused).
        data_fingerprint: identifies the training set (a checkpoint of other data is refused).
        run_id: the run's id, set when training starts (a resume continues its run).
        steps_per_epoch: optimizer steps per epoch, set when training starts.
        quantization: the student's :func:`quantization_settings` (recorded; a checkpoint that
            records others is refused), or ``None``.
        start: where the FP model and the teacher came from (e.g. weights files' digests; recorded, a
            checkpoint that records others is refused), or ``None``.
    """

    method: str
    fraction: float
    num_samples: int
    data_fingerprint: str | None
    run_id: str | None = None
    steps_per_epoch: int | None = None
    quantization: dict[str, Any] | None = None
    start: dict[str, Any] | None = None

    def begin_run(
        self,
        resume_from_checkpoint: str | os.PathLike | None,
        output_dir: str,
        step: int,
        world_size: int,
        saving: bool,
    ) -> None:
        """Set :attr:`run_id` (the resumed checkpoint's, else a new one; a collective) and, on a
        resume that will save, refuse one that would save among another run's checkpoints."""
        self.run_id = run_identity(resume_from_checkpoint)
        if resume_from_checkpoint is not None and saving:
            check_checkpoints_ahead(output_dir, str(resume_from_checkpoint), step, world_size, self.run_id)

    def save(
        self,
        checkpoint_dir: str | os.PathLike,
        selection: SelectionState,
        selector: Selector,
        training_scores: dict[str, torch.Tensor] | None,
        global_step: int,
        world_size: int,
    ) -> dict[str, str]:
        """Write ``selection``, ``selector``'s state and ``training_scores`` (every process's
        training-pass records, or ``None``) into ``checkpoint_dir``, on the saving processes only;
        returns the save's identity, for the Trainer's ``trainer_state.json``."""
        ckpt = Path(checkpoint_dir)
        clear_for_save(ckpt, self.run_id, world_size, global_step)
        state = selection.state_dict()
        steps_per_epoch = self.steps_per_epoch
        identity = {"run_id": self.run_id, "save_id": uuid.uuid4().hex[:16]}
        saved: dict[str, Any] = {
            **identity,
            "selection_round": state["selection_round"],
            "selected_epoch": state["selected_epoch"],
            "method": self.method,
            "fraction": self.fraction,
            "num_samples": self.num_samples,
            "data_fingerprint": self.data_fingerprint,
            "subset_hash": subset_hash(state["subset"]),
            "world_size": world_size,
            "global_step": global_step,
            "steps_per_epoch": steps_per_epoch,
            "at_epoch_boundary": bool(steps_per_epoch) and global_step % steps_per_epoch == 0,
            "history": state["history"],
        }
        if self.quantization is not None:
            saved["quantization"] = self.quantization
        if self.start is not None:
            saved["start"] = self.start
        atomic_save_npy(ckpt / SUBSET, state["subset"].numpy())
        selector_subset = selector.state_dict().get("subset")
        if selector_subset is not None:
            atomic_save_npy(ckpt / SELECTOR_SUBSET, selector_subset.numpy())
        if training_scores is not None:
            atomic_save_npz(ckpt / TRAINING_SCORES, {k: v.numpy() for k, v in training_scores.items()})
            saved["training_scores_hash"] = subset_hash(training_scores[INDEX_KEY])
        atomic_write_json(ckpt / STATE, saved)
        return identity

    def restore(
        self, checkpoint: str | os.PathLike, world_size: int, selection: SelectionState, selector: Selector
    ) -> tuple[dict[str, torch.Tensor] | None, int | None]:
        """Restore ``selection`` and ``selector`` from what :meth:`save` wrote into ``checkpoint``,
        refusing first (touching nothing) what would not reproduce the interrupted run: another
        method, other data, a damaged file. Returns the saved training-pass records (``None``: none
        saved) and the epochs a checkpoint of another process count completed (``None``: same count)."""
        ckpt = Path(checkpoint)
        state = read_state(ckpt)
        self._check_same_run(state, ckpt)
        subset = read_array(ckpt / SUBSET)
        if subset_hash(subset) != state["subset_hash"]:
            raise ValueError(f"{ckpt / SUBSET} does not match the hash in {STATE}; the checkpoint is damaged")
        has_selector_state = (ckpt / SELECTOR_SUBSET).is_file()
        selector_state = {"subset": read_array(ckpt / SELECTOR_SUBSET)} if has_selector_state else {}
        records_hash = state.get("training_scores_hash")
        records = self._read_records(ckpt, records_hash) if records_hash is not None else None
        resume_epochs = check_resume_layout(state, ckpt, world_size)
        if selector_state:
            selector.load_state_dict(selector_state)
        selection.load_state_dict({**state, "subset": subset})
        return records, resume_epochs

    def _check_same_run(self, state: dict[str, Any], ckpt: Path) -> None:
        """Refuse a checkpoint's state that another method or other data selected."""
        if state["method"] != self.method or state["num_samples"] != self.num_samples:
            raise ValueError(
                f"checkpoint {ckpt} selected with method={state['method']!r} over {state['num_samples']} samples; "
                f"this run uses {self.method!r} over {self.num_samples}"
            )
        saved_fp, fingerprint = state.get("data_fingerprint"), self.data_fingerprint
        if saved_fp is not None and fingerprint is not None and saved_fp != fingerprint:
            raise ValueError(
                f"checkpoint {ckpt} was trained on other data: training-set fingerprint {saved_fp} there, "
                f"{fingerprint} now (same size, but another seed, --max_train_samples draw, data "
                "folder or dataset revision?). Resume with the original data settings, or start a new run."
            )
        changes = quantization_changes(state.get("quantization") or {}, self.quantization or {})
        if changes:
            raise ValueError(
                f"checkpoint {ckpt} was trained with other quantization settings ({'; '.join(changes)}); resume "
                "with the checkpoint's settings, or start a new run"
            )
        changes = setting_changes(state.get("start") or {}, self.start or {})
        if changes:
            raise ValueError(f"checkpoint {ckpt} started from other weights ({'; '.join(changes)}); resume with them")

    @staticmethod
    def _read_records(ckpt: Path, expected_hash: str) -> dict[str, torch.Tensor]:
        """The training-pass records of a save, refused when missing, corrupt or not of that save."""
        records = read_arrays(ckpt / TRAINING_SCORES)
        if subset_hash(records.get(INDEX_KEY, torch.empty(0))) != expected_hash:
            raise ValueError(f"{ckpt / TRAINING_SCORES} does not match the hash in {STATE}; the checkpoint is damaged")
        return records
