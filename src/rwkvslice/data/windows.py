"""Fixed-length training windows: (idx, targets), each (ctx_len,) int64, from .txt, .jsonl or binidx;
packed .jsonl windows add resets, (ctx_len,) bool.

A window is a run of at most ctx_len + 1 tokens w; idx = w[:-1] and targets = w[1:], so targets[t] is the
token that follows idx[t] (the convention of `model.loss`). -100 marks a position without loss.

Streams (.txt and binidx): all documents back to back, each ending with eod (id 0), cut into windows
of ctx_len + 1 tokens that start every ctx_len tokens (consecutive windows share one token), so every
token after the first is a target exactly once. Loss everywhere: a document's last token learns to
predict eod and eod predicts the next document's first token, as in RWKV-LM pretraining. Nothing is
truncated; only the last window may be short.

Samples (.jsonl): one sample per record, masked as records.py says.
- Longer than ctx_len + 1 tokens: truncated to its first ctx_len + 1 tokens (what is cut is lost; a sample
  whose loss tokens all fall in the cut part has none left and is skipped). Counted in stats["truncated"]
  and stats["truncated_tokens"].
- No loss token (e.g. an empty response, no assistant turn, or truncated away): skipped, counted in
  stats["skipped_no_loss"] and logged. Only when no sample is left is it an error.
- pack=False: one sample per window. pack=True: consecutive samples share a window while they fit
  (next-fit, order kept); the target at each boundary is -100, so the last token of one sample never
  learns to predict the first token of the next. Packing is exact: each window also carries `resets`,
  True at every idx position where a sample starts (position 0 included, padding never), and the model
  resets its recurrent state there (both token shifts and the WKV state start afresh), so every packed
  sample gets exactly the loss and gradient it would get alone in its own window: packing changes the
  throughput, never the model. Unpacked windows have no resets and stay (idx, targets).

Short windows are right-padded: idx with PAD_ID (0, the eod id) and targets with -100. RWKV is causal,
so padding on the right cannot change any earlier position and its targets keep it out of the loss.

stats: format, ctx_len, pack, samples (documents or records read), truncated, truncated_tokens,
skipped_no_loss, windows, tokens (real, non-padding idx positions), kept_tokens (targets != -100),
padding (padded idx positions).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from rwkvslice.data.binidx import BinIdx, prefix_of
from rwkvslice.data.records import encode_record, jsonl_records, text_documents
from rwkvslice.data.tokenizers import get_tokenizer
from rwkvslice.errors import ConfigError, DataError

IGNORE_INDEX = -100
PAD_ID = 0
log = logging.getLogger("rwkvslice.data")


class WindowDataset(Dataset):
    """Windows over one flat token array. Window i is `tokens[start : start + length]` with
    (start, length) = (starts[i], lengths[i]), or for a stream (starts None) (i * ctx_len,
    min(ctx_len + 1, n - i * ctx_len)), computed so a huge corpus needs no per-window table.
    `loss` (bool per token, or None for "everywhere") says which tokens are trained targets."""

    def __init__(self, tokens, loss, starts, lengths, ctx_len: int, stats: dict, sample_starts=None):
        self._tokens = tokens  # an ndarray, or a BinIdx (pickles by path for DataLoader workers)
        self.loss = loss
        self.starts = None if starts is None else np.asarray(starts, dtype=np.int64)
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.ctx_len = ctx_len
        self.stats = stats
        # Token offsets where the samples start, sorted: given only for packed samples (then every item
        # carries its resets).
        self.sample_starts = None if sample_starts is None else np.asarray(sample_starts, dtype=np.int64)

    @property
    def tokens(self) -> np.ndarray:
        return self._tokens.tokens if isinstance(self._tokens, BinIdx) else self._tokens

    def __len__(self) -> int:
        return self.stats["windows"]

    def bounds(self, i: int) -> tuple[int, int]:
        """(start, length) of window i in `tokens`."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        i %= len(self)
        if self.starts is not None and self.lengths is not None:
            return int(self.starts[i]), int(self.lengths[i])
        start = i * self.ctx_len
        return start, min(self.ctx_len + 1, len(self.tokens) - start)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        start, length = self.bounds(i)
        window = np.asarray(self.tokens[start : start + length], dtype=np.int64)
        idx = np.full(self.ctx_len, PAD_ID, dtype=np.int64)
        targets = np.full(self.ctx_len, IGNORE_INDEX, dtype=np.int64)
        idx[: length - 1] = window[:-1]
        targets[: length - 1] = window[1:]
        if self.loss is not None:
            trained = self.loss[start + 1 : start + length]
            targets[: length - 1][~trained] = IGNORE_INDEX
        if self.sample_starts is None:
            return torch.from_numpy(idx), torch.from_numpy(targets)
        return torch.from_numpy(idx), torch.from_numpy(targets), torch.from_numpy(self._resets(start, length))

    def _resets(self, start: int, length: int) -> np.ndarray:
        """True at the idx positions (0 .. length - 2) of window (start, length) where a sample starts."""
        assert self.sample_starts is not None
        lo, hi = np.searchsorted(self.sample_starts, [start, start + length - 1])
        resets = np.zeros(self.ctx_len, dtype=bool)
        resets[self.sample_starts[lo:hi] - start] = True
        return resets

    def summary(self) -> str:
        s = self.stats
        trained = s["kept_tokens"] / max(1, s["windows"] * self.ctx_len)
        return (f"{s['windows']} windows of ctx_len {self.ctx_len} from {s['samples']} samples "
                f"({s['format']}); {s['truncated']} truncated, {s['skipped_no_loss']} skipped without loss "
                f"tokens; {s['kept_tokens']} trained targets ({trained:.1%} of positions)")


