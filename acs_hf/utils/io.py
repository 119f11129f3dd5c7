"""Atomic file writes: write to a temporary name in the target directory, fsync, then rename.

A crash or Ctrl-C mid-write leaves the previous file (or none), never a half-written one.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_save_npy",
    "atomic_save_npz",
    "save_safetensors",
]


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


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file``, then its metadata sorted by key: safetensors writes the metadata
    in hash-map order, which changes from save to save, so the same tensors and metadata gave
    different bytes. The header keeps its length (the same text reordered; JSON as safetensors
    writes it, padded with spaces as safetensors pads it), so no tensor moves."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        if header.get("__metadata__"):
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
            text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
            if len(text) <= length:  # always, unless safetensors changes its JSON; else keep its own order
                f.seek(8)
                f.write(text.ljust(length))
