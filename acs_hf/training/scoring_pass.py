"""The sharded scoring pass.

Every process scores its shard of the un-augmented training view, then the per-sample statistics
are gathered (:func:`acs_hf.training.consistency.gather_statistics`) so that every process holds
the full ``[N]`` tensors in dataset order, keyed by the
dataset index that each batch carries (so padding duplicates added by the distributed sampler are
harmless).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from ..data.batch import INDEX_KEY, default_forward
from ..selection import batch_statistics
from .consistency import gather_statistics
from .teacher_cache import TeacherCache

__all__ = ["scoring_pass", "release_freed_memory"]

logger = logging.getLogger(__name__)

#: Batches between two returns of freed heap memory to the OS (see :func:`release_freed_memory`).
TRIM_EVERY = 32


@torch.no_grad()
def scoring_pass(
    model: nn.Module,
    dataloader: torch.utils.data.DataLoader,
    accelerator: Accelerator,
    stats: Sequence[str],
    num_samples: int,
    teacher: nn.Module | None = None,
    teacher_cache: TeacherCache | None = None,
    forward_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor] = default_forward,
    desc: str = "Scoring",
    timings: dict[str, float] | None = None,
    expected: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample statistics of the training set (or of a pool of it), identical on every process.

    Args:
        model: the (quantized) student.
        dataloader: the un-augmented view, prepared by ``accelerator`` (sharded), yielding dicts
            with ``pixel_values``, ``labels`` and :data:`INDEX_KEY`.
        accelerator: gives the device, the mixed-precision autocast and the gather.
        stats: statistic names (``evs``, ``ds``, ``entropy``, ``margin``, ``least_confidence``).
        num_samples: N; every index in ``[0, N)`` must be scored by some process, unless ``expected``.
        expected: optional [N] bool mask of the indices the dataloader covers (a candidate pool);
            the statistics of the other samples are NaN.
        teacher: FP model for ``ds``; with ``teacher_cache`` it runs only for rows not cached yet.
        teacher_cache: see :class:`TeacherCache`; finalised at the end of a full pass (without
            ``expected``); a pool pass adds its new rows in memory.
        forward_fn: ``(model, batch) -> logits``.
        timings: if given, filled with this process's seconds per phase (see :class:`PassTimings`).

    Returns a dict of float32 ``[N]`` CPU tensors, one per statistic, plus ``labels`` (int64).
    Models run in eval mode under ``torch.inference_mode`` and the accelerator's autocast; their
    train/eval modes are restored afterwards.
    """
    stats = tuple(stats)
    needs_teacher = "ds" in stats
    if needs_teacher and teacher is None and (teacher_cache is None or not teacher_cache.complete):
        raise ValueError("the 'ds' statistic needs a teacher model (or a complete teacher cache)")
    student = accelerator.unwrap_model(model)
    watch = PassTimings()
    if needs_teacher and teacher_cache is not None and not teacher_cache.complete:
        teacher_cache.reserve(_rows_per_process(dataloader, accelerator))
    with _eval_mode(student, teacher):
        models = _PassModels(student, teacher, teacher_cache, forward_fn)
        local, teacher_calls = _score_batches(dataloader, models, stats, accelerator, desc, watch)
    logger.debug("scoring pass: %d teacher forwards on process %d", teacher_calls, accelerator.process_index)
    if teacher_cache is not None and needs_teacher and expected is None:
        # A full pass completes the cache; a pool pass leaves it growing in memory, round by round.
        teacher_cache.finalize(accelerator.wait_for_everyone, accelerator.is_main_process)
        watch.lap("teacher_seconds")
    out = _gather(local, num_samples, accelerator, expected, watch)
    if timings is not None:
        timings.update(watch.spent)
    return out


class PassTimings:
    """Seconds of one process in each phase of a scoring pass, each lap charged to the phase it ends:
    waiting for batches (``data_seconds``), in the student and its statistics (``student_seconds``),
    in the teacher or its cache (``teacher_seconds``), waiting for the other processes to finish
    (``wait_seconds``) and in the gather (``gather_seconds``). On a GPU the first three are
    host-side times (kernels run asynchronously)."""

    PHASES = ("data_seconds", "student_seconds", "teacher_seconds", "wait_seconds", "gather_seconds")

    def __init__(self) -> None:
        self.spent = dict.fromkeys(self.PHASES, 0.0)
        self.clock = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.spent[phase] += now - self.clock
        self.clock = now