def check_ctx_len(ctx_len) -> int:
    if isinstance(ctx_len, bool) or not isinstance(ctx_len, int | np.integer) or ctx_len < 2:
        raise ConfigError(f"ctx_len (--ctx-len) must be an integer >= 2, got {ctx_len!r}")
    return int(ctx_len)


def build_dataset(path, tokenizer, ctx_len: int, *, pack: bool = False) -> WindowDataset:
    """Windows of `path` (.txt, .jsonl, or a binidx prefix) for `tokenizer` (a Tokenizer or its name).
    `pack` applies to .jsonl samples; streams are always packed. See the module docstring."""
    ctx_len = check_ctx_len(ctx_len)
    tokenizer = get_tokenizer(tokenizer)
    path = Path(path)
    if path.suffix == ".txt":
        return _stream_dataset(path, _encode_text_file(path, tokenizer), "txt", ctx_len)
    if path.suffix == ".jsonl":
        return _sample_dataset(path, tokenizer, ctx_len, pack)
    prefix = prefix_of(path)
    if prefix is not None:
        return _binidx_dataset(prefix, tokenizer, ctx_len)
    if not path.exists():
        raise DataError(f"{path}: no such file (expected a .txt or .jsonl file, or a binidx prefix "
                        f"with {path}.bin and {path}.idx)")
    raise DataError(f"{path}: unsupported data format {path.suffix!r} (use .txt, .jsonl or binidx)")


def _encode_text_file(path: Path, tokenizer) -> tuple[np.ndarray, int]:
    parts, n_docs = [], 0
    for _, doc in text_documents(path):
        parts.append(np.asarray(tokenizer.encode(doc) + [tokenizer.eod_id], dtype=np.int32))
        n_docs += 1
    return np.concatenate(parts), n_docs


def _binidx_dataset(prefix: Path, tokenizer, ctx_len: int) -> WindowDataset:
    data = BinIdx(prefix)
    made_with = data.meta.get("tokenizer")
    if made_with is not None and made_with != tokenizer.name:
        raise DataError(f"{prefix}.json: this binidx was prepared with tokenizer {made_with!r}, "
                        f"not {tokenizer.name!r}")
    if len(data.tokens) == 0:
        raise DataError(f"{prefix}.bin: empty file")
    data.check_vocab(tokenizer.vocab_size)
    return _stream_dataset(prefix, (data, len(data)), "binidx", ctx_len)


