"""`rwkvslice data prepare` as a subprocess: a round trip to binidx, and bad input -> exit status 2 with
one line on stderr, no traceback, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rwkvslice.data import BinIdx, build_dataset, get_tokenizer


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "rwkvslice.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_prepare_round_trip(tmp_path):
    docs = ["first doc\nline two", "второй документ 😀", "third"]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    proc = run_cli("data", "prepare", "corpus.txt", "--out", "prep", "--tokenizer", "byte", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "3 documents" in proc.stdout
    data = BinIdx(tmp_path / "prep")
    tok = get_tokenizer("byte")
    assert [tok.decode(data.sequence(i)) for i in range(len(data))] == docs
    ds = build_dataset(tmp_path / "prep", tok, 8)
    assert ds.stats["format"] == "binidx" and ds.stats["samples"] == 3


def assert_one_line_exit_2(proc, *expected):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("rwkvslice: error: ")
    for text in expected:
        assert text in lines[0]


def test_broken_jsonl_line_three(tmp_path):
    good = json.dumps({"text": "ok"})
    (tmp_path / "broken.jsonl").write_text(f"{good}\n{good}\n{{not json\n{good}\n")
    proc = run_cli("data", "prepare", "broken.jsonl", "--out", "prep", cwd=tmp_path)
    assert_one_line_exit_2(proc, "broken.jsonl:3", "invalid JSON")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl"]  # nothing half-written


def test_bad_inputs_exit_2(tmp_path, monkeypatch, capsys):
    """In-process through the CLI's main() (the subprocess tests above cover the real entry point and its
    exit status; one `import torch` per case would cost seconds each)."""
    from rwkvslice.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": 3}) + "\n")
    cases = [
        (("missing.txt", "--out", "p"), ["missing.txt: no such file"]),
        (("empty.txt", "--out", "p"), ["empty.txt: empty file"]),
        (("sft.jsonl", "--out", "p"), ["sft.jsonl:1", "no loss mask"]),
        (("bad.jsonl", "--out", "p"), ["bad.jsonl:1", 'field "text" must be a string']),
        (("empty.txt", "--out", "nodir/p"), ["no such folder"]),
    ]
    for args, expected in cases:
        rc = main(["data", "prepare", *args])
        err = capsys.readouterr().err
        assert_one_line_exit_2(subprocess.CompletedProcess(args, rc, "", err), *expected)
    with pytest.raises(SystemExit) as usage:  # argparse's own usage error
        main(["data", "prepare", "x.txt", "--out", "p", "--tokenizer", "gpt2"])
    assert usage.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.txt", "sft.jsonl"]
