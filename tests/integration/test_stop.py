"""A clean stop: SIGTERM/SIGINT or --max-time finish the step, checkpoint, print where and how to resume,
exit 128 + signum (0 for --max-time); a second signal abandons the save without harming earlier
checkpoints; and a run stopped at a random moment, then resumed, logs the same losses bit for bit on CPU
as one never stopped (single process and 2 DDP ranks, where the ranks stop after the same step)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_runs import fork, metric_lines
from safetensors.torch import load_file
from test_ddp import WORLD

from rwkvslice.cli import main
from rwkvslice.data import DemoTask, build_dataset, get_tokenizer
from rwkvslice.model import RWKV7
from rwkvslice.train import checkpoint as ckpt_io
from rwkvslice.train import stopping
from rwkvslice.train import trainer as trainer_mod
from rwkvslice.train.checkpoint import latest_checkpoint
from rwkvslice.train.evaluate import evaluate_loss

pytestmark = pytest.mark.component("Clean Stop")

STOP_LINE = re.compile(r"^(stopped by SIG\w+|--max-time \S+ reached) after step (\d+) of (\d+): checkpoint (\S+); "
                       r"resume with the same command and --resume$")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return (DemoTask(seed=2).write_jsonl(base / "train.jsonl", 40, "train"),
            DemoTask(seed=6).write_jsonl(base / "heldout.jsonl", 12, "train"))


def argv(files, out, *extra, steps=8):
    data, heldout = files
    return ["train", "--data", str(data), "--out", str(out), "--model", "demo", "--ctx-len", "32", "--batch-size",
            "8", "--steps", str(steps), "--lr", "2e-3", "--warmup-steps", "2", "--save-every", "2", "--keep", "3",
            "--seed", "3", "--eval-data", str(heldout), "--eval-every", "3", "--eval-batches", "1",
            "--no-progress", "--device", "cpu", *extra]


def logged(out):
    """What must continue bit for bit: step, training loss, held-out loss (timings differ by nature)."""
    return [(r["step"], r["loss"], r.get("eval_loss"))
            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def weights(out):
    return load_file(str(latest_checkpoint(out / "checkpoints") / "rwkvslice_model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, files):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(argv(files, out)) == 0
    return logged(out), weights(out)


def signal_during(monkeypatch, step_to_signal, sig=signal.SIGTERM):
    """Send `sig` to this process while optimizer step `step_to_signal` runs (inside train_step)."""
    real = trainer_mod.train_step
    calls = []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step_to_signal:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "train_step", step)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, files, reference, monkeypatch,
                                                                  capsys, sig):
    out = tmp_path / "run"
    signal_during(monkeypatch, 5, sig)
    before = signal.getsignal(sig)
    assert main(argv(files, out)) == 128 + sig
    line = capsys.readouterr().out.strip()
    m = STOP_LINE.match(line)
    assert m and m.group(1) == f"stopped by {signal.Signals(sig).name}" and m.group(2) == "5", line
    assert m.group(4) == str(out / "checkpoints" / "step-00000005") == str(latest_checkpoint(out / "checkpoints"))
    assert [s for s, _, _ in logged(out)] == [1, 2, 3, 4, 5]  # step 5 finished, nothing after it
    assert signal.getsignal(sig) == before  # handlers put back
    monkeypatch.undo()
    assert main([*argv(files, out), "--resume"]) == 0
    assert logged(out) == reference[0]
    assert_same_weights(weights(out), reference[1])


def test_second_signal_while_saving_abandons_that_save_only(tmp_path, files, reference, monkeypatch, capsys):
    out = tmp_path / "run"
    signal_during(monkeypatch, 5)  # the first SIGTERM: stop after step 5, which then saves ...
    real_save = ckpt_io.torch.save

    def save(obj, path, *a, **k):  # ... and a second SIGTERM arrives while it writes optimizer.pt
        if "step-00000005" in str(path):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt_io.torch, "save", save)
    assert main(argv(files, out)) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    newest = out / "checkpoints" / "step-00000004"
    assert err == [f"rwkvslice: second SIGTERM: stopped at once without saving; the newest complete checkpoint "
                   f"is {newest}"]
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    ckpt_io.load_trainer_files(newest)  # intact
    assert main([*argv(files, out), "--resume"]) == 0
    assert logged(out) == reference[0]
    assert_same_weights(weights(out), reference[1])


def test_signal_during_a_scheduled_save_stops_after_that_save(tmp_path, files, reference, monkeypatch, capsys):
    """SIGTERM while step 4's regular checkpoint is written: that checkpoint completes and the run stops
    there, without running (maybe long) step 5 inside the scheduler's kill window."""
    out = tmp_path / "run"
    real_save = ckpt_io.torch.save

    def save(obj, path, *a, **k):
        if "step-00000004" in str(path) and path.name == "optimizer.pt":
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt_io.torch, "save", save)
    assert main(argv(files, out)) == 143
    m = STOP_LINE.match(capsys.readouterr().out.strip())
    assert m and m.group(2) == "4" and m.group(4) == str(out / "checkpoints" / "step-00000004"), m
    assert [s for s, _, _ in logged(out)] == [1, 2, 3, 4]
    monkeypatch.undo()
    assert main([*argv(files, out), "--resume"]) == 0
    assert logged(out) == reference[0]


