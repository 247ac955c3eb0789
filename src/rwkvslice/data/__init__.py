"""Data pipeline: tokenizers, .txt/.jsonl/binidx readers, ctx_len windows with loss masks, resumable
batching, and the synthetic demo task.

    tok = get_tokenizer("byte")                      # or "world" (needs: pip install 'rwkvslice[world]')
    ds = build_dataset("train.jsonl", tok, ctx_len=256, pack=True)
    loader = ResumableLoader(ds, batch_size=8, seed=0)
    for idx, targets, resets in loader: ...          # (8, 256) int64 each, targets -100 = no loss;
                                                     # resets (bool, packed data only): sample starts

Module docstrings hold the exact policies: records.py (file formats, chat template), windows.py
(windows, truncation, padding, packing), loader.py (order, sharding, resume), binidx.py (file layout),
tokenizers.py (ids and decoding), synthetic.py (the demo task).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rwkvslice.data import synthetic
from rwkvslice.data.binidx import BinIdx, write_binidx
from rwkvslice.data.prepare import prepare
from rwkvslice.data.records import encode_chat_prompt, encode_record
from rwkvslice.data.synthetic import DemoTask
from rwkvslice.data.tokenizers import EOD_ID, ByteTokenizer, Tokenizer, WorldTokenizer, get_tokenizer

if TYPE_CHECKING:
    from rwkvslice.data.loader import ResumableLoader, collate
    from rwkvslice.data.windows import IGNORE_INDEX, PAD_ID, WindowDataset, build_dataset

# The torch-backed parts (windows as tensors, the loader) load on first use, so tokenising and
# `rwkvslice data prepare` (numpy only) never pay for importing torch.
_LAZY = {
    "ResumableLoader": "loader",
    "collate": "loader",
    "IGNORE_INDEX": "windows",
    "PAD_ID": "windows",
    "WindowDataset": "windows",
    "build_dataset": "windows",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"rwkvslice.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "EOD_ID",
    "IGNORE_INDEX",
    "PAD_ID",
    "BinIdx",
    "ByteTokenizer",
    "DemoTask",
    "ResumableLoader",
    "Tokenizer",
    "WindowDataset",
    "WorldTokenizer",
    "build_dataset",
    "collate",
    "encode_chat_prompt",
    "encode_record",
    "get_tokenizer",
    "prepare",
    "synthetic",
    "write_binidx",
]
