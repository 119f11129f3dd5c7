"""Checks a run makes before any expensive work, and the lock that keeps one run per output folder.

Everything here fails in seconds with a message naming the argument, the value and what is
accepted, instead of after a dataset download, the FP warm-up or the whole training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shlex
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from transformers import TrainingArguments

from ..layout import RunLayout
from ..training.arguments import check_number
from ..training.checkpoints import checkpoint_runs, latest_complete_checkpoint

__all__ = [
    "preflight",
    "output_dir_lock",
    "set_aside_previous_run",
    "RunInUseError",
    "LOCK_NAME",
]

LOCK_NAME = RunLayout.LOCK
#: The lock's holder touches it this often (seconds), so that a run elsewhere can tell it is alive.
HEARTBEAT_S = 30.0
#: A lock held on another host that is not touched for this long (watched on this host's clock,
#: so hosts' clocks need not agree; above NFS's 60 s attribute cache) is taken over.
STALE_AFTER_S = 300.0

logger = logging.getLogger(__name__)


class RunInUseError(RuntimeError):
    """Another run holds the output folder's lock."""


def _check_epochs(args: TrainingArguments) -> None:
    epochs = args.num_train_epochs
    if args.max_steps is not None and args.max_steps > 0:
        return
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"num_train_epochs must be a finite number > 0 (or max_steps > 0), got {epochs!r}")


#: TrainingArguments' batch settings the recipe uses: (name, lowest accepted value, may be unset).
BATCH_SETTINGS = (
    ("per_device_train_batch_size", 1, False),
    ("per_device_eval_batch_size", 1, False),
    ("gradient_accumulation_steps", 1, False),
    ("eval_accumulation_steps", 1, True),
    ("dataloader_num_workers", 0, False),
)


def _check_batches(args: TrainingArguments) -> None:
    """transformers accepts a batch size of 0, which fails only at the first batch (after the data
    and calibration) with torch's message: refuse it here."""
    for name, low, optional in BATCH_SETTINGS:
        check_number(name, getattr(args, name), low, integer=True, optional=optional)


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
        runs = checkpoint_runs(args.output_dir)
        if len(runs) > 1:
            described = "; ".join(f"run {run_id}: {', '.join(names)}" for run_id, names in runs.items())
            raise ValueError(
                f"resume_from_checkpoint=true but {args.output_dir} holds the checkpoints of {len(runs)} runs "
                f"({described}); pass the checkpoint to continue (--resume_from_checkpoint <folder>), or move the "
                "other run's checkpoints away"
            )
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
    resume = args.resume_from_checkpoint
    if overwrite and resume and out.resolve() in Path(resume).resolve().parents:
        raise ValueError(
            f"--overwrite_output_dir true moves the previous run's files out of {out}, the checkpoint to resume "
            f"({resume}) among them; drop --overwrite_output_dir to continue that run"
        )
    if overwrite or resume or not out.is_dir():
        return
    found = [name for name in RunLayout.result_markers() if (out / name).exists()] + sorted(
        p.name for p in out.glob(RunLayout.CHECKPOINTS)
    )[:3]
    if found:
        raise ValueError(
            f"output_dir={str(out)!r} holds another run's results ({', '.join(found)}); pass --resume_from_checkpoint "
            "true to continue it, --overwrite_output_dir true to replace its results, or another --output_dir"
        )


def preflight(args: TrainingArguments, teacher_cache_dir: str | None, push: bool, overwrite: bool) -> None:
    """Every check that needs neither data nor models. Resolves ``resume_from_checkpoint=true``."""
    _check_epochs(args)
    _check_batches(args)
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


def _lock_state(path: Path) -> tuple[dict, int] | None:
    """The lock's record and modification time (ns), or None when there is no lock."""
    try:
        mtime, text = path.stat().st_mtime_ns, path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError:  # being written, or damaged
        record = None
    return (record if isinstance(record, dict) else {}), mtime


