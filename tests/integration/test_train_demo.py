"""`rwkvslice train --demo` end to end, exactly as the README runs it: trains, reports the slicing
memory saving, evaluates held-out exact match >= 0.9 into DIR/eval.json and shows generations."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# 2-3 minutes on 2 cores beside another test worker (so it starts first: conftest.py); the timeout leaves
# room for a loaded machine
pytestmark = [pytest.mark.slow(seconds=150), pytest.mark.timeout(900), pytest.mark.component("Training Loop")]


def test_demo_reaches_exact_match(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "rwkvslice.cli", "train", "--demo", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert result["exact_match"] >= 0.9, result
    assert result["n"] == 200 and result["split"] == "heldout"
    assert "slicing (computed from tensor shapes" in proc.stdout
    assert proc.stdout.count(" -> ") >= 3  # a few generations are shown
    assert "held-out exact match" in proc.stdout
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 500 and recs[-1]["loss"] < 0.1
