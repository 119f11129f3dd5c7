"""The sharded scoring pass and the teacher cache.

Every process scores its shard of the un-augmented training view, then the per-sample statistics
are gathered so that every process holds the full ``[N]`` tensors in dataset order, keyed by the
dataset index that each batch carries (so padding duplicates added by the distributed sampler are
harmless).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from ._io import atomic_save_npy
from .selection import batch_statistics

__all__ = ["TeacherCache", "score_dataset", "default_forward", "INDEX_KEY"]

logger = logging.getLogger(__name__)

#: Batch key holding each example's index in the (full) training set.
INDEX_KEY = "index"


def default_forward(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Logits of a timm-style model for a batch dict with ``pixel_values``."""
    return model(batch["pixel_values"])


class TeacherCache:
    """Teacher probabilities (float16) for the samples this process scores.

    Teacher outputs on the un-augmented view never change, so they are computed in the first
    scoring round and looked up afterwards. Memory: ``N / num_processes x C x 2`` bytes per
    process (ImageNet-1k: 1.28M x 1000 x 2 B = 2.56 GB in all, 320 MB per process on 8 GPUs).
    With ``directory`` the rows are written there after the first round (``.npy``, atomic
    rename) and memory-mapped, so they leave RAM and survive a resume.

    Args:
        num_samples: N, the size of the training set.
        directory: where to keep the memory-mapped file; ``None`` keeps everything in RAM.
        rank: process index, part of the file names.
        reuse: load a complete cache found in ``directory`` (a resumed run); ``False`` deletes it
            first, since a new run may use another teacher or another dataset.
    """

    def __init__(
        self, num_samples: int, directory: str | os.PathLike | None = None, rank: int = 0, reuse: bool = True
    ) -> None:
        self.num_samples = num_samples
        self.directory = Path(directory) if directory is not None else None
        self.rank = rank
        self.row_of = torch.full((num_samples,), -1, dtype=torch.long)
        self._rows: torch.Tensor | None = None
        self._size = 0
        self.complete = False
        if self.directory is not None:
            if not reuse:
                self._index_path.unlink(missing_ok=True)  # first: the index marks a complete cache
                self._rows_path.unlink(missing_ok=True)
            elif self._index_path.is_file():
                self._load()

    @property
    def _rows_path(self) -> Path:
        return self.directory / f"teacher_probs_rank{self.rank}.npy"

    @property
    def _index_path(self) -> Path:
        return self.directory / f"teacher_index_rank{self.rank}.npy"

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        return 0 if self._rows is None else self._size * self._rows.shape[1] * 2

    def get(self, indices: torch.Tensor) -> torch.Tensor | None:
        """float16 probabilities [B, C] when every index is cached, else None."""
        rows = self.row_of[indices.cpu()]
        if self._rows is None or (rows < 0).any():
            return None
        return self._rows[rows]

    def put(self, indices: torch.Tensor, probs: torch.Tensor) -> None:
        if self.complete:
            raise RuntimeError("TeacherCache is complete (memory-mapped read-only); cannot add rows")
        indices = indices.cpu()
        new = self.row_of[indices] < 0
        indices, probs = indices[new], probs[new.to(probs.device)].detach().to("cpu", torch.float16)
        if indices.numel() == 0:
            return
        # Drop repeats inside one batch (padding duplicates), keeping the first.
        uniq, first = np.unique(indices.numpy(), return_index=True)
        indices, probs = torch.from_numpy(uniq), probs[torch.from_numpy(first)]
        if self._rows is None:
            self._rows = torch.empty(max(1024, len(indices)), probs.shape[1], dtype=torch.float16)
        needed = self._size + len(indices)
        if needed > self._rows.shape[0]:
            grown = torch.empty(max(needed, 2 * self._rows.shape[0]), probs.shape[1], dtype=torch.float16)
            grown[: self._size] = self._rows[: self._size]
            self._rows = grown
        self._rows[self._size : needed] = probs
        self.row_of[indices] = torch.arange(self._size, needed)
        self._size = needed

    def finalize(self) -> None:
        """End of the first round: with a directory, write the rows and memory-map them."""
        if self.complete:
            return
        if self.directory is not None and self._rows is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_save_npy(self._rows_path, self._rows[: self._size].numpy())
            atomic_save_npy(self._index_path, self.row_of.numpy())  # written last: marks completeness
            self._load()
        self.complete = True

    def _load(self) -> None:
        row_of = torch.from_numpy(np.load(self._index_path))
        if row_of.numel() != self.num_samples:
            raise ValueError(
                f"teacher cache {self._index_path} covers {row_of.numel()} samples, the dataset has "
                f"{self.num_samples}; delete the directory to rebuild it"
            )
        self.row_of = row_of
        # Copy-on-write map: torch wants a writable array; nothing is ever written back.
        self._rows = torch.from_numpy(np.load(self._rows_path, mmap_mode="c"))
        self._size = self._rows.shape[0]
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
) -> dict[str, torch.Tensor]:
    """Per-sample statistics of the whole training set, identical on every process.

    Args:
        model: the (quantized) student.
        dataloader: the un-augmented view, prepared by ``accelerator`` (sharded), yielding dicts
            with ``pixel_values``, ``labels`` and :data:`INDEX_KEY`.
        accelerator: gives the device, the mixed-precision autocast and the gather.
        stats: statistic names (``evs``, ``ds``, ``entropy``, ``margin``, ``least_confidence``).
        num_samples: N; every index in ``[0, N)`` must be scored by some process.
        teacher: FP model for ``ds``; with ``teacher_cache`` it runs only for rows not cached yet.
        teacher_cache: see :class:`TeacherCache`; finalised at the end of this pass.
        forward_fn: ``(model, batch) -> logits``.

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
    try:
        for m, _ in modes:
            m.eval()
        bar = tqdm(dataloader, desc=desc, disable=not accelerator.is_local_main_process, leave=False)
        with torch.inference_mode():
            for batch in bar:
                labels, index = batch["labels"].to(device), batch[INDEX_KEY].to(device)
                local["labels"].append(labels.long())
                local[INDEX_KEY].append(index.long())
                if not stats:  # labels only (random selectors): no forward pass
                    continue
                with accelerator.autocast():
                    logits = forward_fn(student, batch)
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
                for name, value in batch_statistics(stats, logits, labels, p_t).items():
                    local[name].append(value.float())
    finally:
        for m, training in modes:
            m.train(training)
    if teacher_cache is not None and needs_teacher:
        teacher_cache.finalize()
    logger.debug("scoring pass: %d teacher forwards on process %d", teacher_calls, accelerator.process_index)
    return _gather(local, num_samples, accelerator)


def _gather(local: dict[str, list[torch.Tensor]], num_samples: int, accelerator: Accelerator) -> dict:
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
    if not seen.all():
        missing = (~seen).nonzero().flatten()
        raise RuntimeError(
            f"scoring pass: {missing.numel()} of {num_samples} samples were never scored (first index "
            f"{int(missing[0])}); the score dataloader must cover the whole training set"
        )
    out = {}
    for k, v in cat.items():
        full = torch.zeros(num_samples, dtype=v.dtype)
        full[index] = v.cpu()[keep]
        out[k] = full
    return out
