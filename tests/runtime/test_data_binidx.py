"""binidx: the exact Megatron MMIDIDX byte layout (written out by hand with struct), round trips through
`prepare`, equality with reading the source .txt directly, and all-or-nothing writes."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest

from rwkvslice.data import BinIdx, build_dataset, get_tokenizer, prepare, write_binidx
from rwkvslice.errors import DataError


def test_written_bytes_match_the_megatron_layout(tmp_path):
    write_binidx(tmp_path / "x", [[1, 2, 3], [4]], vocab_size=320)
    expected_idx = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)  # version
        + struct.pack("<B", 8)  # dtype code 8 = uint16
        + struct.pack("<Q", 2)  # sequences
        + struct.pack("<Q", 3)  # doc_idx entries (one document per sequence + the end)
        + struct.pack("<2i", 3, 1)  # sizes
        + struct.pack("<2q", 0, 6)  # byte pointers
        + struct.pack("<3q", 0, 1, 2)  # doc_idx
    )
    assert (tmp_path / "x.idx").read_bytes() == expected_idx
    assert (tmp_path / "x.bin").read_bytes() == struct.pack("<4H", 1, 2, 3, 4)
    assert json.loads((tmp_path / "x.json").read_text())["vocab_size"] == 320


def test_large_vocab_uses_int32(tmp_path):
    write_binidx(tmp_path / "x", [[70000, 0]], vocab_size=100000)
    assert (tmp_path / "x.idx").read_bytes()[17] == 4  # dtype code 4 = int32
    assert (tmp_path / "x.bin").read_bytes() == struct.pack("<2i", 70000, 0)
    assert BinIdx(tmp_path / "x").sequence(0).tolist() == [70000, 0]


def test_reads_a_hand_written_pair_without_metadata(tmp_path):
    # what another tool (RWKV's json2binidx) would write: no .json next to it
    (tmp_path / "p.idx").write_bytes(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 2, 3)
                                     + struct.pack("<2i2q3q", 2, 3, 0, 4, 0, 1, 2))
    (tmp_path / "p.bin").write_bytes(struct.pack("<5H", 98, 0, 99, 100, 0))
    data = BinIdx(tmp_path / "p")
    assert data.meta == {} and len(data) == 2
    assert data.sequence(0).tolist() == [98, 0] and data.sequence(1).tolist() == [99, 100, 0]
    ds = build_dataset(tmp_path / "p", "byte", 2)
    assert [(ds[i][0].tolist(), ds[i][1].tolist()) for i in range(len(ds))] == [
        ([98, 0], [0, 99]),
        ([99, 100], [100, 0]),
    ]
    # PREFIX.bin and PREFIX.idx name the same dataset
    assert len(build_dataset(tmp_path / "p.bin", "byte", 2)) == len(build_dataset(tmp_path / "p.idx", "byte", 2))


DOCS = ["first document\nwith two lines", "中文 😀 emoji", "x", "last one\tends here"]


@pytest.mark.parametrize("tokenizer", ["byte", "world"])
def test_prepare_round_trip_txt(tmp_path, tokenizer):
    if tokenizer == "world":
        pytest.importorskip("rwkv", reason="the World tokenizer's vocab ships in the optional `rwkv` package")
    tok = get_tokenizer(tokenizer)
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(DOCS) + "\n")
    result = prepare(src, tmp_path / "out", tokenizer)
    data = BinIdx(tmp_path / "out")
    assert result["sequences"] == len(DOCS) == len(data)
    assert data.meta["tokenizer"] == tokenizer
    for i, doc in enumerate(DOCS):
        seq = data.sequence(i).tolist()
        assert seq[-1] == 0 and 0 not in seq[:-1]
        assert tok.decode(seq) == doc
    assert data.doc_idx.tolist() == list(range(len(DOCS) + 1))
    # training from the prefix gives the very same windows as training from the .txt
    a, b = build_dataset(src, tok, 7), build_dataset(tmp_path / "out", tok, 7)
    assert len(a) == len(b) and a.stats["kept_tokens"] == b.stats["kept_tokens"]
    for i in range(len(a)):
        assert a[i][0].tolist() == b[i][0].tolist() and a[i][1].tolist() == b[i][1].tolist()


def test_prepare_jsonl_text_records(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d, "meta": 1}) + "\n" for d in DOCS))
    prepare(src, tmp_path / "out.bin")  # a .bin/.idx suffix on --out is taken as the prefix
    tok = get_tokenizer("byte")
    data = BinIdx(tmp_path / "out")
    assert [tok.decode(data.sequence(i)) for i in range(len(data))] == DOCS


def test_prepare_refuses_masked_records_and_writes_nothing(tmp_path):
    write_binidx(tmp_path / "out", [[1, 2, 0]], vocab_size=320)  # an older dataset stays untouched
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:2: binidx has no loss mask"):
        prepare(src, tmp_path / "out")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "c.jsonl"}
    assert after == before  # no temporary files left behind, old files unchanged


def test_prepare_bad_input(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        prepare(tmp_path / "nope.txt", tmp_path / "out")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match="reads .txt or .jsonl"):
        prepare(tmp_path / "x.csv", tmp_path / "out")
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(DataError, match="no such folder"):
        prepare(tmp_path / "a.txt", tmp_path / "missing_dir" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "x.csv"]


def test_binidx_dataset_pickles_by_path(tmp_path):
    write_binidx(tmp_path / "p", [list(range(1, 300))] * 50, vocab_size=320)
    ds = build_dataset(tmp_path / "p", "byte", 16)
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # the 30 KB of tokens are not copied into the pickle
    clone = pickle.loads(blob)
    assert np.array_equal(clone[5][0].numpy(), ds[5][0].numpy())
