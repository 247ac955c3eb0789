"""Tokenizers: the byte tokenizer against hand-computed ids, the World tokenizer against the official
`rwkv` package's TRIE_TOKENIZER (identical ids), exact round trips, and the documented decoding of
invalid UTF-8, eod and ids outside the vocabulary."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rwkvslice.data import get_tokenizer
from rwkvslice.data.tokenizers import ByteTokenizer, WorldTokenizer
from rwkvslice.errors import ConfigError

TEXTS = [
    "",
    "Hello, world!",
    "a",
    "\x00\x01\x7f",
    "tab\tnew\nline\r\n  spaces   ",
    "中文字符和标点，。",
    "日本語のテキスト",
    "한국어",
    "emoji 😀🎉 and a family 👨‍👩‍👧 flag 🇫🇷",
    "Ünïcödé ß ø å",
    "def f(x):\n    return x ** 2  # comment\n",
    "x" * 300,
    " " * 200,
    "\n\n\n\n",
    "\U0010ffff\ue000",
]


@pytest.fixture(scope="module")
def byte():
    return get_tokenizer("byte")


@pytest.fixture(scope="module")
def world():
    pytest.importorskip("rwkv", reason="the World tokenizer's vocab ships in the optional `rwkv` package")
    return get_tokenizer("world")


@pytest.fixture(scope="module")
def official():
    tok_mod = pytest.importorskip("rwkv.rwkv_tokenizer", reason="the official `rwkv` package is not installed")
    import rwkv

    return tok_mod.TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))


# ----------------------------------------------------------------------------------------------------
# byte


def test_byte_ids_are_utf8_bytes_plus_one(byte):
    assert byte.encode("A") == [66]
    assert byte.encode("é") == [0xC3 + 1, 0xA9 + 1]
    assert byte.encode("中") == [0xE4 + 1, 0xB8 + 1, 0xAD + 1]
    assert byte.encode("😀") == [0xF0 + 1, 0x9F + 1, 0x98 + 1, 0x80 + 1]
    assert byte.encode("\x00") == [1]  # byte 0 is id 1: id 0 stays the document separator
    assert byte.encode("") == []


def test_byte_constants(byte):
    assert (byte.name, byte.eod_id, byte.vocab_size) == ("byte", 0, 320)
    assert byte.vocab_size % 64 == 0 and byte.vocab_size >= 257
    assert isinstance(byte.encode("x")[0], int)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(byte, text):
    ids = byte.encode(text)
    assert byte.decode(ids) == text
    assert byte.decode_bytes(ids) == text.encode("utf-8")
    assert all(1 <= i <= 256 for i in ids)


@given(st.text())
def test_byte_round_trip_any_text(text):
    tok = get_tokenizer("byte")
    assert tok.decode(tok.encode(text)) == text


def test_byte_invalid_utf8_is_replaced_per_sequence_and_exact_in_bytes(byte):
    ids = [ord("a") + 1, 0xFF + 1, ord("b") + 1]
    assert byte.decode(ids) == "a\ufffdb"  # the valid text around the bad byte survives
    assert byte.decode_bytes(ids) == b"a\xffb"
    partial = [b + 1 for b in "中".encode()[:2]]  # a truncated 3-byte sequence: one U+FFFD
    assert byte.decode([ord("x") + 1] + partial) == "x\ufffd"
    with pytest.raises(UnicodeDecodeError):
        byte.decode(ids, errors="strict")


def test_byte_eod_has_no_text_and_unused_ids_are_replacement(byte):
    assert byte.decode([66, 0, 67, 0]) == "AB"
    assert byte.decode_bytes([0]) == b""
    assert byte.decode([66, 300, 67]) == "A\ufffdB"  # 257..319 pad the vocab and stand for no bytes
    for bad in (320, -1, 10**6):
        with pytest.raises(ValueError, match="outside"):
            byte.decode([bad])


# ----------------------------------------------------------------------------------------------------
# world vs the official package


@pytest.mark.interop
@pytest.mark.parametrize("text", TEXTS)
def test_world_ids_equal_official(world, official, text):
    ids = world.encode(text)
    assert ids == official.encode(text)
    assert world.decode(ids) == text


@pytest.mark.interop
def test_world_ids_equal_official_on_long_mixed_text(world, official):
    import rwkv

    text = (Path(rwkv.__file__).parent / "model.py").read_text() + "".join(TEXTS) * 3
    ids = world.encode(text)
    assert ids == official.encode(text)
    assert world.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2  # it really merges bytes into multi-byte tokens


@pytest.mark.interop
@given(text=st.text(max_size=60))
def test_world_ids_equal_official_any_text(world, official, text):
    ids = world.encode(text)
    assert ids == official.encode(text)
    assert world.decode(ids) == text


def test_world_constants_and_vocab(world, official):
    assert (world.name, world.eod_id, world.vocab_size) == ("world", 0, 65536)
    # every id 1..65529 decodes to the official token's bytes; 0 and 65530.. stand for no text
    assert all(world.decode_bytes([i]) == official.idx2token[i] for i in range(1, 65530))
    assert world.decode_bytes([0]) == b""
    assert world.decode([65535]) == "\ufffd"
    with pytest.raises(ValueError, match="outside"):
        world.decode([65536])


def test_world_invalid_utf8(world, official):
    lead = official.token2idx[b"\xe4"]  # a lone UTF-8 lead byte is its own token
    a = world.encode("a")
    assert world.decode(a + [lead] + a) == "a\ufffda"  # official: the whole string becomes "\ufffd"
    assert official.decode(a + [lead] + a) == "\ufffd"
    assert world.decode_bytes(a + [lead]) == b"a\xe4"


def test_world_greedy_longest_match(world, official):
    # "\n\n" is one token in the vocab; greedy longest match must take it rather than two "\n"
    assert world.encode("\n\n") == [official.token2idx[b"\n\n"]]
    assert world.encode("\n") == [official.token2idx[b"\n"]]


# ----------------------------------------------------------------------------------------------------
# errors


def test_unknown_tokenizer_is_config_error():
    with pytest.raises(ConfigError, match="unknown tokenizer 'gpt2'") as err:
        get_tokenizer("gpt2")
    assert "\n" not in str(err.value)


def test_world_without_rwkv_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "rwkv", None)  # makes `import rwkv` fail
    with pytest.raises(ConfigError, match=r"pip install 'rwkvslice\[world\]'") as err:
        WorldTokenizer()
    assert "\n" not in str(err.value)


def test_get_tokenizer_passes_instances_through_and_caches():
    tok = ByteTokenizer()
    assert get_tokenizer(tok) is tok
    assert get_tokenizer("byte") is get_tokenizer("byte")


def test_decode_accepts_tensors_arrays_and_tuples(byte):
    import numpy as np
    import torch

    for ids in (torch.tensor([66, 0, 67]), np.array([66, 0, 67], dtype=np.int32), (66, 0, 67)):
        assert byte.decode(ids) == "AB"
    with pytest.raises(ValueError, match="token id -1 is outside"):
        byte.decode(torch.tensor([66, -1]))


def test_repr_names_the_tokenizer(byte):
    assert repr(byte) == "<ByteTokenizer name='byte' vocab_size=320>"


@pytest.mark.parametrize("line", ["1 'ab' 3", "2 b'\\x00' 2", "3 5 1"])
def test_malformed_vocab_line_names_the_line(line):
    with pytest.raises(ConfigError) as err:
        WorldTokenizer(vocab_text=f"1 'a' 1\n\n{line}\n")
    assert str(err.value) == "rwkv_vocab_v20230424.txt:3: malformed vocab line"


def test_small_vocab_text_encodes_greedy_longest_match():
    tok = WorldTokenizer(vocab_text="1 'a' 1\n2 'ab' 2\n3 b'\\xc3' 1\n4 'b' 1\r\n")
    assert tok.encode("abab") == [2, 2]
    assert tok.encode("aba") == [2, 1]
    assert tok.decode([2, 4, 3]) == "abb\ufffd"


def test_world_vocab_with_another_hash_is_refused(monkeypatch, tmp_path):
    import rwkvslice.data.tokenizers as T

    (tmp_path / T.WORLD_VOCAB_FILE).write_bytes(b"1 'a' 1\r\n")
    monkeypatch.setattr(T.resources, "files", lambda package: tmp_path)
    with pytest.raises(ConfigError) as err:
        T._read_world_vocab()
    digest = hashlib.sha256(b"1 'a' 1\n").hexdigest()  # hashed with LF line ends
    assert str(err.value) == (f"rwkv_vocab_v20230424.txt in the rwkv package has sha256 {digest}, "
                              f"expected {T.WORLD_VOCAB_SHA256}")
