"""Exact resume of tuned runs: a `--tune lora|state` run interrupted at any moment and resumed logs the
same loss at every step, bit for bit on CPU, and ends with the same trainable tensors, as one that was
never interrupted (its checkpoints hold only those tensors; the base is rebuilt and checked)."""

from __future__ import annotations

import json
import random
import signal

import pytest
import torch
from cli_runs import run_in_process, signal_after_steps
from safetensors.torch import load_file

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.data import DemoTask
from rwkvslice.train.checkpoint import latest_checkpoint
from rwkvslice.train.trainer import TrainConfig, train

pytestmark = pytest.mark.component("PEFT")

TUNES = {"lora": dict(tune="lora", lora_r=4), "pissa": dict(tune="lora", lora_r=4, lora_init="pissa"),
         "lora+time": dict(tune="lora", lora_r=4, train_also="time"), "state": dict(tune="state", lr=0.5)}


def write_base(path):
    """A base whose every weight matters (the official init zeroes att.output: a state gets no gradient)."""
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(vocab_size=320, n_embd=64, n_layer=2, head_size=32))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_official(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return DemoTask(seed=1).write_jsonl(d / "train.jsonl", 64, "train"), write_base(d / "base.pth")


def cfg(out, data, **kw):
    data, base_pth = data
    base = dict(out=str(out), data=str(data), init_from=base_pth and str(base_pth), ctx_len=32, batch_size=8, steps=7,
                lr=2e-2, warmup_steps=2, save_every=3, keep=2, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def tensors(out):
    return load_file(str(latest_checkpoint(out / "checkpoints") / "peft.safetensors"))


def assert_same(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Crash(BaseException):
    pass


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k == "lora+time" else k for k in TUNES])
def test_crash_then_resume_is_bit_exact(tmp_path, data, kind):
    train(cfg(tmp_path / "ref", data, **TUNES[kind]), log=lambda m: None)

    def die(step, model):
        if step == 5:
            raise Crash

    out = tmp_path / "run"
    with pytest.raises(Crash):
        train(cfg(out, data, **TUNES[kind]), after_step=die, log=lambda m: None)
    train(cfg(out, data, resume=True, **TUNES[kind]), log=lambda m: None)
    assert losses(out) == losses(tmp_path / "ref")
    assert_same(tensors(out), tensors(tmp_path / "ref"))
    assert all(t.abs().max() > 0 for k, t in tensors(out).items() if "lora_B" in k or "initial_state" in k)


def test_fresh_base_is_rebuilt_on_resume(tmp_path, data):
    """No --init-from: the base is the seed's fresh model, rebuilt on resume and checked by sha256."""
    data, kw = (data[0], None), dict(model="demo", tune="lora", lora_r=4)
    train(cfg(tmp_path / "ref", data, **kw), log=lambda m: None)

    def die(step, model):
        if step == 4:
            raise Crash

    with pytest.raises(Crash):
        train(cfg(tmp_path / "run", data, **kw), after_step=die, log=lambda m: None)
    train(cfg(tmp_path / "run", data, resume=True, **kw), log=lambda m: None)
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


def _cmd(data, base, out, tune, *extra):
    return ["train", "--data", str(data), "--out", str(out), "--init-from", str(base), "--ctx-len", "32",
            "--batch-size", "8", "--steps", "10", "--lr", "2e-2", "--warmup-steps", "2", "--save-every", "1",
            "--keep", "2", "--seed", "3", "--no-progress", "--device", "cpu", "--tune", tune, *extra]


@pytest.mark.slow  # one CLI process, killed, plus two runs in this process (cli_runs.py): ~10-20 s each
@pytest.mark.parametrize("tune", ["lora", "state"])
def test_sigkill_at_a_random_moment_then_resume(tmp_path, tune):
    data = DemoTask(seed=2).write_jsonl(tmp_path / "train.jsonl", 40, "train")
    base = write_base(tmp_path / "base.pth")
    run_in_process(_cmd(data, base, tmp_path / "ref", tune))
    ref = losses(tmp_path / "ref")
    assert len(ref) == 10

    rng = random.Random()
    out = tmp_path / "run"
    kill_after = rng.randint(2, 8)
    rc = signal_after_steps(_cmd(data, base, out, tune), out, kill_after, rng, jitter=0.2)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    run_in_process(_cmd(data, base, out, tune, "--resume"))
    assert losses(out) == ref, f"killed after {kill_after} steps"
    assert_same(tensors(out), tensors(tmp_path / "ref"))
    assert not [q for q in (out / "checkpoints").iterdir() if q.name.startswith(".")]
