"""Checkpoint folders: which are complete, whose run they belong to, which a resume may use.

A checkpoint is complete only when ``acs_state.json`` (written first, by
:meth:`acs_hf.training.checkpoint_state.SelectionCheckpointer.save`) and the Trainer's ``trainer_state.json``
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
import uuid
from pathlib import Path
from typing import Any

from ..layout import CHECKPOINT_PREFIX, RunLayout
from ..utils.io import atomic_write
from .consistency import broadcast_object

__all__ = [
    "PAIRING_KEY",
    "read_state",
    "clear_for_save",
    "step_of",
    "epoch_boundary_checkpoints",
    "is_complete_checkpoint",
    "latest_complete_checkpoint",
    "checkpoint_runs",
    "run_identity",
    "check_checkpoints_ahead",
    "load_warmup",
    "load_resumed_warmup",
    "saved_warmups",
]

logger = logging.getLogger(__name__)

STATE_NAME, TRAINER_STATE_NAME = RunLayout.ACS_STATE, RunLayout.TRAINER_STATE
#: The entry of ``trainer_state.json``'s ``stateful_callbacks`` that names the save it belongs to.
PAIRING_KEY = "ACSCheckpoint"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


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


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def _checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=step_of)


def latest_complete_checkpoint(output_dir: str | os.PathLike, needs_acs_state: bool = True) -> Path | None:
    """The newest ``checkpoint-<step>`` in ``output_dir`` whose save finished (``None`` if none did)."""
    complete = [p for p in _checkpoints(output_dir) if is_complete_checkpoint(p, needs_acs_state)]
    return complete[-1] if complete else None


def epoch_boundary_checkpoints(output_dir: Path) -> list[Path]:
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
    saved = None
    if resume_from_checkpoint is not None:
        saved = (_read_json(Path(resume_from_checkpoint) / STATE_NAME) or {}).get("run_id")
    # Every process reaches the broadcast, whatever it read: process 0's answer is the run's.
    return broadcast_object(saved or uuid.uuid4().hex[:12])


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
        if step_of(p) > step and (other := _other_save(p, run_id, world_size))
    ]
    if others:
        raise ValueError(
            f"resuming from {resumed_from} at step {step} on {world_size} process(es), this run would save its "
            f"checkpoints into {output_dir} over or among {', '.join(others[:4])}"
            f"{' and more' if len(others) > 4 else ''}, which it cannot tell from its own. Resume into a new folder "
            f"(--output_dir NEW --resume_from_checkpoint {resumed_from}), or move those checkpoints out of "
            f"{output_dir} first"
        )


# -- the FP warm-up model of the run a checkpoint belongs to ------------------------------------------
def load_warmup(model: Any, path: Path) -> None:
    """Load the saved warm-up model at ``path`` into ``model``, refusing an unreadable file by name."""
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except Exception as e:  # safetensors raises several types for a truncated file
        raise ValueError(
            f"the saved FP warm-up model {path} is unreadable ({e}); delete it to train the warm-up again"
        ) from e
    model.load_state_dict(state)


def saved_warmups(training_args: Any) -> list[Path]:
    """Where a resumed run's warm-up model may be: the interrupted run's folder (the checkpoint's
    parent), then ``output_dir``."""
    folders = [Path(training_args.resume_from_checkpoint).parent, Path(training_args.output_dir)]
    return list(dict.fromkeys(RunLayout(f).fp_warmup / RunLayout.WEIGHTS for f in folders))


def load_resumed_warmup(model: Any, training_args: Any) -> bool:
    """Load the interrupted run's warm-up model into ``model`` (and keep a copy in ``output_dir``);
    False, with a warning, when none was saved (the caller trains the warm-up again)."""
    candidates = saved_warmups(training_args)
    saved = next((path for path in candidates if path.is_file()), None)
    if saved is None:
        logger.warning(
            "Resuming from %s, but no saved FP warm-up model is in %s: training the warm-up again, so the "
            "teacher and the QAT starting point differ from the interrupted run's",
            training_args.resume_from_checkpoint,
            " or ".join(str(p) for p in candidates),
        )
        return False
    load_warmup(model, saved)
    logger.info("Resuming: FP warm-up model loaded from %s", saved)
    kept = RunLayout(training_args.output_dir).fp_warmup / RunLayout.WEIGHTS
    if saved != kept and training_args.process_index == 0:  # a later resume from this folder finds it
        atomic_write(kept, lambda tmp: shutil.copyfile(saved, tmp))
    return True