def test_max_time_stops_like_a_signal_then_resumes_exactly(tmp_path, files, reference, monkeypatch, capsys):
    """The clock jumps 2 h during step 4 of a run with --max-time 1h30m: it stops after step 4."""
    offset = [0.0]
    clock = type("Clock", (), {"monotonic": staticmethod(lambda: time.monotonic() + offset[0])})
    monkeypatch.setattr(stopping, "time", clock)
    real = trainer_mod.train_step
    calls = []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            offset[0] = 7200.0
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "train_step", step)
    out = tmp_path / "run"
    assert main([*argv(files, out), "--max-time", "1h30m"]) == 0
    line = capsys.readouterr().out.strip()
    m = STOP_LINE.match(line)
    assert m and m.group(1) == "--max-time 1h30m reached" and m.group(2) == "4", line
    monkeypatch.undo()
    assert main([*argv(files, out), "--resume", "--max-time", "1h"]) == 0  # may change on resume
    assert logged(out) == reference[0]
    assert_same_weights(weights(out), reference[1])


# ---------------------------------------------------------------------------------------------------
# Real processes: SIGTERM (once, or twice in quick succession) at a random moment.

STEPS = 16


@pytest.fixture(scope="module")
def process_reference(tmp_path_factory, files):
    """The uninterrupted run, through main() in this process (a reference only writes files: cli_runs.py)."""
    out = tmp_path_factory.mktemp("pref") / "run"
    assert main(argv(files, out, steps=STEPS)) == 0
    return logged(out), weights(out)


@pytest.mark.slow  # one CLI process, signalled, and a resume in this process: 10-30 s
@pytest.mark.parametrize("signals", [1, 2])
def test_sigterm_at_a_random_moment_then_resume(tmp_path, files, process_reference, signals):
    rng = random.Random()
    out = tmp_path / "run"
    wait_for = rng.randint(2, 9)
    proc = fork(["-m", "rwkvslice.cli", *argv(files, out, steps=STEPS)])  # a real process (cli_runs.py)
    try:
        deadline = time.monotonic() + 240
        while metric_lines(out) < wait_for and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))  # anywhere in a step: forward, backward, eval, checkpoint write
        proc.send_signal(signal.SIGTERM)
        if signals == 2:
            time.sleep(rng.uniform(0, 0.4))  # the second may land in the save, or after the exit
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == 143, (wait_for, proc.returncode, stderr[-2000:])
    stopped = STOP_LINE.match(stdout.strip().splitlines()[-1]) if stdout.strip() else None
    if stopped:  # a clean stop: the named checkpoint is the newest and holds the last logged step
        assert stopped.group(2) == str(metric_lines(out)) and stopped.group(3) == str(STEPS)
        assert stopped.group(4) == str(latest_checkpoint(out / "checkpoints"))
    else:  # the second signal cut the save short
        assert signals == 2 and "rwkvslice: second SIGTERM: stopped at once without saving" in stderr, stderr
    assert main(argv(files, out, "--resume", steps=STEPS)) == 0  # in this process
    assert logged(out) == process_reference[0], f"stopped after {wait_for}+ steps"
    assert_same_weights(weights(out), process_reference[1])
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------------
# 2 DDP ranks (torchrun's environment, file:// rendezvous, as in test_ddp.py). SIGTERM reaches rank 1
# only: rank 0 learns of it through the per-step all-reduce, and both stop after the same step.

DDP_STEPS = 8


