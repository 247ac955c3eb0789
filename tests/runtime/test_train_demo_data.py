"""The demo's training file: written once under OUT/demo/, reused as it is by a resumed run."""

from __future__ import annotations

import json

import pytest

from rwkvslice.data import DemoTask
from rwkvslice.train.demo import demo_data_path, write_demo_data

pytestmark = pytest.mark.component("Training Loop")


def test_written_once_then_reused(tmp_path):
    path = write_demo_data(tmp_path, DemoTask(seed=0), n=5)
    assert path == demo_data_path(tmp_path) == tmp_path / "demo" / "train.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 5 and all({"prompt", "response"} <= r.keys() for r in records)
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temporary left

    path.write_text('{"text": "kept"}\n')  # a resumed run must train on the same file, not a new one
    assert write_demo_data(tmp_path, DemoTask(seed=1), n=7) == path
    assert path.read_text() == '{"text": "kept"}\n'
