"""The built-in demo task: key-value retrieval. Long prompts, short answers, so slicing matters.

A prompt lists `n_pairs` pairs, each a key letter directly followed by its value, then "?" and one of the
keys; the response is that key's value:

    prompt   "g3 b7 m0 k4 a9 c1 f2 h6 ?m"      response "0"

Keys are distinct letters from `keys`; values are `value_len` characters from `values`. With the byte
tokenizer the default prompt is ~30 tokens and the trained part (the value and eod) 2 tokens, so about
6% of positions carry loss. The key sits right before its value, so a single layer's token shift and
WKV state can store key -> value and look the query key up (RWKV-7's delta rule is an associative
memory); this keeps the task learnable by a tiny model in minutes. Knobs make it harder: more pairs,
longer values, more keys.

Splits are disjoint by construction: a prompt belongs to "heldout" iff a stable hash of it falls in
`heldout_fraction`, so no held-out prompt can ever be a training prompt. Everything is a pure function of
(seed, knobs, split, n).
"""

from __future__ import annotations

import json
import random
import re
import zlib
from pathlib import Path

from rwkvslice.errors import ConfigError

_SPLITS = ("train", "heldout")


class DemoTask:
    def __init__(self, seed: int = 0, *, n_pairs: int = 8, keys: str = "abcdefghijklmnop",
                 values: str = "0123456789", value_len: int = 1, heldout_fraction: float = 0.1):
        if len(set(keys)) != len(keys) or not keys.isalpha():
            raise ConfigError(f"keys must be distinct letters, got {keys!r}")
        if not 1 <= n_pairs <= len(keys):
            raise ConfigError(f"n_pairs must be in [1, {len(keys)}] (the number of keys), got {n_pairs}")
        if not values or any(c.isspace() for c in values) or value_len < 1:
            raise ConfigError("values must be non-space characters and value_len >= 1")
        if not 0 < heldout_fraction < 1:
            raise ConfigError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.seed, self.n_pairs, self.keys, self.values = seed, n_pairs, keys, values
        self.value_len, self.heldout_fraction = value_len, heldout_fraction

    @property
    def max_prompt_chars(self) -> int:
        """Every prompt has this length: n_pairs "kv" pairs, the spaces between them, then " ?k"."""
        return self.n_pairs * (1 + self.value_len) + (self.n_pairs - 1) + 3

    def max_tokens(self) -> int:
        """prompt + response + eod tokens with the byte tokenizer (ASCII keys and values): ctx_len =
        max_tokens() - 1 fits every sample without truncation."""
        return self.max_prompt_chars + self.value_len + 1

    def split_of(self, prompt: str) -> str:
        bucket = zlib.crc32(prompt.encode()) / 2**32
        return "heldout" if bucket < self.heldout_fraction else "train"

    def _example(self, rng: random.Random) -> dict:
        keys = rng.sample(self.keys, self.n_pairs)
        vals = ["".join(rng.choice(self.values) for _ in range(self.value_len)) for _ in keys]
        query = rng.randrange(self.n_pairs)
        pairs = " ".join(k + v for k, v in zip(keys, vals, strict=True))
        return {"prompt": f"{pairs} ?{keys[query]}", "response": vals[query]}

    def samples(self, n: int, split: str = "train") -> list[dict]:
        """`n` examples {"prompt", "response"} of `split`; the first k of samples(n) are samples(k)."""
        if split not in _SPLITS:
            raise ConfigError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
        rng = random.Random(f"rwkvslice-demo/{self.seed}/{split}")
        out: list[dict] = []
        while len(out) < n:
            example = self._example(rng)
            if self.split_of(example["prompt"]) == split:
                out.append(example)
        return out

    def write_jsonl(self, path, n: int, split: str = "train") -> Path:
        path = Path(path)
        path.write_text("".join(json.dumps(s) + "\n" for s in self.samples(n, split)))
        return path

    def answer(self, prompt: str) -> str:
        """The correct response to a prompt of this task's format."""
        body, _, query = prompt.rpartition(" ?")
        found = re.findall(rf"(?:^| ){re.escape(query)}(\S+)", body) if len(query) == 1 else []
        if len(found) != 1:
            raise ValueError(f"not a prompt of this task: {prompt!r}")
        return found[0]

    def score(self, prompt: str, generated: str) -> bool:
        """Exact match: the generated text (stopped at eod; surrounding whitespace ignored) is the value."""
        return generated.strip() == self.answer(prompt)