@contextlib.contextmanager
def _eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Eval mode for the pass; each model's train/eval mode restored afterwards."""
    modes = [(m, m.training) for m in models if m is not None]
    try:
        for m, _ in modes:
            m.eval()
        yield
    finally:
        for m, training in modes:
            m.train(training)


@dataclasses.dataclass
class _PassModels:
    student: nn.Module
    teacher: nn.Module | None
    teacher_cache: TeacherCache | None
    forward_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor]

    def teacher_probs(self, batch: dict[str, Any], index: torch.Tensor, accelerator: Accelerator):
        """The teacher's probabilities for a batch (cached, or computed and cached), and whether
        the teacher ran."""
        p_t = self.teacher_cache.get(index) if self.teacher_cache is not None else None
        ran = p_t is None
        if ran:
            with accelerator.autocast():
                t_logits = self.forward_fn(self.teacher, batch)
            p_t = torch.softmax(t_logits.float(), dim=1)
            if self.teacher_cache is not None:
                self.teacher_cache.put(index, p_t)
                p_t = p_t.half()  # every round then sees the same cached values
        return p_t.to(accelerator.device), ran


def _score_batches(
    dataloader, models: _PassModels, stats: tuple[str, ...], accelerator: Accelerator, desc: str, watch: PassTimings
) -> tuple[dict[str, list[torch.Tensor]], int]:
    """This process's statistics, labels and indices, batch by batch, and its teacher forwards."""
    device = accelerator.device
    local: dict[str, list[torch.Tensor]] = {k: [] for k in (*stats, "labels", INDEX_KEY)}
    teacher_calls = 0
    bar = tqdm(dataloader, desc=desc, disable=not accelerator.is_local_main_process, leave=False)
    with torch.inference_mode():
        for batch in bar:
            watch.lap("data_seconds")
            labels, index = batch["labels"].to(device), batch[INDEX_KEY].to(device)
            local["labels"].append(labels.long())
            local[INDEX_KEY].append(index.long())
            if not stats:  # labels only (random selectors): no forward pass
                continue
            with accelerator.autocast():
                logits = models.forward_fn(models.student, batch)
            watch.lap("student_seconds")
            p_t = None
            if "ds" in stats:
                p_t, ran = models.teacher_probs(batch, index, accelerator)
                teacher_calls += ran
                watch.lap("teacher_seconds")
            for name, value in batch_statistics(stats, logits, labels, p_t).items():
                local[name].append(value.float())
            if len(local["labels"]) % TRIM_EVERY == 0:
                release_freed_memory()
            watch.lap("student_seconds")
    return local, teacher_calls


def _gather(
    local: dict[str, list[torch.Tensor]],
    num_samples: int,
    accelerator: Accelerator,
    expected: torch.Tensor | None,
    watch: PassTimings,
) -> dict[str, torch.Tensor]:
    if accelerator.num_processes > 1:  # time the wait for the slowest process apart from the gather itself
        accelerator.wait_for_everyone()
        watch.lap("wait_seconds")
    out = gather_statistics(local, num_samples, accelerator, expected)
    release_freed_memory()
    watch.lap("gather_seconds")
    return out


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc only (Linux); elsewhere nothing to do
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``).

    A scoring pass allocates and frees large ``[batch, classes]`` temporaries thousands of times;
    once glibc's adaptive mmap threshold has risen above their size they come from the heap, and
    the small tensors kept between them (per-batch statistics, batches from loader workers) pin
    the freed space: without trimming, resident memory grew by 8 KB per sample at 1,000 classes
    (2.5 GB per round at ImageNet size) beyond the teacher cache.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _rows_per_process(dataloader, accelerator: Accelerator) -> int:
    """Rows this process will score: its batches times the per-process batch size (accelerate's
    prepared loaders report the global one), so the teacher cache is allocated once."""
    batch_size = getattr(dataloader, "total_batch_size", None)
    batch_size = batch_size // accelerator.num_processes if batch_size else (dataloader.batch_size or 1)
    return len(dataloader) * batch_size
