"""Small file helpers for adapters and states: atomic writes, a file's sha256."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def atomic_save(path: Path, write) -> None:
    """`write(tmp)` into a temporary file next to `path`, fsync, rename over `path` (all or nothing)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
