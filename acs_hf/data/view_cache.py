"""A decoded cache of the scoring view: every scoring round after the first reads pixels, not JPEGs.

The scoring view is deterministic (eval transform, no augmentation), so the part of it that works
on the PIL image (decode, resize, crop) gives the same ``uint8`` array every round. The first round
writes each array into a memory-mapped file; later rounds read it back and run only the tensor part
(``ToTensor`` + ``Normalize``), which gives bit-identical pixels, hence identical scores and subsets.

Size: ``N x H x W x 3`` bytes at the score resolution. ImageNet-1k at 224x224: 1,281,167 x 150,528 B
= 193 GB in all, split across the processes (each caches the rows it scores; the files are sparse,
so disk is used only as rows are written). Each process keeps its rows in its own temporary folder,
removed by :meth:`ScoreViewCache.close` (ACSTrainer calls it when training ends) or at exit.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .batch import INDEX_KEY
from .images import ImageView, decode_image

__all__ = ["ScoreViewCache", "split_transform"]

logger = logging.getLogger(__name__)

_TO_TENSOR = ("ToTensor", "MaybeToTensor", "PILToTensor")


def split_transform(transform: Any) -> tuple[list[Any], list[Any]]:
    """``(PIL part, tensor part)`` of a torchvision/timm ``Compose``: the transforms before its
    ``ToTensor`` and those after it. Raises when there is no such split point."""
    steps = getattr(transform, "transforms", None)
    names = [type(t).__name__ for t in steps or []]
    cut = next((i for i, n in enumerate(names) if n in _TO_TENSOR), None)
    if cut is None or names[cut] == "PILToTensor":
        raise ValueError(
            f"the score view cache needs an eval transform that is a Compose with ToTensor (timm's); got "
            f"{type(transform).__name__} with steps {names or 'none'}"
        )
    return list(steps[:cut]), list(steps[cut + 1 :])


def _remove(directory: str, owner_pid: int) -> None:
    # A forked DataLoader worker inherits this finalizer; only the process that made the folder removes it.
    if os.getpid() == owner_pid:
        shutil.rmtree(directory, ignore_errors=True)


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """torchvision's ``to_tensor`` of a uint8 RGB image, op for op (so the floats are identical)."""
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().to(dtype=torch.get_default_dtype()).div(255)


class ScoreViewCache(Dataset):
    """``view`` (an :class:`~acs_hf.data.images.ImageView` under the eval transform) with its decoded,
    resized and cropped ``uint8`` pixels cached on disk after their first read.

    Safe with DataLoader workers: every process maps the same files; a row is written by the one
    worker that reads it first, and marked done only after its pixels are written.

    Args:
        view: the scoring view.
        directory: where this process's temporary cache folder is made (local disk).
        tag: part of the folder name (ACSTrainer passes the process index).
    """

    def __init__(self, view: ImageView, directory: str | Path, tag: str = "") -> None:
        if not isinstance(view, ImageView):
            raise ValueError(
                f"the score view cache needs a score_dataset from acs_hf.data (ImageView), got {type(view).__name__}"
            )
        self.view = view
        self.pil_steps, self.tensor_steps = split_transform(view.transform)
        self.labels = view.labels
        first = self._pixels(0)
        self.shape = first.shape
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix=f"acs_score_view_{tag}_", dir=directory))
        self._cleanup = weakref.finalize(self, _remove, str(self.directory), os.getpid())
        n = len(view)
        with open(self.directory / "pixels.u8", "wb") as f:
            f.truncate(n * first.nbytes)  # sparse: disk is used as rows are written
        with open(self.directory / "done.u8", "wb") as f:
            f.truncate(n)
        self._maps: tuple[np.memmap, np.memmap] | None = None
        logger.info(
            "Score view cache: %d rows of %s uint8 (%.1f GB when full) in %s", n, self.shape, self.nbytes / 1e9,
            self.directory,
        )  # fmt: skip

    @property
    def nbytes(self) -> int:
        return len(self.view) * int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.view)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = None  # each worker maps the files itself
        state["_cleanup"] = None  # only the creating process removes the folder
        return state

    def _open(self) -> tuple[np.memmap, np.memmap]:
        if self._maps is None:
            n = len(self.view)
            pixels = np.memmap(self.directory / "pixels.u8", dtype=np.uint8, mode="r+", shape=(n, *self.shape))
            done = np.memmap(self.directory / "done.u8", dtype=np.uint8, mode="r+", shape=(n,))
            self._maps = (pixels, done)
        return self._maps

    def _pixels(self, row: int, value: Any = None) -> np.ndarray:
        if value is None:
            value = self.view.dataset[row][self.view.image_column]
        img = decode_image(value, self.view.split, row)
        for step in self.pil_steps:
            img = step(img)
        return np.asarray(img, dtype=np.uint8)

    def __getitems__(self, rows: list[int]) -> list[dict[str, Any]]:
        rows = [int(r) for r in rows]
        pixels, done = self._open()
        missing = [r for r in rows if not done[r]]
        if missing:
            values = self.view.dataset[missing][self.view.image_column]
            for row, value in zip(missing, values):
                array = self._pixels(row, value)
                if array.shape != self.shape:
                    raise ValueError(
                        f"score view cache: row {row} gives {array.shape} pixels, row 0 gave {self.shape}; the eval "
                        "transform must produce one size (timm's resize + center crop does)"
                    )
                pixels[row] = array
                done[row] = 1  # after the pixels: a row marked done is complete
        out = []
        for row in rows:
            x = _to_tensor(np.array(pixels[row]))
            for step in self.tensor_steps:
                x = step(x)
            out.append({"pixel_values": x, "labels": int(self.labels[row]), INDEX_KEY: row})
        return out

    def __getitem__(self, row: int) -> dict[str, Any]:
        return self.__getitems__([row])[0]

    def close(self) -> None:
        """Remove the cache folder (idempotent)."""
        self._maps = None
        if self._cleanup is not None:
            self._cleanup()
