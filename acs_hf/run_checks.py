"""Checks a run makes before any expensive work, and the lock that keeps one run per output folder.

Everything here fails in seconds with a message naming the argument, the value and what is
accepted, instead of after a dataset download, the FP warm-up or the whole training.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from transformers import TrainingArguments

from .checkpointing import latest_complete_checkpoint
from .quantization.checkpoint import WEIGHTS_NAME
from .reporting import RECORD_NAME

__all__ = ["preflight", "output_dir_lock", "RunInUseError", "LOCK_NAME"]

LOCK_NAME = ".acs_hf.lock"
#: What a finished or running job leaves in its output folder.
RESULT_MARKERS = (WEIGHTS_NAME, RECORD_NAME, "acs_summary.json", "all_results.json")


class RunInUseError(RuntimeError):
    """Another run holds the output folder's lock."""


def _check_epochs(args: TrainingArguments) -> None:
    epochs = args.num_train_epochs
    if args.max_steps is not None and args.max_steps > 0:
        return
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"num_train_epochs must be a finite number > 0 (or max_steps > 0), got {epochs!r}")


def _check_report_to(args: TrainingArguments) -> None:
    from transformers.integrations import get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    missing = [name for name in args.report_to or [] if name not in available]
    if missing:
        raise ValueError(
            f"report_to={missing} names trackers that are not installed (available here: "
            f"{sorted(available) or 'none'}); install them (pip install 'acs_hf[trackers]' for tensorboard) "
            "or pass --report_to none"
        )


def _resolve_resume(args: TrainingArguments) -> None:
    value = args.resume_from_checkpoint
    if value is None or value is False:
        return
    if value is True or str(value).lower() == "true":
        latest = latest_complete_checkpoint(args.output_dir)
        if latest is None:
            raise ValueError(f"resume_from_checkpoint=true but {args.output_dir} holds no complete checkpoint-* folder")
        args.resume_from_checkpoint = str(latest)
        return
    if not Path(value).is_dir():
        raise ValueError(f"resume_from_checkpoint={value!r} does not exist (pass a checkpoint-* folder or true)")


def _check_writable(directory: str | os.PathLike, what: str) -> None:
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{what}={str(directory)!r} is not writable ({e.strerror or e})") from e


def _check_foreign_results(args: TrainingArguments, overwrite: bool) -> None:
    out = Path(args.output_dir)
    if overwrite or args.resume_from_checkpoint or not out.is_dir():
        return
    found = [name for name in RESULT_MARKERS if (out / name).exists()] + sorted(
        p.name for p in out.glob("checkpoint-*")
    )[:3]
    if found:
        raise ValueError(
            f"output_dir={str(out)!r} holds another run's results ({', '.join(found)}); pass --resume_from_checkpoint "
            "true to continue it, --overwrite_output_dir true to replace its results, or another --output_dir"
        )


def preflight(args: TrainingArguments, teacher_cache_dir: str | None, push: bool, overwrite: bool) -> None:
    """Every check that needs neither data nor models. Resolves ``resume_from_checkpoint=true``."""
    _check_epochs(args)
    _check_report_to(args)
    _resolve_resume(args)
    _check_foreign_results(args, overwrite)
    if args.process_index == 0:
        _check_writable(args.output_dir, "output_dir")
    if teacher_cache_dir not in (None, "memory"):
        _check_writable(teacher_cache_dir, "teacher_cache_dir")
    if push and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ValueError("--push_to_hub needs the network, but HF_HUB_OFFLINE is set; unset it or drop --push_to_hub")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_dir_lock(output_dir: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold ``<output_dir>/.acs_hf.lock`` for the whole run (only where ``enabled``: the main process).

    A second run on the same folder fails with :class:`RunInUseError` naming the holder's pid and
    host. A lock left by a dead process on this host is taken over.
    """
    if not enabled:
        yield
        return
    path = Path(output_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            stale = holder.get("host") == me["host"] and isinstance(holder.get("pid"), int)
            if stale and not _pid_alive(holder["pid"]):
                path.unlink(missing_ok=True)  # its process is gone: take over
                continue
            raise RunInUseError(
                f"{Path(output_dir)} is in use by another run (pid {holder.get('pid')} on host {holder.get('host')}, "
                f"started {holder.get('started')}); wait for it, use another --output_dir, or delete {path} if "
                "that run is dead"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
