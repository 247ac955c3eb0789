"""Exact resume: a run interrupted at any moment and resumed with --resume logs the same loss at every
step, bit for bit on CPU, and ends with the same weights as a run that was never interrupted."""

from __future__ import annotations

import json
import random
import signal

import pytest
import torch
from cli_runs import run_in_process, signal_after_steps
from safetensors.torch import load_file

from rwkvslice.data import DemoTask
from rwkvslice.errors import ConfigError
from rwkvslice.train import checkpoint as ckpt_io
from rwkvslice.train import trainer as trainer_mod
from rwkvslice.train.checkpoint import latest_checkpoint
from rwkvslice.train.trainer import TrainConfig, train

pytestmark = pytest.mark.component("Checkpoints")

STEPS = 9


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 120 windows at batch 8: one epoch is 15 steps, so the runs below also cross no epoch boundary;
    # the subprocess test uses 40 windows (5 steps per epoch) to resume across epochs.
    return DemoTask(seed=1).write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", 120, "train")


def cfg(out, data, **kw):
    base = dict(out=str(out), data=str(data), model="demo", ctx_len=32, batch_size=8, steps=STEPS,
                lr=2e-3, warmup_steps=2, save_every=3, keep=2, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def weights(out):
    return load_file(str(latest_checkpoint(out / "checkpoints") / "rwkvslice_model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("reference")
    train(cfg(out, data), log=lambda m: None)
    return losses(out), weights(out)


class Crash(BaseException):
    """Stands in for the process dying (BaseException: nothing in the trainer may swallow it)."""


def test_crash_between_checkpoints(tmp_path, data, reference):
    def die(step, model):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(cfg(tmp_path, data), after_step=die, log=lambda m: None)
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4]
    train(cfg(tmp_path, data, resume=True), log=lambda m: None)
    assert losses(tmp_path) == reference[0]
    assert_same_weights(weights(tmp_path), reference[1])


def test_crash_after_logging_a_step_whose_checkpoint_never_landed(tmp_path, data, reference, monkeypatch):
    real = ckpt_io.save_checkpoint

    def save(root, step, **kw):
        if step == 6:
            raise Crash  # metrics for step 6 are written, its checkpoint is not
        return real(root, step, **kw)

    monkeypatch.setattr(trainer_mod.ckpt_io, "save_checkpoint", save)
    with pytest.raises(Crash):
        train(cfg(tmp_path, data), log=lambda m: None)
    monkeypatch.undo()
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000003"
    # resumed twice: once more interrupted at step 8, then to the end
    def die(step, model):
        if step == 8:
            raise Crash

    with pytest.raises(Crash):
        train(cfg(tmp_path, data, resume=True), after_step=die, log=lambda m: None)
    train(cfg(tmp_path, data, resume=True), log=lambda m: None)
    assert losses(tmp_path) == reference[0]
    assert_same_weights(weights(tmp_path), reference[1])


def test_resume_with_more_steps_continues_the_run(tmp_path, data):
    train(cfg(tmp_path, data, steps=3), log=lambda m: None)
    res = train(cfg(tmp_path, data, steps=5, resume=True), log=lambda m: None)
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4, 5] and res.step == 5
    with pytest.raises(ConfigError, match="--steps 4: .* already at step 5"):
        train(cfg(tmp_path, data, steps=4, resume=True), log=lambda m: None)


def test_resume_without_a_checkpoint_starts_fresh(tmp_path, data, reference):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # from a run killed at step 1
    train(cfg(tmp_path, data, resume=True), log=lambda m: None)
    assert losses(tmp_path) == reference[0]


# ---------------------------------------------------------------------------------------------------
# The real thing: SIGKILL a `rwkvslice train` process at a random moment (save_every 1, so the kill
# often lands inside a checkpoint write), resume it, compare with an uninterrupted run. The killed run
# is a real process; the reference and the resume run through the CLI's main() here (cli_runs.py).

def _cmd(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), "--model", "demo", "--ctx-len", "32",
            "--batch-size", "8", "--steps", "12", "--lr", "2e-3", "--warmup-steps", "2", "--save-every", "1",
            "--keep", "2", "--seed", "3", "--no-progress", "--device", "cpu", *extra]


@pytest.mark.slow  # one CLI process of 12 steps, killed, plus two runs in this process: ~10-20 s
def test_sigkill_at_a_random_moment_then_resume(tmp_path):
    data = DemoTask(seed=2).write_jsonl(tmp_path / "train.jsonl", 40, "train")
    run_in_process(_cmd(data, tmp_path / "ref"))
    ref = losses(tmp_path / "ref")
    assert len(ref) == 12

    rng = random.Random()
    out = tmp_path / "run"
    kill_after = rng.randint(2, 9)
    rc = signal_after_steps(_cmd(data, out), out, kill_after, rng)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    run_in_process(_cmd(data, out, "--resume"))
    got = losses(out)
    assert got == ref, f"killed after {kill_after} steps: {got} != {ref}"
    assert_same_weights(weights(out), weights(tmp_path / "ref"))
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # temporaries cleaned
