"""Atomic file writes: write to a temporary name in the target directory, fsync, then rename.

A crash or Ctrl-C mid-write leaves the previous file (or none), never a half-written one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_save_npy", "atomic_save_npz"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _atomic_numpy(path: str | os.PathLike, save: Callable[[Any], None]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy would add ".npy" / ".npz" to a bare name
            save(f)

    atomic_write(path, write)


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` streamed to the temporary file: a 2.5 GB teacher cache shard is never held twice."""
    _atomic_numpy(path, lambda f: np.save(f, array))


def atomic_save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` of named arrays, written atomically."""
    _atomic_numpy(path, lambda f: np.savez(f, **arrays))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """JSON (non-serialisable values as ``str``), written atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=indent, default=str).encode())