def start_ranks(tmp_path, args, tag):
    rdzv = tmp_path / f"rdzv-{tag}"
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                   RWKVSLICE_DIST_INIT=f"file://{rdzv}", RWKVSLICE_DIST_TIMEOUT="120", OMP_NUM_THREADS="1")
        procs.append(fork(["-m", "rwkvslice.cli", *args], env=env))  # a real process (cli_runs.py)
    return procs


def finish_ranks(procs, timeout=300):
    """Wait for every rank, always reap. Returns their (returncode, stdout, stderr)."""
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


def ddp_argv(files, out, *extra):
    args = argv(files, out, *extra, steps=DDP_STEPS)
    args[args.index("--batch-size") + 1] = "4"  # per rank: the same 8 windows per step as one process
    args[args.index("--eval-batches") + 1] = "3"  # the whole held-out file: batch 0, 2 on rank 0, 1 on rank 1
    return args


@pytest.mark.slow  # 40-90 s: three 2-rank runs
@pytest.mark.ddp
def test_ddp_ranks_stop_at_the_same_step_and_resume_exactly(tmp_path, files):
    ref = tmp_path / "ref"
    for rc, _, err in finish_ranks(start_ranks(tmp_path, ddp_argv(files, ref), "ref")):
        assert rc == 0, err[-3000:]

    rng = random.Random()
    out = tmp_path / "run"
    wait_for = rng.randint(2, 5)
    procs = start_ranks(tmp_path, ddp_argv(files, out), "run")
    try:
        deadline = time.monotonic() + 240
        while metric_lines(out) < wait_for and procs[1].poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        procs[1].send_signal(signal.SIGTERM)
    finally:
        results = finish_ranks(procs)
    assert [rc for rc, _, _ in results] == [143, 143], [err[-2000:] for _, _, err in results]
    m = STOP_LINE.match(results[0][1].strip().splitlines()[-1])
    assert m and m.group(1) == "stopped by SIGTERM" and m.group(2) == str(metric_lines(out)), results[0][1]
    assert not results[1][1].strip()  # rank 1 says nothing: rank 0 speaks for the run
    assert m.group(4) == str(latest_checkpoint(out / "checkpoints"))
    assert json.loads((latest_checkpoint(out / "checkpoints") / "run.json").read_text())["world_size"] == 2

    for rc, _, err in finish_ranks(start_ranks(tmp_path, ddp_argv(files, out, "--resume"), "resume")):
        assert rc == 0, err[-3000:]
    assert logged(out) == logged(ref)
    assert_same_weights(weights(out), weights(ref))

    # the sharded, all-reduced eval_loss is what one process computes on that checkpoint (to fp64 rounding)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    model = RWKV7.from_pretrained(latest_checkpoint(out / "checkpoints"))
    single = evaluate_loss(model, build_dataset(files[1], get_tokenizer("byte"), 32), batch_size=4, max_batches=3)
    assert last["eval_tokens"] == single.tokens and last["eval_loss"] == pytest.approx(single.loss, rel=1e-12)


@pytest.mark.slow  # ~30 s: a real torchrun with 2 workers
@pytest.mark.ddp
def test_sigterm_to_torchrun_reaches_the_workers_and_they_checkpoint(tmp_path, files):
    """torchrun forwards SIGTERM to its workers (then SIGKILLs them after 30 s): they finish the step and
    checkpoint. torchrun itself then exits non-zero with its own SignalException, which is torch's doing."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RWKVSLICE_DIST", "RANK", "WORLD_SIZE"))}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
           "-m", "rwkvslice.cli", *ddp_argv(files, out)]
    cmd[cmd.index("--steps") + 1] = "40"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while metric_lines(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    lines = [ln for ln in stdout.splitlines() if STOP_LINE.match(ln)]
    assert len(lines) == 1, (stdout, stderr[-3000:])  # rank 0 speaks for both
    m = STOP_LINE.match(lines[0])
    assert m.group(2) == str(metric_lines(out)) and int(m.group(2)) < 40
    assert m.group(4) == str(latest_checkpoint(out / "checkpoints"))
    ckpt_io.load_trainer_files(m.group(4))  # complete


def test_a_signal_in_the_last_step_just_ends_the_run(tmp_path, files, reference, monkeypatch, capsys):
    signal_during(monkeypatch, 8)  # --steps 8
    assert main(argv(files, tmp_path / "run")) == 0
    assert capsys.readouterr().out.startswith("done: step 8, loss ")
    assert logged(tmp_path / "run") == reference[0]
