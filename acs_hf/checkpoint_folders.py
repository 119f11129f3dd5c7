"""Checkpoint folders: which are complete, whose run they belong to, which a resume may use.

A checkpoint is complete only when ``acs_state.json`` (written first, by
:meth:`acs_hf.selection_state.SelectionState.save`) and the Trainer's ``trainer_state.json``
(written last by the Trainer, before it rotates old checkpoints) are both there and describe the
same save: the same step, run and save id. A save never writes into a finished checkpoint of
another run or another process count (their step numbers count other steps); a finished folder
of the same run and step (left by a resume from an earlier checkpoint), or an interrupted one, is
removed first, so an interrupted save can never pair new files with old ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list

from .quantization.packed import WEIGHTS_NAME
from .reporting import PLOT_NAME, RECORD_NAME, SUBSET_DIR

if TYPE_CHECKING:
    from transformers import TrainingArguments

__all__ = [
    "read_state",
    "check_same_run",
    "read_array",
    "read_arrays",
    "clear_for_save",
    "check_resume_layout",
    "is_complete_checkpoint",
    "latest_complete_checkpoint",
    "checkpoint_runs",
    "run_identity",
    "check_checkpoints_ahead",
    "set_aside_previous_run",
]

logger = logging.getLogger(__name__)

STATE_NAME = "acs_state.json"
SUBSET_NAME = "acs_subset.npy"
SELECTOR_STATE_NAME = "acs_selector_subset.npy"
#: The training-pass records a round with ``reuse_training_scores`` reuses (indices and statistics).
TRAINING_SCORES_NAME = "acs_training_scores.npz"
TRAINER_STATE_NAME = "trainer_state.json"
#: The entry of ``trainer_state.json``'s ``stateful_callbacks`` that names the save it belongs to.
PAIRING_KEY = "ACSCheckpoint"
#: The ONNX file ``--export_onnx`` writes beside the checkpoint (and its external data, if any).
ONNX_NAME = "model.onnx"
#: What a previous run leaves in its output folder; ``--overwrite_output_dir`` moves it aside.
PREVIOUS_RUN_FILES = ("checkpoint-*", SUBSET_DIR, RECORD_NAME, PLOT_NAME, "teacher_cache", "fp_warmup", "runs",
                      WEIGHTS_NAME, "config.json", "preprocessor_config.json", "README.md", "acs_summary.json",
                      "*_results.json", TRAINER_STATE_NAME, ONNX_NAME, f"{ONNX_NAME}.data")  # fmt: skip
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` if it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _pairing_error(acs_state: dict[str, Any], trainer_state: dict[str, Any]) -> str | None:
    """Why the two state files of a checkpoint are not from the same save (``None`` if they are)."""
    paired = trainer_state.get("stateful_callbacks", {}).get(PAIRING_KEY, {}).get("attributes", {})
    keys = [k for k in ("run_id", "save_id") if k in acs_state]  # absent from checkpoints of older versions
    if acs_state.get("global_step") == trainer_state.get("global_step") and all(
        acs_state[k] == paired.get(k) for k in keys
    ):
        return None
    return (
        f"holds {STATE_NAME} of step {acs_state.get('global_step')} (run {acs_state.get('run_id')}, save "
        f"{acs_state.get('save_id')}) but {TRAINER_STATE_NAME} of step {trainer_state.get('global_step')} (run "
        f"{paired.get('run_id')}, save {paired.get('save_id')}): they come from different saves, the later one "
        "interrupted"
    )


def is_complete_checkpoint(path: str | os.PathLike, needs_acs_state: bool = True) -> bool:
    """Whether the save of ``path`` finished: its state files are there and describe the same save."""
    path = Path(path)
    trainer_state = _read_json(path / TRAINER_STATE_NAME)
    if trainer_state is None or not needs_acs_state:
        return trainer_state is not None
    acs_state = _read_json(path / STATE_NAME)
    return acs_state is not None and _pairing_error(acs_state, trainer_state) is None


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def _checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=_step)


def latest_complete_checkpoint(output_dir: str | os.PathLike, needs_acs_state: bool = True) -> Path | None:
    """The newest ``checkpoint-<step>`` in ``output_dir`` whose save finished (``None`` if none did)."""
    complete = [p for p in _checkpoints(output_dir) if is_complete_checkpoint(p, needs_acs_state)]
    return complete[-1] if complete else None


def _epoch_boundary_checkpoints(output_dir: Path) -> list[Path]:
    boundary = [p for p in _checkpoints(output_dir) if (_read_json(p / STATE_NAME) or {}).get("at_epoch_boundary")]
    return [p for p in boundary if is_complete_checkpoint(p)]


def _other_save(ckpt: Path, run_id: str, world_size: int) -> str | None:
    """Whose finished checkpoint ``ckpt`` is, if not this run's on this process count (``None``: it
    is, or its save was interrupted)."""
    if not (ckpt / TRAINER_STATE_NAME).is_file():
        return None
    state = _read_json(ckpt / STATE_NAME) or {}
    if state.get("run_id") != run_id:
        return f"run {state['run_id']}" if state.get("run_id") else "a run without run identity (older acs_hf?)"
    if state.get("world_size") != world_size:
        return f"this run on {state.get('world_size')} process(es), whose step numbers count other steps"
    return None


def clear_for_save(ckpt: Path, run_id: str, world_size: int, step: int) -> None:
    """Refuse to save into another save's finished checkpoint; remove this run's stale one."""
    if not ckpt.exists():
        return
    other = _other_save(ckpt, run_id, world_size)
    if other is not None:
        raise RuntimeError(
            f"{ckpt} already holds a checkpoint of {other}; this save (step {step}, run "
            f"{run_id} on {world_size} process(es)) will not write into it. Move "
            f"that folder out of {ckpt.parent}, then resume this run from its latest checkpoint"
        )
    # An interrupted save, or this run's own earlier save of this step (resumed from before it).
    logger.info("Replacing %s: an interrupted or superseded save of this run", ckpt)
    shutil.rmtree(ckpt)


def read_state(ckpt: Path) -> dict[str, Any]:
    """The ACS state of ``ckpt``, refused when missing, corrupt or not paired with the Trainer's."""
    path = ckpt / STATE_NAME
    hint = f"resume from the latest complete checkpoint in {ckpt.parent} ({latest_complete_checkpoint(ckpt.parent)})"
    if not path.is_file():
        raise FileNotFoundError(
            f"{ckpt} has no {STATE_NAME}: it was not written by ACSTrainer, or its save was interrupted; {hint}"
        )
    if not (ckpt / TRAINER_STATE_NAME).is_file():
        raise FileNotFoundError(f"{ckpt} has no {TRAINER_STATE_NAME}: its save was interrupted; {hint}")
    try:
        state = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is corrupt ({e}); resume from an earlier checkpoint") from e
    error = _pairing_error(state, _read_json(ckpt / TRAINER_STATE_NAME) or {})
    if error is not None:
        raise ValueError(f"{ckpt} {error}; {hint}")
    return state


