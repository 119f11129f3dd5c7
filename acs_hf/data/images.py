"""Images of a ``datasets`` split: decoded on access (:class:`ImageView`), and checked before training.

A file that does not decode names its split, row and path. :func:`check_images` finds such files
before any training: a header-only pass over image folders, or with ``skip_bad_images`` a full
decode that drops them.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset

from ..utils.upstream import dataset_index_map
from .batch import INDEX_KEY

__all__ = ["ImageView", "decode_image", "column_values", "check_images"]

logger = logging.getLogger(__name__)


def column_values(ds: Dataset, column: str) -> np.ndarray:
    """One column as a numpy array, through arrow: ``np.asarray(ds[column])`` goes through a
    Python object per row (about 15 s per million rows, 50 s after a shuffle or filter)."""
    values = ds.data.column(column)
    index_map = dataset_index_map(ds)
    if index_map is not None:  # a shuffled, selected or filtered view: rows through its index map
        values = pc.take(values, index_map.column(0))
    return values.to_numpy()


def _open(value: Any):
    """The PIL image of a row's value (a PIL image, or ``{"bytes", "path"}`` undecoded), not yet decoded."""
    from PIL import Image as PILImage

    if isinstance(value, PILImage.Image):
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:
        return PILImage.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return PILImage.open(value["path"])
    raise TypeError(f"unsupported image value {type(value).__name__}")


def decode_image(value: Any, split: str, row: int):
    """The RGB PIL image of a row's value (PIL image or undecoded ``{"bytes", "path"}``); a file
    that does not decode raises ``ValueError`` naming ``split``, ``row`` and the path."""
    try:
        img = _open(value)
        img.load()
        return img.convert("RGB")  # grayscale, palette and RGBA all become RGB
    except Exception as e:  # PIL raises many types for broken files
        path = value.get("path") if isinstance(value, dict) else getattr(value, "filename", None)
        where = f"{split} row {row}" + (f" ({path})" if path else "")
        raise ValueError(f"cannot decode the image of {where}: {e}; pass --skip_bad_images to drop such rows") from e


class ImageView(torch.utils.data.Dataset):
    """Rows of a ``datasets.Dataset`` split, decoded and transformed on access.

    Yields ``{"pixel_values", "labels", "index"}`` with ``index`` the row number, which is the key
    of selection and of the teacher cache. ``__getitems__`` reads a whole batch of rows from arrow
    at once (the DataLoader calls it). :attr:`labels` gives every label without decoding an image.
    """

    def __init__(self, dataset: Dataset, transform: Any, image_column: str, label_column: str, split: str) -> None:
        self.dataset = dataset.select_columns([image_column, label_column])
        self.transform = transform
        self.image_column, self.label_column, self.split = image_column, label_column, split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, rows: list[int]) -> list[dict[str, Any]]:
        rows = [int(r) for r in rows]
        batch = self.dataset[rows]
        return [
            {"pixel_values": self.transform(decode_image(value, self.split, row)), "labels": label, INDEX_KEY: row}
            for value, label, row in zip(batch[self.image_column], batch[self.label_column], rows)
        ]

    def __getitem__(self, row: int) -> dict[str, Any]:
        return self.__getitems__([row])[0]

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """Every row's label (int64), read from the label column alone."""
        return column_values(self.dataset, self.label_column).astype(np.int64)


def _decodable(value: Any) -> bool:
    try:
        decode_image(value, "", 0)
        return True
    except ValueError:
        return False


def _unopenable(value: Any) -> bool:
    """Whether PIL fails to recognise the image's header. Reads the first bytes of the file and
    decodes nothing: catches empty, text and other non-image files, not truncated images."""
    try:
        _open(value).close()
        return False
    except Exception:  # PIL raises many types for broken files
        return True


def _filter_workers(num_proc: int | None, num_rows: int) -> int | None:
    """Processes for the bad-image check: as given, else every core for a large split (a process
    pool costs about a second to start, more than checking a small split takes)."""
    if num_proc is not None:
        return num_proc if num_proc > 1 else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if cores > 1 and num_rows >= 20_000 else None


def _stored_as_files(d: Dataset, image_column: str) -> bool:
    """Whether the (undecoded) images are files on disk, as in an image folder."""
    value = d[0][image_column] if len(d) else None
    return isinstance(value, dict) and value.get("bytes") is None and bool(value.get("path"))


def _check_files(d: Dataset, image_column: str, what: str, num_proc: int | None) -> None:
    """Fail, before any training, on the files of an image folder that PIL cannot open (empty, text,
    another format), listing them. Reads each file's header and decodes nothing, so truncated
    images pass (``--skip_bad_images`` decodes every image). Cost, 50,000 32x32 JPEGs in the page
    cache, 2 busy cores: 1.5-1.7 s in one process, 1.8-2.4 s in two (indexing the folder itself
    took 5-12 s; a full decode 7 s); ``datasets`` caches the result for other ranks and resumes."""
    if not _stored_as_files(d, image_column):
        return
    workers = _filter_workers(num_proc, len(d))
    bad = d.filter(_unopenable, input_columns=image_column, num_proc=workers, desc=f"Opening {what} files")
    if len(bad):
        paths = ", ".join(v["path"] or "(in-memory bytes)" for v in bad.select(range(min(len(bad), 10)))[image_column])
        raise ValueError(
            f"{len(bad)} {what} files are not images PIL can open: {paths}{' ...' if len(bad) > 10 else ''}; "
            "delete or replace them, or pass --skip_bad_images to drop them (it decodes every image once)"
        )


def check_images(
    train: Dataset, val: Dataset, image_column: str, skip_bad_images: bool, num_proc: int | None
) -> tuple[Dataset, Dataset, int]:
    """``(train, val, skipped)``: without ``skip_bad_images``, :func:`_check_files` on image
    folders; with it, every image decoded once and the rows that fail dropped."""
    if not skip_bad_images:
        for d, what in ((train, "train"), (val, "eval")):
            _check_files(d, image_column, what, num_proc)
        return train, val, 0
    before = len(train) + len(val)
    train, val = (
        d.filter(
            _decodable,
            input_columns=image_column,  # read no other column
            num_proc=_filter_workers(num_proc, len(d)),
            desc=f"Checking {what} images",
        )
        for d, what in ((train, "train"), (val, "eval"))
    )
    skipped = before - len(train) - len(val)
    if skipped:
        logger.warning("Skipped %d images that cannot be decoded", skipped)
    return train, val, skipped
