"""Every bad input gives a one-line DataError/ConfigError that names FILE:LINE (or the argument)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from rwkvslice.data import build_dataset, encode_chat_prompt, encode_record, get_tokenizer, write_binidx
from rwkvslice.data.prepare import prepare
from rwkvslice.errors import ConfigError, DataError, RWKVSliceError


def one_line_error(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert isinstance(err.value, RWKVSliceError)
    assert "\n" not in message and message
    return message


def lines_file(tmp_path, name, *lines):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"text": "fine"})


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"text": "unterminated', "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"prompt": "p"}', 'missing the field "response"'),
        ('{"response": "r"}', 'missing the field "prompt"'),
        ('{"text": 5}', 'field "text" must be a string, got number'),
        ('{"prompt": "p", "response": null}', 'field "response" must be a string, got null'),
        ('{"prompt": ["p"], "response": "r"}', 'field "prompt" must be a string, got array'),
        ('{"other": "x"}', 'record needs "text"'),
        ('{"text": "t", "prompt": "p", "response": "r"}', "mixes kinds"),
        ('{"messages": "hi"}', '"messages" must be a non-empty array, got string'),
        ('{"messages": []}', '"messages" must be a non-empty array'),
        ('{"messages": ["hi"]}', "messages[0] must be an object"),
        ('{"messages": [{"role": "user"}]}', 'messages[0]: record is missing the field "content"'),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "role must be one of system, user, assistant"),
        ('{"messages": [{"role": "user", "content": 1}]}', 'field "content" must be a string'),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # Python's decoder: RecursionError
        ('{"text": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001, "nested too deeply"),
    ],
    ids=lambda v: v[:40] if isinstance(v, str) else v,
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad_line, expected):
    path = lines_file(tmp_path, "broken.jsonl", GOOD, "", bad_line, GOOD)  # line 2 is blank: allowed
    message = one_line_error(DataError, build_dataset, path, "byte", 16)
    assert message.startswith(f"{path}:3: ")
    assert "broken.jsonl:3" in message and expected in message


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok line\nsecond \xff line\n")
    assert one_line_error(DataError, build_dataset, path, "byte", 16).startswith(f"{path}:2: invalid UTF-8")
    jpath = tmp_path / "bad.jsonl"
    jpath.write_bytes(GOOD.encode() + b"\n" + GOOD.encode() + b"\n{\"text\": \"\xc3\"}\n")
    assert one_line_error(DataError, build_dataset, jpath, "byte", 16).startswith(f"{jpath}:3: invalid UTF-8")


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl"])
@pytest.mark.parametrize("content", ["", "\n  \n\t\n"])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert one_line_error(DataError, build_dataset, path, "byte", 16) == f"{path}: empty file"


@pytest.mark.parametrize("name", ["bom.txt", "bom.jsonl"])
def test_a_file_holding_only_a_byte_order_mark_is_empty(tmp_path, name):
    """The BOM is not text: such a file is "empty", like a 0-byte one (a .txt one used to crash with a
    bare ValueError from np.concatenate, and `data prepare` wrote an empty binidx)."""
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf\n \n")
    assert one_line_error(DataError, build_dataset, path, "byte", 16) == f"{path}: empty file"
    assert one_line_error(DataError, prepare, path, tmp_path / "out") == f"{path}: empty file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing written


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl", "missing_prefix"])
def test_missing_file(tmp_path, name):
    message = one_line_error(DataError, build_dataset, tmp_path / name, "byte", 16)
    assert message.startswith(f"{tmp_path / name}: no such file")


def test_unsupported_format_and_directory(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    assert "unsupported data format '.csv'" in one_line_error(DataError, build_dataset, tmp_path / "data.csv",
                                                              "byte", 16)
    (tmp_path / "dir.txt").mkdir()
    assert "is a directory" in one_line_error(DataError, build_dataset, tmp_path / "dir.txt", "byte", 16)


@pytest.mark.parametrize("ctx_len", [1, 0, -5, 2.5, "8", True, None])
def test_bad_ctx_len_is_config_error_naming_the_argument(tmp_path, ctx_len):
    path = lines_file(tmp_path, "d.jsonl", GOOD)
    message = one_line_error(ConfigError, build_dataset, path, "byte", ctx_len)
    assert "ctx_len (--ctx-len) must be an integer >= 2" in message


def test_ctx_len_two_is_allowed(tmp_path):
    ds = build_dataset(lines_file(tmp_path, "d.jsonl", GOOD), "byte", 2)
    assert ds[0][1].tolist() == [ord("i") + 1, ord("n") + 1]  # "fine" truncated to "fin"


def test_no_sample_with_loss_is_an_error(tmp_path):
    path = lines_file(tmp_path, "d.jsonl", json.dumps({"prompt": "long prompt", "response": "r"}),
                      json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    message = one_line_error(DataError, build_dataset, path, "byte", 4)
    assert message.startswith(f"{path}: none of the 2 samples has a loss token left")


def test_binidx_token_out_of_vocab(tmp_path):
    write_binidx(tmp_path / "big", [[5, 6, 0], [7, 400, 0]], vocab_size=65536)
    message = one_line_error(DataError, build_dataset, tmp_path / "big", "byte", 4)
    assert message == f"{tmp_path / 'big'}.bin: token 4 has id 400, outside the vocabulary [0, 320)"


def test_binidx_prepared_with_another_tokenizer(tmp_path):
    write_binidx(tmp_path / "w", [[5, 6, 0]], vocab_size=65536, meta={"tokenizer": "world"})
    message = one_line_error(DataError, build_dataset, tmp_path / "w", "byte", 4)
    assert "prepared with tokenizer 'world', not 'byte'" in message


def _idx_bytes(code=8, sizes=(3,), n_doc=None, magic=b"MMIDIDX\x00\x00", version=1):
    sizes = np.asarray(sizes, np.int32)
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(np.int64) * 2
    n_doc = len(sizes) + 1 if n_doc is None else n_doc
    return (magic + struct.pack("<QBQQ", version, code, len(sizes), n_doc) + sizes.tobytes()
            + pointers.tobytes() + np.arange(n_doc, dtype=np.int64).tobytes())


@pytest.mark.parametrize(
    "idx, bin_bytes, expected",
    [
        (_idx_bytes(magic=b"NOTMAGIC\x00"), b"\x01\x00\x02\x00\x00\x00", "not a binidx index"),
        (_idx_bytes(version=2), b"\x01\x00\x02\x00\x00\x00", "unsupported binidx version 2"),
        (_idx_bytes(code=7), b"\x01\x00\x02\x00\x00\x00", "dtype code 7 is not an integer type"),
        (_idx_bytes()[:-4], b"\x01\x00\x02\x00\x00\x00", "its header implies"),
        (_idx_bytes()[:10], b"\x01\x00\x02\x00\x00\x00", "truncated index"),
        (_idx_bytes(), b"\x01\x00\x02\x00", ".bin: 4 bytes, the index implies 6"),
        (_idx_bytes(sizes=(0,)), b"", ".bin: empty file"),
    ],
)
def test_broken_binidx(tmp_path, idx, bin_bytes, expected):
    (tmp_path / "p.idx").write_bytes(idx)
    (tmp_path / "p.bin").write_bytes(bin_bytes)
    message = one_line_error(DataError, build_dataset, tmp_path / "p", "byte", 4)
    assert expected in message and str(tmp_path / "p") in message


def test_binidx_missing_half(tmp_path):
    write_binidx(tmp_path / "p", [[5, 6, 0]], vocab_size=320)
    (tmp_path / "p.bin").unlink()
    message = one_line_error(DataError, build_dataset, tmp_path / "p", "byte", 4)
    assert message.startswith(f"{tmp_path / 'p'}.bin: no such file")


def test_binidx_with_negative_or_gapped_sizes(tmp_path):
    idx = bytearray(_idx_bytes(sizes=(2, 1)))
    header = 9 + struct.calcsize("<QBQQ")
    idx[header:header + 4] = struct.pack("<i", -1)  # sizes[0] = -1
    (tmp_path / "neg.idx").write_bytes(bytes(idx))
    (tmp_path / "neg.bin").write_bytes(b"\x01\x00\x02\x00\x00\x00")
    message = one_line_error(DataError, build_dataset, tmp_path / "neg", "byte", 4)
    assert message == f"{tmp_path / 'neg'}.idx: negative sequence size"

    idx = bytearray(_idx_bytes(sizes=(2, 1)))
    idx[header + 8 + 8:header + 8 + 16] = struct.pack("<q", 6)  # pointers[1] = 6, not 2 * 2 = 4
    (tmp_path / "gap.idx").write_bytes(bytes(idx))
    (tmp_path / "gap.bin").write_bytes(b"\x01\x00\x02\x00\x00\x00")
    message = one_line_error(DataError, build_dataset, tmp_path / "gap", "byte", 4)
    assert message == f"{tmp_path / 'gap'}.idx: sequences are not stored back to back in the .bin"


@pytest.mark.parametrize("bad", [-1, 320])
def test_write_binidx_refuses_ids_outside_the_vocab_and_writes_nothing(tmp_path, bad):
    message = one_line_error(DataError, write_binidx, tmp_path / "p", [[1, 2], [3, bad]], vocab_size=320)
    assert message == f"{tmp_path / 'p'}.bin: token id outside [0, 320)"
    assert list(tmp_path.iterdir()) == []


def test_prepare_of_a_missing_path_without_suffix(tmp_path):
    assert one_line_error(DataError, prepare, tmp_path / "corpus", tmp_path / "out") == (
        f"{tmp_path / 'corpus'}: no such file")


def test_a_stream_of_one_token_has_nothing_to_predict(tmp_path):
    write_binidx(tmp_path / "one", [[5]], vocab_size=320)
    message = one_line_error(DataError, build_dataset, tmp_path / "one", "byte", 4)
    assert message == f"{tmp_path / 'one'}: only 1 token, nothing to predict"


def test_window_index_out_of_range(tmp_path):
    ds = build_dataset(lines_file(tmp_path, "d.txt", "abcdefghij"), "byte", 4)  # 11 tokens -> 3 windows
    assert len(ds) == 3 and ds.bounds(-1) == ds.bounds(2) == (8, 3)
    for i in (3, -4):
        with pytest.raises(IndexError, match=f"^window {i} out of range for 3 windows$"):
            ds.bounds(i)


def test_unreadable_file_names_the_reason(tmp_path, monkeypatch):
    path = lines_file(tmp_path, "locked.txt", "hello")
    real = type(path).read_bytes

    def read_bytes(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(type(path), "read_bytes", read_bytes)  # root can read any file, so simulate it
    assert one_line_error(DataError, build_dataset, path, "byte", 16) == f"{path}: cannot read (Permission denied)"


def test_invalid_utf8_after_a_leading_newline_is_on_line_two(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"\n\xff\n")  # byte 0 is a newline, so the bad byte 1 is on line 2
    assert one_line_error(DataError, build_dataset, path, "byte", 16) == (
        f"{path}:2: invalid UTF-8 (invalid start byte at byte 1)")


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"text": {"a": 1}}, 'w: field "text" must be a string, got object'),
        ({"text": True}, 'w: field "text" must be a string, got boolean'),
        ({"text": 1.5}, 'w: field "text" must be a string, got number'),
        ({"text": ("a",)}, 'w: field "text" must be a string, got tuple'),  # a Python caller's non-JSON value
        ({"messages": [], "text": "a"}, "w: record mixes kinds (messages, text); use one kind per record"),
        ({"messages": ["hi"]}, "w: messages[0] must be an object, got string"),
        ({"messages": [{"content": "x"}]}, 'w: messages[0]: record is missing the field "role"'),
    ],
)
def test_encode_record_errors_name_the_type_and_place(record, expected):
    assert one_line_error(DataError, encode_record, record, get_tokenizer("byte"), "w") == expected


def test_encode_record_errors_default_to_record_and_chat_prompt_to_messages():
    tok = get_tokenizer("byte")
    assert one_line_error(DataError, encode_record, {}, tok) == (
        'record: record needs "text", "prompt" and "response", or "messages"')
    assert one_line_error(DataError, encode_chat_prompt, [{"role": "bot", "content": "x"}], tok) == (
        "messages: messages[0]: role must be one of system, user, assistant, got 'bot'")