def check_same_run(
    state: dict[str, Any], ckpt: Path, method: str, num_samples: int, data_fingerprint: str | None
) -> None:
    """Refuse a checkpoint's state (``read_state``) that another method or other data selected."""
    if state["method"] != method or state["num_samples"] != num_samples:
        raise ValueError(
            f"checkpoint {ckpt} selected with method={state['method']!r} over {state['num_samples']} samples; "
            f"this run uses {method!r} over {num_samples}"
        )
    saved_fp = state.get("data_fingerprint")
    if saved_fp is not None and data_fingerprint is not None and saved_fp != data_fingerprint:
        raise ValueError(
            f"checkpoint {ckpt} was trained on other data: training-set fingerprint {saved_fp} there, "
            f"{data_fingerprint} now (same size, but another seed, --max_train_samples draw, data "
            "folder or dataset revision?). Resume with the original data settings, or start a new run."
        )


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
    boundary = [p for p in _epoch_boundary_checkpoints(ckpt.parent) if _step(p) <= step]
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


def checkpoint_runs(output_dir: str | os.PathLike) -> dict[str, list[str]]:
    """The complete checkpoints of ``output_dir`` by the run id in their ACS state (those of older
    versions, without one, left out)."""
    runs: dict[str, list[str]] = {}
    for p in _checkpoints(output_dir):
        run_id = (_read_json(p / STATE_NAME) or {}).get("run_id")
        if run_id and is_complete_checkpoint(p):
            runs.setdefault(run_id, []).append(p.name)
    return runs


def run_identity(resume_from_checkpoint: str | os.PathLike | None) -> str:
    """The run id of a training: the resumed checkpoint's, else a new random one, made on process 0
    and broadcast (a collective: every process calls this)."""
    if resume_from_checkpoint is not None:
        saved = (_read_json(Path(resume_from_checkpoint) / STATE_NAME) or {}).get("run_id")
        if saved:
            return saved
    return broadcast_object_list([uuid.uuid4().hex[:12]], from_process=0)[0]


def check_checkpoints_ahead(
    output_dir: str | os.PathLike, resumed_from: str, step: int, world_size: int, run_id: str
) -> None:
    """Refuse, before training, a resume that would save among finished checkpoints of another run
    or another process count: step numbers depend on the process count, so it would write into them,
    or beside them out of order. This run's own later checkpoints (a resume from an earlier one) are
    replaced as their steps are saved again."""
    others = [
        f"{p.name} ({other})"
        for p in _checkpoints(output_dir)
        if _step(p) > step and (other := _other_save(p, run_id, world_size))
    ]
    if others:
        raise ValueError(
            f"resuming from {resumed_from} at step {step} on {world_size} process(es), this run would save its "
            f"checkpoints into {output_dir} over or among {', '.join(others[:4])}"
            f"{' and more' if len(others) > 4 else ''}, which it cannot tell from its own. Resume into a new folder "
            f"(--output_dir NEW --resume_from_checkpoint {resumed_from}), or move those checkpoints out of "
            f"{output_dir} first"
        )


def set_aside_previous_run(args: TrainingArguments) -> Path | None:
    """``--overwrite_output_dir``: move what a previous run left in ``args.output_dir`` (checkpoints,
    selection files, caches, results) into a hidden ``.replaced-<time>-<pid>/`` folder inside it, which
    the Hub upload skips. The saving process does it while the others wait, before any of them
    reads the folder. Returns that folder (``None`` if nothing was there, and on other processes)."""
    with args.main_process_first(local=args.save_on_each_node, desc="moving the previous run aside"):
        out = Path(args.output_dir)
        found = sorted({p for pattern in PREVIOUS_RUN_FILES for p in out.glob(pattern)}) if args.should_save else []
        if not found:
            return None
        aside = out / f".replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        aside.mkdir()
        for path in found:
            path.rename(aside / path.name)
        logger.warning(
            "--overwrite_output_dir: moved the previous run's %s out of the way into %s (delete it when not needed)",
            ", ".join(p.name for p in found[:6]) + (" ..." if len(found) > 6 else ""),
            aside,
        )
        return aside
