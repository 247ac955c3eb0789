"""Every command (train, generate, eval, export) as a real subprocess: success, and a bad flag -> exit 2
with one line on stderr. The shared trained run and further bad values go through `rwkvslice.cli.main`
in-process (no extra torch imports)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from run_once import build_once_per_run

from rwkvslice import RWKV7
from rwkvslice.cli import main
from rwkvslice.data import DemoTask
from rwkvslice.generate import generate
from rwkvslice.generate.loading import load_model

pytestmark = pytest.mark.component("CLI")

CLI = [sys.executable, "-m", "rwkvslice.cli"]


def cli(*args, timeout=240):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def start(*args):
    return subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=240):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


TRAIN_ARGS = ["--steps", 2, "--model", "demo", "--ctx-len", 32, "--batch-size", 4, "--no-progress", "--device", "cpu"]


def _train_run(base):
    data = DemoTask(seed=0).write_jsonl(base / "train.jsonl", 64, "train")
    assert main(["train", "--data", str(data), "--out", str(base / "run"), *map(str, TRAIN_ARGS)]) == 0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step `rwkvslice train` run (read-only for the tests), trained once per pytest run, in-process
    (the CLI as a real process: test_train_as_a_process)."""
    return build_once_per_run(tmp_path_factory, "cli-run", _train_run) / "run"


