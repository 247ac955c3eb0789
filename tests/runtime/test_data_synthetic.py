"""The demo task: deterministic by seed, disjoint splits, answers checked by an independent parser,
long prompts with short answers, knobs, scoring."""

from __future__ import annotations

import json

import pytest

from rwkvslice.data import DemoTask, build_dataset
from rwkvslice.data.synthetic import DemoTask as DemoTaskFromModule
from rwkvslice.errors import ConfigError


def expected_answer(prompt: str) -> str:
    """Independent reading of the format "k1v1 k2v2 ... ?k": split on spaces, first char is the key."""
    *pairs, query = prompt.split(" ")
    assert query.startswith("?") and len(query) == 2
    table = {p[0]: p[1:] for p in pairs}
    assert len(table) == len(pairs)  # keys are distinct
    return table[query[1]]


def test_same_seed_same_samples_and_prefix_stable():
    a = DemoTask(seed=3).samples(200)
    assert a == DemoTask(seed=3).samples(200)
    assert DemoTask(seed=3).samples(50) == a[:50]
    assert DemoTask(seed=4).samples(200) != a
    assert DemoTask(seed=3).samples(20, "heldout") == DemoTask(seed=3).samples(20, "heldout")


def test_splits_are_disjoint():
    task = DemoTask(seed=0)
    train = {s["prompt"] for s in task.samples(5000)}
    heldout = {s["prompt"] for s in task.samples(300, "heldout")}
    assert len(heldout) == 300 and not train & heldout
    assert all(task.split_of(p) == "heldout" for p in heldout)


def test_answers_and_shape_of_the_default_task():
    task = DemoTask(seed=1)
    for s in task.samples(300) + task.samples(100, "heldout"):
        assert s["response"] == expected_answer(s["prompt"]) == task.answer(s["prompt"])
        assert len(s["response"]) == 1 and s["response"].isdigit()
        assert len(s["prompt"]) >= 10 * len(s["response"])  # long prompt, short answer
        assert len(s["prompt"]) + len(s["response"]) + 1 == task.max_tokens()
    assert task.samples(3)[0]["prompt"].count(" ") == 8  # 8 pairs + the query


def test_knobs():
    task = DemoTask(seed=2, n_pairs=4, keys="wxyz", values="ab".upper(), value_len=3)
    for s in task.samples(50):
        assert s["response"] == expected_answer(s["prompt"])
        assert len(s["response"]) == 3 and set(s["response"]) <= {"A", "B"}
        assert sorted(p[0] for p in s["prompt"].split(" ")[:-1]) == list("wxyz")
    for bad in ({"n_pairs": 0}, {"n_pairs": 17}, {"keys": "aab"}, {"values": "a 1"}, {"value_len": 0},
                {"heldout_fraction": 0}):
        with pytest.raises(ConfigError):
            DemoTask(**bad)
    with pytest.raises(ConfigError, match="split"):
        DemoTask().samples(1, "test")


def test_score_is_exact_match():
    task = DemoTask()
    prompt = "a1 b2 c3 ?b"
    assert task.answer(prompt) == "2"
    assert task.score(prompt, "2") and task.score(prompt, " 2\n")
    assert not task.score(prompt, "3") and not task.score(prompt, "") and not task.score(prompt, "22")
    with pytest.raises(ValueError, match="not a prompt"):
        task.answer("no query here")


def test_write_jsonl_trains_only_the_answer(tmp_path):
    task = DemoTaskFromModule(seed=0)
    path = task.write_jsonl(tmp_path / "demo.jsonl", 30)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == task.samples(30)
    ds = build_dataset(path, "byte", task.max_tokens() - 1)
    assert ds.stats["truncated"] == 0 and ds.stats["kept_tokens"] == 30 * 2  # the value and the eod
    for i, rec in enumerate(records):
        targets = [t for t in ds[i][1].tolist() if t != -100]
        assert targets == [ord(rec["response"]) + 1, 0]
