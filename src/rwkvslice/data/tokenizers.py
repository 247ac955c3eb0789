"""Tokenizers: a built-in byte tokenizer and the RWKV World tokenizer (greedy longest match over UTF-8).

Both share one id convention: id 0 (`eod_id`) is the document separator and the end-of-response token.
It has no text: `decode` drops it. Everything else maps to bytes.

Decoding never loses bytes silently:
- `decode_bytes(ids) -> bytes` gives the exact bytes (for streaming, feed them to an incremental
  UTF-8 decoder);
- `decode(ids, errors="replace") -> str` decodes those bytes with Python's codec, so each invalid
  UTF-8 sequence becomes U+FFFD and the valid text around it survives (the official `rwkv` package
  instead returns a single "\\ufffd" for the whole string). `errors="strict"` raises UnicodeDecodeError.
- An id inside [0, vocab_size) that stands for no bytes (the padding ids of the model vocab) decodes to
  U+FFFD; an id outside [0, vocab_size) raises ValueError (a bug in the caller, not user data).
"""

from __future__ import annotations

import ast
import functools
import hashlib
from importlib import resources

import numpy as np

from rwkvslice.errors import ConfigError

EOD_ID = 0
_REPLACEMENT = "\ufffd".encode()
WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
WORLD_VOCAB_SHA256 = "e6dee3d4e31b4d5c40ac99508ac6c701ceef4bed681bf2167ce9a908552bca89"


class Tokenizer:
    """Common decoding; subclasses fill `_id_to_bytes` (index = id, None = no bytes) and `encode_bytes`."""

    name: str
    vocab_size: int
    eod_id = EOD_ID
    _id_to_bytes: list[bytes | None]

    def encode_bytes(self, data: bytes) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (never contains eod_id)."""
        return self.encode_bytes(text.encode("utf-8"))

    def decode_bytes(self, ids) -> bytes:
        if hasattr(ids, "tolist"):  # a numpy array or a tensor
            ids = ids.tolist()
        ids = [int(i) for i in ids] if not isinstance(ids, list) else ids
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the {self.name} vocabulary [0, {self.vocab_size})")
        table = self._decode_table()
        return b"".join([table[i] for i in ids])

    def _decode_table(self) -> list[bytes]:
        """bytes of every id in [0, vocab_size): eod -> b"", ids without bytes -> U+FFFD."""
        table = getattr(self, "_table", None)
        if table is None:
            table = [piece if piece is not None else (b"" if i == EOD_ID else _REPLACEMENT)
                     for i, piece in enumerate(self._id_to_bytes)]
            table += [_REPLACEMENT] * (self.vocab_size - len(table))
            self._table = table
        return table

    def decode(self, ids, errors: str = "replace") -> str:
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} vocab_size={self.vocab_size}>"


class ByteTokenizer(Tokenizer):
    """Byte b -> id b + 1; id 0 is eod. vocab_size 320: 257 ids rounded up to a multiple of 64 so the
    head's matrix has friendly shapes (ids 257..319 are never produced)."""

    name = "byte"
    vocab_size = 320

    def __init__(self):
        self._id_to_bytes = [None] + [bytes([b]) for b in range(256)]

    def encode_bytes(self, data: bytes) -> list[int]:
        return (np.frombuffer(data, dtype=np.uint8).astype(np.int64) + 1).tolist()


class _TrieNode:
    __slots__ = ("children", "token_id")

    def __init__(self):
        self.children: dict[int, _TrieNode] = {}
        self.token_id = -1


class WorldTokenizer(Tokenizer):
    """RWKV World tokenizer (rwkv_vocab_v20230424): ids 1..65529 from the vocab file, greedy longest
    match over the UTF-8 bytes, model vocab 65536. Every single byte is a token, so encoding never fails.

    The vocab file is read from the installed `rwkv` package (an optional extra). Its lines are
    `<id> <python str or bytes literal> <byte length>`; we parse the literal with ast.literal_eval
    (never eval) and check the length.
    """

    name = "world"
    vocab_size = 65536

    def __init__(self, vocab_text: str | None = None):
        if vocab_text is None:
            vocab_text = _read_world_vocab()
        self._id_to_bytes = [None] * self.vocab_size
        self._root = _TrieNode()
        # split on "\n" only (str.splitlines would also split on characters such as U+2028)
        for line_no, line in enumerate(vocab_text.split("\n"), 1):
            line = line.rstrip("\r")
            if not line:
                continue
            token_id, piece = _parse_vocab_line(line, line_no)
            self._id_to_bytes[token_id] = piece
            node = self._root
            for byte in piece:
                child = node.children.get(byte)
                if child is None:
                    child = node.children[byte] = _TrieNode()
                node = child
            node.token_id = token_id

    def encode_bytes(self, data: bytes) -> list[int]:
        root_children = self._root.children
        out: list[int] = []
        append = out.append
        pos, n = 0, len(data)
        while pos < n:
            # Walk the trie as far as the bytes allow, remembering the last node that ends a token.
            children = root_children
            best_id, best_end = -1, pos
            j = pos
            while j < n:
                node = children.get(data[j])
                if node is None:
                    break
                j += 1
                if node.token_id >= 0:
                    best_id, best_end = node.token_id, j
                children = node.children
            append(best_id)
            pos = best_end
        return out


def _parse_vocab_line(line: str, line_no: int) -> tuple[int, bytes]:
    first, last = line.index(" "), line.rindex(" ")
    token_id = int(line[:first])
    literal = ast.literal_eval(line[first + 1 : last])
    piece = literal.encode("utf-8") if isinstance(literal, str) else literal
    if not isinstance(piece, bytes) or len(piece) != int(line[last + 1 :]):
        raise ConfigError(f"{WORLD_VOCAB_FILE}:{line_no}: malformed vocab line")
    return token_id, piece


def _read_world_vocab() -> str:
    try:
        data = resources.files("rwkv").joinpath(WORLD_VOCAB_FILE).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise ConfigError(
            "tokenizer 'world' needs the `rwkv` package (it ships rwkv_vocab_v20230424.txt): "
            "pip install 'rwkvslice[world]'"
        ) from exc
    data = data.replace(b"\r\n", b"\n")  # the wheel ships CRLF line ends; the published hash is of LF
    digest = hashlib.sha256(data).hexdigest()
    if digest != WORLD_VOCAB_SHA256:
        raise ConfigError(f"{WORLD_VOCAB_FILE} in the rwkv package has sha256 {digest}, expected "
                          f"{WORLD_VOCAB_SHA256}")
    return data.decode("utf-8")


@functools.cache
def _cached(name: str) -> Tokenizer:
    return ByteTokenizer() if name == "byte" else WorldTokenizer()


TOKENIZERS = ("byte", "world")


def get_tokenizer(name) -> Tokenizer:
    """`get_tokenizer("byte")` or `get_tokenizer("world")`; a Tokenizer passes through unchanged.
    Instances are cached (the World vocab takes about a second to load) and are read-only."""
    if isinstance(name, Tokenizer):
        return name
    if name not in TOKENIZERS:
        raise ConfigError(f"--tokenizer: unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZERS)}")
    return _cached(name)
