"""`rwkvslice data prepare`: tokenise a .txt or .jsonl file into a binidx pair (one document per sequence,
each ending with eod), for fast memory-mapped training on large corpora.

binidx stores no loss mask, so only loss-everywhere data can be prepared: .txt documents and .jsonl
{"text": ...} records. prompt/response and messages records are refused with FILE:LINE (train on the
.jsonl directly; its masks are built on the fly).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from rwkvslice.data.binidx import write_binidx
from rwkvslice.data.records import encode_record, jsonl_records, record_kind, text_documents
from rwkvslice.data.tokenizers import get_tokenizer
from rwkvslice.errors import DataError


def documents(path: Path, tokenizer) -> Iterator[list[int]]:
    """Token ids (ending with eod) of each document of a .txt or .jsonl file, in order."""
    if path.suffix == ".txt":
        for _, doc in text_documents(path):
            yield tokenizer.encode(doc) + [tokenizer.eod_id]
    elif path.suffix == ".jsonl":
        for line_no, record in jsonl_records(path):
            where = f"{path}:{line_no}"
            if record_kind(record, where) != "text":
                raise DataError(f"{where}: binidx has no loss mask, so only \"text\" records can be "
                                f"prepared; train on the .jsonl directly")
            yield encode_record(record, tokenizer, where)[0]
    elif not path.exists():
        raise DataError(f"{path}: no such file")
    else:
        raise DataError(f"{path}: data prepare reads .txt or .jsonl, got {path.suffix or 'no suffix'!r}")


def prepare(input_path, out_prefix, tokenizer="byte") -> dict:
    """Write OUT.bin, OUT.idx and OUT.json from INPUT; returns {"sequences", "tokens", "tokenizer"}.
    All or nothing: the files are written under temporary names and renamed at the end."""
    tokenizer = get_tokenizer(tokenizer)
    path, out = Path(input_path), Path(out_prefix)
    if out.suffix in (".bin", ".idx"):
        out = out.with_suffix("")
    counts = write_binidx(out, documents(path, tokenizer), tokenizer.vocab_size,
                          meta={"tokenizer": tokenizer.name, "source": path.name})
    return {**counts, "tokenizer": tokenizer.name, "prefix": str(out)}
