"""The sharded scoring pass and the teacher cache.

Every process scores its shard of the un-augmented training view, then the per-sample statistics
are gathered so that every process holds the full ``[N]`` tensors in dataset order, keyed by the
dataset index that each batch carries (so padding duplicates added by the distributed sampler are
harmless).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from ._io import atomic_save_npy, atomic_write_json
from .selection import batch_statistics

__all__ = ["TeacherCache", "TrainingScores", "score_dataset", "gather_statistics", "default_forward", "INDEX_KEY"]

logger = logging.getLogger(__name__)

#: Batch key holding each example's index in the (full) training set.
INDEX_KEY = "index"
#: Batches between two returns of freed heap memory to the OS (see :func:`release_freed_memory`).
TRIM_EVERY = 32


def default_forward(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Logits for a batch dict with ``pixel_values``: a timm model's output, or the ``.logits`` of
    a transformers model's output."""
    out = model(batch["pixel_values"])
    return out if isinstance(out, torch.Tensor) else out.logits


class TeacherCache:
    """Teacher probabilities (float16) keyed by dataset index, independent of the process layout.

    Teacher outputs on the un-augmented view never change, so they are computed in the first
    scoring round and looked up afterwards. Memory: ``N x C x 2`` bytes in all (ImageNet-1k:
    1.28M x 1000 x 2 B = 2.56 GB), each process computing its shard. With ``directory`` every
    process writes its rows and their dataset indices after the first round (``.npy``, atomic),
    the main process then writes ``teacher_cache.json`` (which marks the cache complete), and
    every process memory-maps all shards: a later run with another number of processes reads
    the rows it needs from whichever shard holds them.

    Args:
        num_samples: N, the size of the training set.
        directory: where to keep the memory-mapped files; ``None`` keeps everything in RAM.
        rank: process index, part of the shard file names.
        fingerprint: identifies the teacher and the training set as indexed (``ACSTrainer``
            hashes the teacher's weights and the data fingerprint). A cache written with another
            fingerprint or N is never reused: it is ignored, and replaced at :meth:`finalize`.
    """

    META_NAME = "teacher_cache.json"

    def __init__(
        self, num_samples: int, directory: str | os.PathLike | None = None, rank: int = 0, fingerprint: str = ""
    ) -> None:
        self.num_samples = num_samples
        self.directory = Path(directory) if directory is not None else None
        self.rank = rank
        self.fingerprint = fingerprint
        self.block_of = torch.full((num_samples,), -1, dtype=torch.int16)
        self.row_of = torch.full((num_samples,), -1, dtype=torch.long)
        self._blocks: list[torch.Tensor] = []  # memory-mapped shards, then this round's rows
        self._new: torch.Tensor | None = None  # rows computed by this process, growing
        self._size = 0
        self._reserved: int | None = None
        self.complete = False
        if self.directory is not None and (self.directory / self.META_NAME).is_file():
            self._open()

    @property
    def _tag(self) -> str:
        return hashlib.sha256(f"{self.num_samples}:{self.fingerprint}".encode()).hexdigest()[:12]

    def _shard_paths(self, rank: int) -> tuple[Path, Path]:
        return (
            self.directory / f"teacher_probs_{self._tag}_rank{rank}.npy",
            self.directory / f"teacher_index_{self._tag}_rank{rank}.npy",
        )

    def __len__(self) -> int:
        return int((self.block_of >= 0).sum())

    @property
    def nbytes(self) -> int:
        return sum(b.shape[0] * b.shape[1] * 2 for b in self._blocks) + (
            0 if self._new is None else self._size * self._new.shape[1] * 2
        )

    def reserve(self, rows: int) -> None:
        """Allocate room for ``rows`` new entries at the first :meth:`put` (growing by doubling
        would hold up to 3x the cache in memory while it copies)."""
        self._reserved = max(int(rows), 1)

    def get(self, indices: torch.Tensor) -> torch.Tensor | None:
        """float16 probabilities [B, C] when every index is cached, else None."""
        indices = indices.cpu()
        blocks, rows = self.block_of[indices].long(), self.row_of[indices]
        if (blocks < 0).any():
            return None
        sources = [*self._blocks, self._new]
        first = int(blocks[0])
        if bool((blocks == first).all()):
            return sources[first][rows]
        out = torch.empty(len(indices), sources[first].shape[1], dtype=torch.float16)
        for b in blocks.unique().tolist():
            mask = blocks == b
            out[mask] = sources[b][rows[mask]]
        return out

    def put(self, indices: torch.Tensor, probs: torch.Tensor) -> None:
        if self.complete:
            raise RuntimeError("TeacherCache is complete (memory-mapped read-only); cannot add rows")
        indices = indices.cpu()
        new = self.block_of[indices] < 0
        indices, probs = indices[new], probs[new.to(probs.device)].detach().to("cpu", torch.float16)
        if indices.numel() == 0:
            return
        # Drop repeats inside one batch (padding duplicates), keeping the first.
        uniq, first = np.unique(indices.numpy(), return_index=True)
        indices, probs = torch.from_numpy(uniq), probs[torch.from_numpy(first)]
        if self._new is None:
            rows = max(self._reserved or 1024, len(indices))
            self._new = torch.empty(rows, probs.shape[1], dtype=torch.float16)
        needed = self._size + len(indices)
        if needed > self._new.shape[0]:
            grown = torch.empty(max(needed, 2 * self._new.shape[0]), probs.shape[1], dtype=torch.float16)
            grown[: self._size] = self._new[: self._size]
            self._new = grown
        self._new[self._size : needed] = probs
        self.block_of[indices] = len(self._blocks)
        self.row_of[indices] = torch.arange(self._size, needed)
        self._size = needed

    def finalize(self, barrier: Callable[[], None] = lambda: None, is_main_process: bool = True) -> None:
        """End of the first round. With a directory: write this process's rows, wait for every
        process (``barrier``), let the main one remove other builds and write the metadata, wait
        again, then memory-map every shard. Called on every process."""
        if self.complete:
            return
        if self.directory is None:
            self.complete = True
            return
        self._write_shard()
        barrier()
        if is_main_process:
            self._write_meta()
        barrier()
        self._open()

    def _write_shard(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        rows_path, index_path = self._shard_paths(self.rank)
        rows = self._new[: self._size] if self._new is not None else torch.empty(0, 0, dtype=torch.float16)
        # Each new row's dataset index, from the lookup tables (no per-batch list: many small
        # allocations kept between large temporaries fragment the heap, ~3x the cache in RSS).
        mine = self.block_of == len(self._blocks)
        index = torch.empty(self._size, dtype=torch.long)
        index[self.row_of[mine]] = mine.nonzero().flatten()
        atomic_save_npy(rows_path, rows.numpy())
        atomic_save_npy(index_path, index.numpy())

    def _write_meta(self) -> None:
        pattern = f"teacher_index_{self._tag}_rank*.npy"
        shards = sorted(int(p.stem.rsplit("rank", 1)[1]) for p in self.directory.glob(pattern))
        for stale in self.directory.glob("teacher_*.npy"):
            if self._tag not in stale.name:
                stale.unlink(missing_ok=True)  # another teacher or dataset: never reused
        meta = {"num_samples": self.num_samples, "fingerprint": self.fingerprint, "shards": shards}
        atomic_write_json(self.directory / self.META_NAME, meta)

    def _open(self) -> None:
        meta_path = self.directory / self.META_NAME
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(
                f"teacher cache {meta_path} is corrupt ({e}); delete {self.directory} to rebuild it"
            ) from e
        if meta.get("num_samples") != self.num_samples or meta.get("fingerprint") != self.fingerprint:
            logger.warning(
                "Teacher cache in %s was built for another teacher or dataset (N=%s); it is ignored and rebuilt",
                self.directory,
                meta.get("num_samples"),
            )
            return
        block_of = torch.full((self.num_samples,), -1, dtype=torch.int16)
        row_of = torch.full((self.num_samples,), -1, dtype=torch.long)
        blocks = []
        for rank in meta["shards"]:
            rows_path, index_path = self._shard_paths(rank)
            try:
                index = torch.from_numpy(np.load(index_path)).long()
                rows = np.load(rows_path, mmap_mode="c")  # copy-on-write: torch wants writable; never written
            except (OSError, ValueError) as e:
                raise ValueError(
                    f"teacher cache shard {rows_path.name} or {index_path.name} in {self.directory} is missing or "
                    f"corrupt ({e}); delete {self.directory} to rebuild the cache"
                ) from e
            if rows.shape[0] != index.numel() or (index.numel() and int(index.max()) >= self.num_samples):
                raise ValueError(
                    f"teacher cache shard {rows_path.name} does not match its index; delete {self.directory} to rebuild"
                )
            if index.numel():
                block_of[index] = len(blocks)
                row_of[index] = torch.arange(index.numel())
                blocks.append(torch.from_numpy(rows))
        if (block_of < 0).any():
            raise ValueError(
                f"teacher cache in {self.directory} covers {int((block_of >= 0).sum())} of {self.num_samples} samples; "
                "delete it to rebuild"
            )
        self.block_of, self.row_of, self._blocks = block_of, row_of, blocks
        self._new, self._size = None, 0
        self.complete = True


@torch.no_grad()
def score_dataset(
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
        timings: if given, filled with this process's seconds spent waiting for batches
            (``data_seconds``), in the student and its statistics (``student_seconds``), in the
            teacher or its cache (``teacher_seconds``), waiting for the other processes to finish
            (``wait_seconds``) and in the gather (``gather_seconds``).
            On a GPU the first three are host-side times (kernels run asynchronously).

    Returns a dict of float32 ``[N]`` CPU tensors, one per statistic, plus ``labels`` (int64).
    Models run in eval mode under ``torch.inference_mode`` and the accelerator's autocast; their
    train/eval modes are restored afterwards.
    """
    stats = tuple(stats)
    needs_teacher = "ds" in stats
    if needs_teacher and teacher is None and (teacher_cache is None or not teacher_cache.complete):
        raise ValueError("the 'ds' statistic needs a teacher model (or a complete teacher cache)")
    student = accelerator.unwrap_model(model)
    modes = [(m, m.training) for m in (student, teacher) if m is not None]
    device = accelerator.device
    local: dict[str, list[torch.Tensor]] = {k: [] for k in (*stats, "labels", INDEX_KEY)}
    teacher_calls = 0
    spent = dict.fromkeys(("data_seconds", "student_seconds", "teacher_seconds", "wait_seconds", "gather_seconds"), 0.0)
    clock = time.perf_counter()

    def lap(key: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        spent[key] += now - clock
        clock = now

    if needs_teacher and teacher_cache is not None and not teacher_cache.complete:
        teacher_cache.reserve(_rows_per_process(dataloader, accelerator))
    try:
        for m, _ in modes:
            m.eval()
        bar = tqdm(dataloader, desc=desc, disable=not accelerator.is_local_main_process, leave=False)
        with torch.inference_mode():
            for batch in bar:
                lap("data_seconds")
                labels, index = batch["labels"].to(device), batch[INDEX_KEY].to(device)
                local["labels"].append(labels.long())
                local[INDEX_KEY].append(index.long())
                if not stats:  # labels only (random selectors): no forward pass
                    continue
                with accelerator.autocast():
                    logits = forward_fn(student, batch)
                lap("student_seconds")
                p_t = None
                if needs_teacher:
                    p_t = teacher_cache.get(index) if teacher_cache is not None else None
                    if p_t is None:
                        with accelerator.autocast():
                            t_logits = forward_fn(teacher, batch)
                        teacher_calls += 1
                        p_t = torch.softmax(t_logits.float(), dim=1)
                        if teacher_cache is not None:
                            teacher_cache.put(index, p_t)
                            p_t = p_t.half()  # every round then sees the same cached values
                    p_t = p_t.to(device)
                    lap("teacher_seconds")
                for name, value in batch_statistics(stats, logits, labels, p_t).items():
                    local[name].append(value.float())
                if len(local["labels"]) % TRIM_EVERY == 0:
                    release_freed_memory()
                lap("student_seconds")
    finally:
        for m, training in modes:
            m.train(training)
    if teacher_cache is not None and needs_teacher and expected is None:
        # A full pass completes the cache; a pool pass leaves it growing in memory, round by round.
        teacher_cache.finalize(accelerator.wait_for_everyone, accelerator.is_main_process)
        lap("teacher_seconds")
    logger.debug("scoring pass: %d teacher forwards on process %d", teacher_calls, accelerator.process_index)
    if accelerator.num_processes > 1:  # time the wait for the slowest process apart from the gather itself
        accelerator.wait_for_everyone()
        lap("wait_seconds")
    out = gather_statistics(local, num_samples, accelerator, expected)
    release_freed_memory()
    lap("gather_seconds")
    if timings is not None:
        timings.update(spent)
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


def gather_statistics(
    local: dict[str, list[torch.Tensor]],
    num_samples: int,
    accelerator: Accelerator,
    expected: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every process's per-batch statistics (lists under their names, dataset indices under
    :data:`INDEX_KEY`) as full ``[N]`` CPU tensors in dataset order, on every process.

    Every index in ``expected`` (an [N] bool mask; default: all) must have been scored by some
    process; float statistics of the other samples are NaN. A collective: call on every process.
    """
    device = accelerator.device
    cat = {
        k: torch.cat(v) if v else torch.empty(0, dtype=torch.long if k in ("labels", INDEX_KEY) else torch.float32)
        for k, v in local.items()
    }
    cat = {k: v.to(device) for k, v in cat.items()}
    if accelerator.num_processes > 1:
        # Shards may differ in length: pad (index -1 marks padding), gather, drop the padding.
        cat[INDEX_KEY] = accelerator.pad_across_processes(cat[INDEX_KEY], pad_index=-1)
        cat = {k: accelerator.pad_across_processes(v) if k != INDEX_KEY else v for k, v in cat.items()}
        cat = {k: accelerator.gather(v) for k, v in cat.items()}
    index = cat.pop(INDEX_KEY).cpu()
    keep = index >= 0
    index = index[keep]
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
        full[index] = v.cpu()[keep]
        out[k] = full
    return out


class TrainingScores:
    """Per-sample statistics taken from the training pass, at no extra forward.

    ACSTrainer records each training batch's student logits (and the distillation teacher's
    probabilities, for ``ds``) under the batch's dataset indices; at the next selection round
    :meth:`collect` gathers them from every process. A sample trained on several times keeps its
    latest values. The statistics are of the *training* view (augmented, train mode), not the
    un-augmented eval view of the scoring pass.
    """

    def __init__(self, stats: Sequence[str]) -> None:
        self.stats = tuple(stats)
        self.clear()

    def clear(self) -> None:
        self._local: dict[str, list[torch.Tensor]] = {k: [] for k in (*self.stats, INDEX_KEY)}

    @torch.no_grad()
    def record(
        self, index: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, teacher_probs: torch.Tensor | None
    ) -> None:
        values = batch_statistics(self.stats, logits.detach(), labels, teacher_probs)
        for name, value in values.items():
            self._local[name].append(value.float().cpu())
        self._local[INDEX_KEY].append(index.detach().long().cpu())

    def collect(self, num_samples: int, accelerator: Accelerator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``(stats, seen)``: ``[N]`` statistics (NaN where not trained on) and the mask of samples
        trained on since :meth:`clear`, on every process (a collective). Later records win."""
        index = torch.cat(self._local[INDEX_KEY]) if self._local[INDEX_KEY] else torch.empty(0, dtype=torch.long)
        # Keep each index's last record: a stable sort puts repeats in recording order.
        order = torch.sort(index, stable=True).indices
        last = torch.ones(order.numel(), dtype=torch.bool)
        last[:-1] = index[order][1:] != index[order][:-1]
        keep = order[last]
        local = {k: [torch.cat(v)[keep]] if v else [] for k, v in self._local.items() if k != INDEX_KEY}
        local[INDEX_KEY] = [index[keep]]
        local["labels"] = [torch.zeros(keep.numel(), dtype=torch.long)]  # placeholder: labels come from the data
        stats = gather_statistics(local, num_samples, accelerator, expected=torch.zeros(num_samples, dtype=torch.bool))
        stats.pop("labels")
        seen = ~torch.isnan(stats[self.stats[0]]) if self.stats else torch.zeros(num_samples, dtype=torch.bool)
        return stats, seen
