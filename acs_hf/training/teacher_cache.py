"""Teacher probabilities kept across selection rounds, in memory or memory-mapped from disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..utils.io import atomic_save_npy, atomic_write_json

__all__ = ["TeacherCache"]

logger = logging.getLogger(__name__)


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
