"""Windows, loss masks, truncation, padding and packing, against hand-computed (idx, targets).

The byte tokenizer maps a character c (ASCII) to ord(c) + 1, eod is 0, so every expectation below is
written out by hand: "a" = 98, "b" = 99, "c" = 100, "d" = 101, "e" = 102, "f" = 103, " " = 33.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from rwkvslice.data import build_dataset, encode_record, get_tokenizer, write_binidx
from rwkvslice.data.records import text_documents
from rwkvslice.data.windows import IGNORE_INDEX, PAD_ID

X = IGNORE_INDEX
A, B, C, D, E, F, SP, NL, EOD = 98, 99, 100, 101, 102, 103, 33, 11, 0


def jsonl(tmp_path, *records, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def windows(ds):
    return [(ds[i][0].tolist(), ds[i][1].tolist()) for i in range(len(ds))]


def test_prompt_response_window(tmp_path):
    ds = build_dataset(jsonl(tmp_path, {"prompt": "ab", "response": "c"}), "byte", 5)
    # tokens a b c eod; a->b is prompt (no loss), b->c and c->eod are trained, then padding
    assert windows(ds) == [([A, B, C, EOD, PAD_ID], [X, C, EOD, X, X])]
    idx, targets = ds[0]
    assert idx.dtype == targets.dtype == torch.int64 and idx.shape == targets.shape == (5,)
    s = ds.stats
    assert (s["samples"], s["windows"], s["tokens"], s["kept_tokens"], s["padding"]) == (1, 1, 3, 2, 2)
    assert (s["truncated"], s["skipped_no_loss"], s["format"]) == (0, 0, "jsonl")


def test_text_record_trains_everywhere(tmp_path):
    ds = build_dataset(jsonl(tmp_path, {"text": "abc"}), "byte", 4)
    assert windows(ds) == [([A, B, C, EOD], [B, C, EOD, X])]


def test_txt_stream_windows_overlap_by_one_token(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abc\n\nde\n")
    ds = build_dataset(path, "byte", 3)
    # stream: a b c eod d e eod (7 tokens), windows of 4 tokens starting every 3
    assert windows(ds) == [([A, B, C], [B, C, EOD]), ([EOD, D, E], [D, E, EOD])]
    assert ds.stats["samples"] == 2 and ds.stats["kept_tokens"] == 6 and ds.stats["padding"] == 0


def test_txt_documents_split_on_blank_lines_only(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"\n\na\r\nb\n \t \n\n\nc")  # CRLF inside a document; a whitespace-only line separates
    ds = build_dataset(path, "byte", 16)
    assert windows(ds) == [([A, NL, B, EOD, C, PAD_ID] + [PAD_ID] * 10, [NL, B, EOD, C, EOD] + [X] * 11)]
    assert ds.stats["samples"] == 2


def test_txt_last_window_short_and_padded(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcd")  # a b c d eod: 5 tokens, ctx_len 3 -> [a b c d] then [d eod]
    ds = build_dataset(path, "byte", 3)
    assert windows(ds) == [([A, B, C], [B, C, D]), ([D, PAD_ID, PAD_ID], [EOD, X, X])]
    assert ds.stats["tokens"] == 4 and ds.stats["padding"] == 2


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a", ([A, EOD, PAD_ID, PAD_ID], [EOD, X, X, X])),  # 2 tokens
        ("abc", ([A, B, C, EOD], [B, C, EOD, X])),  # ctx_len tokens: one padding slot
        ("abcd", ([A, B, C, D], [B, C, D, EOD])),  # ctx_len + 1 tokens: fits exactly
        ("abcde", ([A, B, C, D], [B, C, D, E])),  # ctx_len + 2: truncated, eod cut off
    ],
)
def test_sample_length_boundaries(tmp_path, text, expected):
    ds = build_dataset(jsonl(tmp_path, {"text": text}), "byte", 4)
    assert windows(ds) == [expected]
    assert ds.stats["truncated"] == (1 if text == "abcde" else 0)
    assert ds.stats["truncated_tokens"] == (1 if text == "abcde" else 0)


def test_length_one_sample_has_no_loss_and_is_skipped(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="rwkvslice.data"):
        ds = build_dataset(jsonl(tmp_path, {"text": ""}, {"text": "ab"}), "byte", 4)
    assert windows(ds) == [([A, B, EOD, PAD_ID], [B, EOD, X, X])]
    assert ds.stats["samples"] == 2 and ds.stats["skipped_no_loss"] == 1
    assert "1 skipped" in caplog.text


def test_truncation_that_removes_the_response_skips_the_sample(tmp_path):
    path = jsonl(tmp_path, {"prompt": "abcdef", "response": "a"}, {"prompt": "a", "response": "b"})
    ds = build_dataset(path, "byte", 4)
    # sample 1 keeps only "abcde" (all prompt) and is skipped; sample 2: a->b and b->eod are trained
    assert windows(ds) == [([A, B, EOD, PAD_ID], [B, EOD, X, X])]
    assert (ds.stats["truncated"], ds.stats["skipped_no_loss"], ds.stats["samples"]) == (1, 1, 2)


def test_packed_window_masks_document_boundaries(tmp_path):
    path = jsonl(tmp_path, {"prompt": "a", "response": "b"}, {"text": "cd"}, {"prompt": "e", "response": "f"})
    ds = build_dataset(path, "byte", 6, pack=True)
    # next-fit: [a b eod | c d eod] = 6 tokens fit in 7; [e f eod] does not and starts a new window.
    # The eod of sample 1 must not learn to predict "c": that target is -100.
    assert windows(ds) == [
        ([A, B, EOD, C, D, EOD], [B, EOD, X, D, EOD, X]),
        ([E, F, EOD, PAD_ID, PAD_ID, PAD_ID], [F, EOD, X, X, X, X]),
    ]
    s = ds.stats
    assert (s["windows"], s["tokens"], s["kept_tokens"], s["padding"], s["pack"]) == (2, 7, 6, 5, True)
    # resets: True where a sample starts in idx (a at 0, c at 3; e at 0), never in the padding
    assert [ds[i][2].tolist() for i in range(len(ds))] == [
        [True, False, False, True, False, False],
        [True, False, False, False, False, False],
    ]
    assert all(ds[i][2].dtype == torch.bool for i in range(len(ds)))


def test_resets_of_a_sample_whose_last_token_is_only_a_target(tmp_path):
    """A window of ctx_len + 1 tokens: the last sample's last token is a target only; the next sample
    starts the next window, so no reset is marked past idx."""
    path = jsonl(tmp_path, {"text": "a"}, {"text": "bc"}, {"text": "d"})
    ds = build_dataset(path, "byte", 4, pack=True)  # [a eod | b c eod] = 5 tokens = ctx_len + 1
    assert windows(ds)[0] == ([A, EOD, B, C], [EOD, X, C, EOD])
    assert ds[0][2].tolist() == [True, False, True, False]
    assert ds[1][2].tolist() == [True, False, False, False]


def test_pack_false_gives_one_sample_per_window(tmp_path):
    path = jsonl(tmp_path, {"prompt": "a", "response": "b"}, {"text": "cd"})
    assert len(build_dataset(path, "byte", 6)[0]) == 2  # unpacked: (idx, targets), no resets
    assert windows(build_dataset(path, "byte", 6)) == [
        ([A, B, EOD, 0, 0, 0], [B, EOD, X, X, X, X]),
        ([C, D, EOD, 0, 0, 0], [D, EOD, X, X, X, X]),
    ]


def test_packing_exact_fit_and_empty_prompt(tmp_path):
    # two samples of 3 tokens + one of 2 = 8 tokens... limit is ctx_len + 1 = 6: [3+3] then [2]
    path = jsonl(tmp_path, {"text": "ab"}, {"prompt": "", "response": "cd"}, {"text": "e"})
    ds = build_dataset(path, "byte", 5, pack=True)
    # an empty prompt: the response's first token has nothing before it in the sample, so it is not a
    # target (position 2 here is the boundary) - only "d" and eod are trained for sample 2
    assert windows(ds) == [
        ([A, B, EOD, C, D], [B, EOD, X, D, EOD]),
        ([E, EOD, 0, 0, 0], [EOD, X, X, X, X]),
    ]


def test_chat_template_and_mask(tmp_path):
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "v"},
        {"role": "assistant", "content": "b"},
    ]
    ds = build_dataset(jsonl(tmp_path, {"messages": messages}), "byte", 128)
    tok = get_tokenizer("byte")
    text = "System: s\n\nUser: u\n\nAssistant: a" + "\0" + "User: v\n\nAssistant: b" + "\0"
    expected = [0 if ch == "\0" else ord(ch) + 1 for ch in text]
    idx, targets = (t.tolist() for t in ds[0])
    assert idx[: len(expected) - 1] == expected[:-1]
    assert set(idx[len(expected) - 1 :]) == {PAD_ID}
    # trained: " a" + eod and " b" + eod (the space belongs to the reply, "Assistant:" to the prompt)
    first = text.index("Assistant: a") + len("Assistant:")
    second = text.index("Assistant: b") + len("Assistant:")
    trained = {first, first + 1, first + 2, second, second + 1, second + 2}  # positions in `text`
    for pos in range(1, len(expected)):
        want = expected[pos] if pos in trained else X
        assert targets[pos - 1] == want, pos
    assert ds.stats["kept_tokens"] == 6
    assert tok.decode([t for t in targets if t != X]) == " a b"


def test_chat_without_assistant_turn_is_skipped(tmp_path):
    path = jsonl(tmp_path, {"messages": [{"role": "user", "content": "hi"}]}, {"text": "ok"})
    ds = build_dataset(path, "byte", 16)
    assert ds.stats["skipped_no_loss"] == 1 and len(ds) == 1


def test_stats_match_an_independent_count(tmp_path):
    records = [{"prompt": "p" * (i % 7), "response": "r" * (i % 3)} for i in range(40)]
    records += [{"text": "t" * (i * 3)} for i in range(10)]
    path = jsonl(tmp_path, *records)
    for pack in (False, True):
        ds = build_dataset(path, "byte", 8, pack=pack)
        items = windows(ds)
        kept = sum(t != X for _, tg in items for t in tg)
        assert ds.stats["kept_tokens"] == kept
        assert ds.stats["windows"] == len(items)
        assert ds.stats["tokens"] + ds.stats["padding"] == len(items) * 8
        # text of length >= 8 (8 + eod > 9 tokens) is truncated; i*3 >= 9 for i >= 3
        assert ds.stats["truncated"] == 7
        for idx, tg in items:  # wherever a target is kept, it is the next idx token (or the last token)
            for t in range(7):
                if tg[t] != X:
                    assert tg[t] == idx[t + 1]


def test_world_tokenizer_encodes_prompt_and_response_separately(tmp_path):
    pytest.importorskip("rwkv", reason="the World tokenizer's vocab ships in the optional `rwkv` package")
    tok = get_tokenizer("world")
    prompt, response = "Question: 2+2=", " 4, 中文 😀"
    ds = build_dataset(jsonl(tmp_path, {"prompt": prompt, "response": response}), tok, 32)
    p, r = tok.encode(prompt), tok.encode(response) + [0]
    idx, targets = (t.tolist() for t in ds[0])
    seq = p + r
    assert idx[: len(seq) - 1] == seq[:-1]
    assert targets[: len(seq) - 1] == [X] * (len(p) - 1) + r


def test_chat_prompt_for_inference_ends_with_the_assistant_header():
    from rwkvslice.data import encode_chat_prompt, encode_record

    tok = get_tokenizer("byte")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = encode_chat_prompt(messages, tok)
    assert prompt == [ord(c) + 1 for c in "System: be brief\n\nUser: hi\n\nAssistant:"]
    # what a model is trained on continues exactly that prompt with the reply and eod
    ids, loss = encode_record({"messages": messages + [{"role": "assistant", "content": "yo"}]}, tok)
    assert ids == prompt + [ord(c) + 1 for c in " yo"] + [0]
    assert loss == [False] * len(prompt) + [True] * 4


def test_encode_record_masks_by_hand():
    tok = get_tokenizer("byte")
    assert encode_record({"text": "ab"}, tok) == ([A, B, EOD], [False, True, True])
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    ids = [ord(ch) + 1 for ch in "User: a\n\nAssistant: b"] + [EOD]
    # "User: a\n\n" (9) and "Assistant:" (10) are not trained, " b" and the eod are
    assert encode_record(chat, tok) == (ids, [False] * 19 + [True] * 3)


class OneTokenPerPiece:
    """Encodes any string as the single token len(s): "Assistant:" is one token."""

    eod_id = 0

    def encode(self, text):
        return [len(text)]


def test_a_chat_opening_with_a_one_token_assistant_header_trains_the_reply():
    ids, loss = encode_record({"messages": [{"role": "assistant", "content": "x"}]}, OneTokenPerPiece())
    assert (ids, loss) == ([10, 2, 0], [False, True, True])  # only the header (token 0) is untrained


def test_text_documents_give_the_first_line_number_and_joined_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"a\nb\n\n\nc\r\nd")  # the last document ends the file (no newline after it)
    assert list(text_documents(path)) == [(1, "a\nb"), (5, "c\nd")]


def test_negative_window_indices_reach_the_first_window(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij\n")  # 11 tokens, ctx_len 4 -> 3 windows
    ds = build_dataset(path, "byte", 4)
    assert len(ds) == 3 and ds.bounds(-3) == ds.bounds(0) == (0, 5)
    assert windows(ds)[0] == (ds[-3][0].tolist(), ds[-3][1].tolist())


def test_a_two_token_stream_is_one_window_and_its_stats(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a\n")  # a eod
    ds = build_dataset(path, "byte", 2)
    assert windows(ds) == [([A, PAD_ID], [EOD, X])]
    assert ds.stats == {"format": "txt", "ctx_len": 2, "pack": True, "samples": 1, "truncated": 0,
                        "truncated_tokens": 0, "skipped_no_loss": 0, "windows": 1, "tokens": 1,
                        "kept_tokens": 1, "padding": 1}


def test_binidx_stats_say_binidx(tmp_path):
    write_binidx(tmp_path / "b", [[5, 6, 7]], vocab_size=320)
    ds = build_dataset(tmp_path / "b", "byte", 2)
    assert windows(ds) == [([5, 6], [6, 7])]
    assert ds.stats == {"format": "binidx", "ctx_len": 2, "pack": True, "samples": 1, "truncated": 0,
                        "truncated_tokens": 0, "skipped_no_loss": 0, "windows": 1, "tokens": 2,
                        "kept_tokens": 2, "padding": 0}


def test_summary_gives_the_trained_share_of_positions(tmp_path):
    ds = build_dataset(jsonl(tmp_path, {"prompt": "ab", "response": "c"}), "byte", 5)  # 2 targets in 5
    assert ds.summary() == ("1 windows of ctx_len 5 from 1 samples (jsonl); 0 truncated, 0 skipped without "
                            "loss tokens; 2 trained targets (40.0% of positions)")


def test_truncated_and_skipped_samples_are_counted_and_logged(tmp_path, caplog):
    no_reply = {"messages": [{"role": "user", "content": "a"}]}  # "User: a\n\n": 9 tokens, no loss
    path = jsonl(tmp_path, {"text": "a" * 10}, no_reply, {"text": "b" * 12}, no_reply)  # 11 and 13 tokens
    with caplog.at_level(logging.WARNING, logger="rwkvslice.data"):
        ds = build_dataset(path, "byte", 8)  # windows of at most 9 tokens: cuts 2 and 4 tokens
    s = ds.stats
    assert (s["samples"], s["truncated"], s["truncated_tokens"], s["skipped_no_loss"]) == (4, 2, 6, 2)
    assert (s["windows"], s["tokens"], s["kept_tokens"], s["padding"]) == (2, 16, 16, 0)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: 2 windows of ctx_len 8 from 4 samples (jsonl); 2 truncated, 2 skipped without loss "
        f"tokens; 16 trained targets (100.0% of positions)"]
