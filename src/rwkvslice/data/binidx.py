"""binidx: the Megatron "MMIDIDX" memory-mapped token format that RWKV-LM trains from (PREFIX.bin + PREFIX.idx).

PREFIX.idx, all little-endian:
    9 bytes   magic b"MMIDIDX\\x00\\x00"
    u64       version, 1
    u8        dtype code of the tokens in .bin (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16;
              6 and 7 are floating point and refused here)
    u64       n_seq, the number of sequences
    u64       n_doc, the length of the document index (n_seq + 1 when each sequence is one document)
    i32[n_seq]  sizes, tokens per sequence
    i64[n_seq]  pointers, byte offset of each sequence in .bin
    i64[n_doc]  doc_idx, sequence index where each document starts (last entry = n_seq)
PREFIX.bin: the tokens of all sequences back to back, in the dtype above.

RWKV-LM reads .bin as one flat token stream (each document ends with token 0), and so do we. We write one
sequence per document (its tokens then eod) in uint16 when the vocabulary fits, like RWKV's
json2binidx tool. A small PREFIX.json next to them records the tokenizer so a dataset cannot be read
with the wrong one; files without it (made by other tools) are accepted.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from rwkvslice.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n_seq, n_doc


def prefix_of(path) -> Path | None:
    """The binidx prefix `path` names (PREFIX, PREFIX.bin or PREFIX.idx), or None if it names none."""
    path = Path(path)
    candidates = [path.with_suffix("")] if path.suffix in (".bin", ".idx") else []
    candidates.append(path)
    for prefix in candidates:
        if _with(prefix, ".bin").exists() or _with(prefix, ".idx").exists():
            return prefix
    return None


def _with(prefix: Path, suffix: str) -> Path:
    return prefix.with_name(prefix.name + suffix)


class BinIdx:
    """Read-only view of a binidx pair: `.tokens` (flat memmap), `.sizes`, `.doc_idx`, `.meta`.
    Pickles by path (DataLoader workers reopen the memmap instead of copying it)."""

    def __init__(self, prefix):
        self.prefix = Path(prefix)
        self._open()

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self._open()

    def _open(self):
        idx_path, bin_path = _with(self.prefix, ".idx"), _with(self.prefix, ".bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise DataError(f"{p}: no such file (a binidx dataset needs PREFIX.bin and PREFIX.idx)")
        raw = idx_path.read_bytes()
        if len(raw) < _HEADER.size:
            raise DataError(f"{idx_path}: truncated index ({len(raw)} bytes)")
        magic, version, code, n_seq, n_doc = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise DataError(f"{idx_path}: not a binidx index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise DataError(f"{idx_path}: unsupported binidx version {version}, expected {VERSION}")
        if code not in DTYPES:
            raise DataError(f"{idx_path}: token dtype code {code} is not an integer type "
                            f"(supported: {sorted(DTYPES)})")
        self.dtype = np.dtype(DTYPES[code])
        expected = _HEADER.size + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if len(raw) != expected:
            raise DataError(f"{idx_path}: index is {len(raw)} bytes, its header implies {expected}")
        off = _HEADER.size
        self.sizes = np.frombuffer(raw, np.int32, n_seq, off)
        self.pointers = np.frombuffer(raw, np.int64, n_seq, off + 4 * n_seq)
        self.doc_idx = np.frombuffer(raw, np.int64, n_doc, off + 12 * n_seq)
        if (self.sizes < 0).any():
            raise DataError(f"{idx_path}: negative sequence size")
        starts = np.concatenate([[0], np.cumsum(self.sizes[:-1], dtype=np.int64)]) * self.dtype.itemsize
        if not np.array_equal(starts, self.pointers):
            # RWKV-LM reads .bin as one flat stream, so the sequences must be contiguous.
            raise DataError(f"{idx_path}: sequences are not stored back to back in the .bin")
        n_tokens = int(self.sizes.sum(dtype=np.int64))
        if bin_path.stat().st_size != n_tokens * self.dtype.itemsize:
            raise DataError(f"{bin_path}: {bin_path.stat().st_size} bytes, the index implies "
                            f"{n_tokens * self.dtype.itemsize}")
        self.tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r") if n_tokens
                       else np.zeros(0, self.dtype))
        meta_path = _with(self.prefix, ".json")
        self.meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}

    def __len__(self) -> int:
        return len(self.sizes)

    def sequence(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start : start + int(self.sizes[i])])

    def check_vocab(self, vocab_size: int, chunk: int = 1 << 24) -> None:
        """DataError naming the first token position whose id is outside [0, vocab_size)."""
        bin_path = _with(self.prefix, ".bin")
        for lo in range(0, len(self.tokens), chunk):
            part = np.asarray(self.tokens[lo : lo + chunk])
            bad = (part >= vocab_size) | (part < 0)
            if bad.any():
                pos = int(np.argmax(bad))
                raise DataError(f"{bin_path}: token {lo + pos} has id {int(part[pos])}, outside the "
                                f"vocabulary [0, {vocab_size})")


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def write_binidx(prefix, sequences, vocab_size: int, meta: dict | None = None) -> dict:
    """Write the sequences (iterables of token ids) as PREFIX.bin/.idx(/.json), one document each.

    Every file goes to a temporary name in the same folder first and is renamed at the end, so a failure
    (or a kill) leaves either the old files or the complete new ones, never a half-written pair.
    Returns {"sequences": n, "tokens": n}.
    """
    prefix = Path(prefix)
    folder = prefix.parent
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder for --out {prefix}")
    dtype = dtype_for(vocab_size)
    code = next(c for c, t in DTYPES.items() if np.dtype(t) == dtype)
    temps: list[str] = []
    umask = os.umask(0)
    os.umask(umask)

    def temp(suffix):
        fd, name = tempfile.mkstemp(prefix=f".{prefix.name}{suffix}.", suffix=".tmp", dir=folder)
        temps.append(name)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; the result should look like any new file
        return os.fdopen(fd, "wb")

    try:
        sizes = []
        with temp(".bin") as f:
            for seq in sequences:
                arr = np.asarray(seq, dtype=np.int64)
                if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                    raise DataError(f"{prefix}.bin: token id outside [0, {vocab_size})")
                f.write(arr.astype(dtype).tobytes())
                sizes.append(arr.size)
            f.flush()
            os.fsync(f.fileno())
        sizes_arr = np.asarray(sizes, dtype=np.int32)
        pointers = np.concatenate([[0], np.cumsum(sizes_arr[:-1], dtype=np.int64)]) * dtype.itemsize
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        with temp(".idx") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, code, len(sizes), len(doc_idx)))
            f.write(sizes_arr.tobytes())
            f.write(pointers.astype(np.int64).tobytes())
            f.write(doc_idx.tobytes())
            f.flush()
            os.fsync(f.fileno())
        with temp(".json") as f:
            f.write(json.dumps({"format": "rwkvslice-binidx", "vocab_size": vocab_size, **(meta or {})},
                               indent=1).encode())
        # Each file appears complete or not at all; .idx goes last, and a reader checks that .bin's size
        # matches the index, so a kill between two renames is detected rather than misread.
        os.replace(temps[0], _with(prefix, ".bin"))
        os.replace(temps[2], _with(prefix, ".json"))
        os.replace(temps[1], _with(prefix, ".idx"))
        temps.clear()
    finally:
        for name in temps:
            try:
                os.unlink(name)
            except OSError:
                pass
    return {"sequences": len(sizes), "tokens": int(sizes_arr.sum(dtype=np.int64))}
