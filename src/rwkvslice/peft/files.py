"""Small file helpers for adapters and states: atomic writes, a file's sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path


def atomic_save(path: Path, write) -> None:
    """`write(tmp)` into a temporary file next to `path`, fsync, rename over `path` (all or nothing):
    the checkpoint writer's own helper (model/official.py)."""
    from rwkvslice.model.official import _atomic_write

    _atomic_write(Path(path), write)


def sha256_file(path: str | Path) -> str:
    """sha256 of a file; of a model directory (an HF or rwkvslice --init-from), over every file's relative
    name and contents in name order, so any change to the weights or config changes it."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()