def _losses(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


# The real-process tests below are `slow`: a fresh interpreter costs 5 s of imports (15-25 s under coverage),
# and what they add, the entry point in a fresh process, does not depend on the torch version, so the
# torch-matrix legs leave them to the integration session.
@pytest.mark.slow
def test_train_as_a_process(run_dir, tmp_path):
    proc = cli("train", "--data", run_dir.parent / "train.jsonl", "--out", tmp_path / "run", *TRAIN_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("done: step 2, loss ")
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "rwkvslice_model.safetensors").is_file()
    assert _losses(tmp_path / "run") == _losses(run_dir)  # the same run as through main() in this process


def test_train_writes_metrics_and_checkpoint(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    assert (run_dir / "checkpoints" / "step-00000002" / "rwkvslice_model.safetensors").is_file()


@pytest.mark.slow
def test_generate_eval_export_succeed(run_dir, tmp_path):
    prompt = "a1 b2 c3 ?b"
    # sampled with a seed (and the CLI's default --top-p 0.85): a 2-step model's greedy choice may be
    # the end-of-document token at once, and an empty output would compare equal to an empty expectation
    gen = start("generate", "--ckpt", run_dir, "--prompt", prompt, "--max-new-tokens", 8, "--temperature", 1,
                "--seed", 5)
    ev = start("eval", "--ckpt", run_dir, "--n", 6, "--out", tmp_path / "eval.json")
    exp = start("export", "--ckpt", run_dir, "--official", tmp_path / "model.pth")
    (rc_g, out_g, err_g), (rc_e, _, err_e), (rc_x, _, err_x) = finish(gen), finish(ev), finish(exp)

    assert rc_g == 0, err_g[-2000:]
    model, tok, _, _ = load_model(run_dir)
    ids = generate(model, [tok.encode(prompt)], max_new_tokens=8, temperature=1.0, top_p=0.85, seed=5)[0]
    expected = tok.decode(ids)
    assert len(ids) >= 2 and expected.strip()  # a real continuation, not an empty one
    assert out_g == expected + "\n"  # the streamed pieces add up to the library's sampled output

    assert rc_e == 0, err_e[-2000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["n"] == 6 and 0.0 <= result["exact_match"] <= 1.0

    assert rc_x == 0, err_x[-2000:]
    official = torch.load(tmp_path / "model.pth", map_location="cpu", weights_only=True)
    assert "blocks.0.att.w0" in official and "head.weight" in official
    back = RWKV7.from_official(tmp_path / "model.pth")
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_bad_flags_exit_2_with_one_line(run_dir, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "b"}\n{"text": "x"}\n{"prompt": oops}\n')
    procs = {
        "train": start("train", "--data", broken, "--out", tmp_path / "t", "--steps", 2),
        "generate": start("generate", "--ckpt", run_dir, "--prompt", "x", "--top-p", 2),
        "eval": start("eval", "--ckpt", tmp_path / "missing"),
        "export": start("export", "--ckpt", run_dir),  # --official missing: argparse
    }
    expect = {"train": "broken.jsonl:3", "generate": "--top-p",
              "eval": "missing", "export": "--official"}
    for name, proc in procs.items():
        rc, out, err = finish(proc)
        lines = err.strip().splitlines()
        assert rc == 2, (name, err[-2000:])
        assert len(lines) == 1 or name == "export", (name, err)  # argparse adds its usage line
        assert expect[name] in lines[-1] and "Traceback" not in err, (name, err)
    assert not (tmp_path / "t" / "checkpoints").exists()


def test_divergence_exits_1_with_one_line(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello world, " * 400)
    rc = main(["train", "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "run"), "--steps", "4",
               "--lr", "1e30", "--warmup-steps", "0", "--model", "demo", "--ctx-len", "32", "--no-progress",
               "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "step 2: non-finite" in err[0], err


@pytest.mark.parametrize("argv, needle", [
    (["train", "--out", "X"], "no training data"),
    (["train", "--demo", "--out", "X", "--precision", "fp16"], "fp16 is not supported"),
    (["train", "--demo", "--data", "f.txt", "--out", "X"], "exclusive"),
    (["train", "--data", "f.txt", "--out", "X", "--init-from", "a.pth", "--model", "tiny"], "--init-from"),
    (["train", "--data", "f.txt", "--out", "X", "--steps", "0"], "--steps"),
    (["train", "--data", "f.txt", "--out", "X", "--grad-accum", "0"], "--grad-accum"),
    (["train", "--data", "f.txt", "--out", "X", "--device", "tpu"], "--device"),
    (["train", "--demo", "--out", "X", "--tokenizer", "world"], "byte tokenizer"),
    (["train", "--demo", "--out", "f.txt"], "--out f.txt exists and is not a directory"),
    (["train", "--data", "missing.txt", "--out", "X"], "missing.txt: no such file"),
    (["generate", "--ckpt", "RUN", "--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["generate", "--ckpt", "RUN", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--ckpt", "RUN", "--prompt", ""], "--prompt is empty"),
    (["eval", "--ckpt", "RUN", "--n", "0"], "--n"),
    (["export", "--ckpt", "RUN", "--official", "out.bin"], ".pth"),
    (["export", "--ckpt", "RUN", "--official", "/no/such/dir/x.pth"], "does not exist"),
])
def test_bad_values_in_process(run_dir, tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.txt").write_text("hello world\n")
    argv = [str(run_dir) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rwkvslice: error: ") and needle in err[0], err
    assert not (tmp_path / "X").exists()  # a user error leaves no run directory behind


def test_eval_data_loss_matches_full_logits(run_dir, tmp_path, capsys):
    import torch.nn.functional as F

    from rwkvslice.data import build_dataset

    data = run_dir.parent / "train.jsonl"
    assert main(["eval", "--ckpt", str(run_dir), "--data", str(data), "--batch-size", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    model, tok, _, _ = load_model(run_dir)
    ds = build_dataset(data, tok, 32)
    total, kept = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):  # reference: full logits, masked CE, one window at a time, fp64 sum
            idx, targets = ds[i]
            logits = model(idx[None])[0]
            total += F.cross_entropy(logits.double(), targets, ignore_index=-100, reduction="sum").item()
            kept += int((targets != -100).sum())
    assert result["kept_tokens"] == kept and result["windows"] == len(ds)
    assert result["loss"] == pytest.approx(total / kept, rel=1e-5)