def _stream_dataset(path: Path, encoded, fmt: str, ctx_len: int) -> WindowDataset:
    source, n_docs = encoded
    n = len(source.tokens) if isinstance(source, BinIdx) else len(source)
    if n < 2:
        raise DataError(f"{path}: only {n} token, nothing to predict")
    n_windows = -(-(n - 1) // ctx_len)  # every token but the first is a target exactly once
    stats = _stats(fmt, ctx_len, True, n_docs, n_windows, n - 1, n - 1)
    return WindowDataset(source, None, None, None, ctx_len, stats)


def _sample_dataset(path: Path, tokenizer, ctx_len: int, pack: bool) -> WindowDataset:
    limit = ctx_len + 1
    token_parts, loss_parts = [], []
    n_samples = truncated = truncated_tokens = skipped = 0
    for line_no, record in jsonl_records(path):
        ids, loss = encode_record(record, tokenizer, f"{path}:{line_no}")
        n_samples += 1
        if len(ids) > limit:
            truncated += 1
            truncated_tokens += len(ids) - limit
            ids, loss = ids[:limit], loss[:limit]
        loss[0] = False  # nothing in the window predicts a sample's first token (also: packing boundary)
        if not any(loss):
            skipped += 1
            continue
        token_parts.append(np.asarray(ids, dtype=np.int32))
        loss_parts.append(np.asarray(loss, dtype=bool))
    if n_samples == 0:  # pragma: no cover - read_utf8 already refuses a file without a non-blank line
        raise DataError(f"{path}: empty file")
    if not token_parts:
        raise DataError(f"{path}: none of the {n_samples} samples has a loss token left "
                        f"(ctx_len {ctx_len}); nothing to train on")
    sizes = np.array([len(p) for p in token_parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes[:-1])])
    starts, lengths = _pack(offsets, sizes, limit) if pack else (offsets, sizes)
    starts, lengths = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    tokens, trained_mask = np.concatenate(token_parts), np.concatenate(loss_parts)
    trained = np.concatenate([[0], np.cumsum(trained_mask, dtype=np.int64)])
    kept = int((trained[starts + lengths] - trained[starts + 1]).sum())
    stats = _stats("jsonl", ctx_len, pack, n_samples, len(starts), int((lengths - 1).sum()), kept,
                   truncated=truncated, truncated_tokens=truncated_tokens, skipped_no_loss=skipped)
    dataset = WindowDataset(tokens, trained_mask, starts, lengths, ctx_len, stats,
                            sample_starts=offsets if pack else None)
    if truncated or skipped:
        log.warning("%s: %s", path, dataset.summary())
    return dataset


def _pack(offsets: np.ndarray, sizes: np.ndarray, limit: int) -> tuple[list[int], list[int]]:
    """Next-fit: add samples to the current window while the total stays within `limit` tokens."""
    starts: list[int] = []
    lengths: list[int] = []
    for offset, size in zip(offsets.tolist(), sizes.tolist(), strict=True):
        if lengths and lengths[-1] + size <= limit:
            lengths[-1] += size
        else:
            starts.append(offset)
            lengths.append(size)
    return starts, lengths


def _stats(fmt, ctx_len, pack, samples, windows, tokens, kept, truncated=0, truncated_tokens=0,
           skipped_no_loss=0) -> dict:
    return {"format": fmt, "ctx_len": ctx_len, "pack": pack, "samples": samples, "truncated": truncated,
            "truncated_tokens": truncated_tokens, "skipped_no_loss": skipped_no_loss, "windows": windows,
            "tokens": tokens, "kept_tokens": kept, "padding": windows * ctx_len - tokens}