def _dead_because(path: Path, state: tuple[dict, int], me: dict, heartbeat_s: float, stale_s: float) -> str | None:
    """Why the lock's holder is taken for dead, or None while it lives. A holder on this host is
    alive while its pid is; one elsewhere while it touches the lock (watched for ``stale_s``)."""
    holder, mtime = state
    pid = holder.get("pid")
    if holder.get("host") == me["host"] and isinstance(pid, int):
        return None if _pid_alive(pid) else f"its process {pid} on this host is gone"
    logger.warning(
        "%s is held by pid %s on host %s: watching it for up to %.0f s (a live run touches it every %.0f s, "
        "a dead one's is taken over)", path, pid, holder.get("host"), stale_s, heartbeat_s,
    )  # fmt: skip
    deadline = time.monotonic() + stale_s
    while time.monotonic() < deadline:
        time.sleep(min(1.0, heartbeat_s / 2))
        now = _lock_state(path)
        if now is None or now[1] != mtime:
            return None  # released or touched: not ours to take (the caller retries or refuses)
    return f"not touched for {stale_s:.0f} s"


def _in_use(output_dir: str | os.PathLike, path: Path, holder: dict, stale_s: float) -> RunInUseError:
    return RunInUseError(
        f"{Path(output_dir)} is in use by another run (pid {holder.get('pid')} on host {holder.get('host')}, "
        f"started {holder.get('started')}); wait for it or use another --output_dir. If that run is dead, free "
        f"the folder with:  rm -f {shlex.quote(str(path))}  (a lock held on another host that is not touched for "
        f"{stale_s:.0f} s is taken over by the next run)"
    )


def _acquire(output_dir: str | os.PathLike, path: Path, me: dict, heartbeat_s: float, stale_s: float) -> None:
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            state = _lock_state(path)
            if state is None:
                continue  # released meanwhile
            reason = _dead_because(path, state, me, heartbeat_s, stale_s)
            if reason is None:
                if _lock_state(path) is None:
                    continue
                raise _in_use(output_dir, path, state[0], stale_s) from None
            if _lock_state(path) == state:  # still the lock judged dead
                holder = state[0]
                logger.warning(
                    "Taking over %s of pid %s on host %s: %s", path, holder.get("pid"), holder.get("host"), reason
                )
                path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return
    raise _in_use(output_dir, path, (_lock_state(path) or ({}, 0))[0], stale_s)


def _heartbeat(path: Path, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        with contextlib.suppress(OSError):  # a hiccup of the file system must not end the run
            os.utime(path)


@contextlib.contextmanager
def output_dir_lock(output_dir: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
    """Hold ``<output_dir>/.acs_hf.lock`` for the whole run (only where ``enabled``: the main process).

    A second run on the same folder fails with :class:`RunInUseError` naming the holder's pid and
    host and the one command that frees the folder. While held, a daemon thread touches the lock
    every :data:`HEARTBEAT_S` seconds. A lock is taken over, with a warning, when its holder is dead:
    on this host, its pid is gone; on another host (a job requeued elsewhere), the lock was not
    touched while this run watched it for :data:`STALE_AFTER_S` seconds. On release the lock is
    removed only if it is still this run's.
    """
    if not enabled:
        yield
        return
    path = Path(output_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    _acquire(output_dir, path, me, HEARTBEAT_S, STALE_AFTER_S)
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(path, HEARTBEAT_S, stop), name="acs_hf-lock-heartbeat", daemon=True
    )
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        state = _lock_state(path)
        if state is not None and state[0] == me:
            path.unlink(missing_ok=True)


def set_aside_previous_run(args: TrainingArguments) -> Path | None:
    """``--overwrite_output_dir``: move what a previous run left in ``args.output_dir`` (checkpoints,
    selection files, caches, results) into a hidden ``.replaced-<time>-<pid>/`` folder inside it, which
    the Hub upload skips. The saving process does it while the others wait, before any of them
    reads the folder. Returns that folder (``None`` if nothing was there, and on other processes)."""
    with args.main_process_first(local=args.save_on_each_node, desc="moving the previous run aside"):
        out = Path(args.output_dir)
        found = (
            sorted({p for pattern in RunLayout.previous_run_files() for p in out.glob(pattern)})
            if args.should_save
            else []
        )
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
