"""`rwkvslice train --eval-data`: eval_loss/eval_ppl/eval_tokens on the step records, equal (bit for bit)
to what `rwkvslice eval --ckpt CKPT --data PATH` reports for that step's checkpoint; --keep-best keeps the
best checkpoint through rotation and resume; --tensorboard mirrors metrics.jsonl; a refused --init-from
pickle is one line."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from rwkvslice.cli import main
from rwkvslice.data import DemoTask
from rwkvslice.train.evaluate import EvalResult
from rwkvslice.train.trainer import TrainConfig, train

pytestmark = pytest.mark.component("Held-out Evaluation")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return (DemoTask(seed=1).write_jsonl(base / "train.jsonl", 48, "train"),
            DemoTask(seed=5).write_jsonl(base / "heldout.jsonl", 13, "train"))


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


TRAIN = ["--model", "demo", "--ctx-len", "32", "--batch-size", "4", "--lr", "2e-3", "--warmup-steps", "1",
         "--no-progress", "--device", "cpu"]


def test_eval_loss_equals_rwkvslice_eval_of_that_checkpoint(tmp_path, files, capsys):
    data, heldout = files
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--steps", "5", *TRAIN, "--eval-data",
                 str(heldout), "--eval-every", "2", "--eval-batches", "3", "--save-every", "2", "--keep", "9"]) == 0
    recs = records(out)
    assert [r["step"] for r in recs if "eval_loss" in r] == [2, 4, 5]  # every 2 steps and at the end
    capsys.readouterr()
    for rec in recs:
        if "eval_loss" not in rec:
            continue
        ckpt = out / "checkpoints" / f"step-{rec['step']:08d}"
        # no --batch-size/--batches: they default to the run's own (4 windows, its --eval-batches 3)
        assert main(["eval", "--ckpt", str(ckpt), "--data", str(heldout)]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["batches"] == 3 and got["batch_size"] == 4 and got["windows"] == 12
        assert rec["eval_loss"] == got["loss"] and rec["eval_tokens"] == got["kept_tokens"] > 0
        assert rec["eval_ppl"] == got["perplexity"] == math.exp(got["loss"])
    # the held-out loss is a different number from the training loss, and it moved as the model trained
    evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
    assert len(set(evals)) == 3 and all(math.isfinite(v) for v in evals)
    # the whole file (another --batches) is another, independently checked number (test_train_evaluate.py)
    assert main(["eval", "--ckpt", str(out / "checkpoints" / "step-00000005"), "--data", str(heldout),
                 "--batches", "99"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["windows"] == 13 and whole["kept_tokens"] > recs[-1]["eval_tokens"]


def test_progress_bar_shows_the_held_out_loss(tmp_path, files, capsys):
    data, heldout = files
    cfg = TrainConfig(out=str(tmp_path / "run"), data=str(data), eval_data=str(heldout), model="demo",
                      ctx_len=32, batch_size=4, steps=2, eval_every=1, eval_batches=1, device="cpu")
    train(cfg, log=lambda m: None)
    last = records(tmp_path / "run")[-1]
    assert f"eval {last['eval_loss']:.4f}" in capsys.readouterr().err


class Crash(BaseException):
    """Stands in for the process dying."""


def keep_best_run(out, data, heldout, monkeypatch, *, losses, crash_at=None, resume=False, **kw):
    """A run whose evaluations return scripted losses (losses[step]), so which step is best is known."""
    now = {}

    def fake_evaluate(*args, **kwargs):
        return EvalResult(loss=losses[now["step"]], tokens=10, windows=2, batches=1)

    def hook(step, model):
        now["step"] = step
        if step == crash_at:
            raise Crash

    monkeypatch.setattr("rwkvslice.train.evaluate.evaluate_loss", fake_evaluate)
    cfg = dict(out=str(out), data=str(data), eval_data=str(heldout), keep_best=True, eval_every=1, model="demo",
               ctx_len=32, batch_size=4, steps=6, lr=2e-3, warmup_steps=1, keep=1, progress=False, device="cpu",
               resume=resume)
    cfg.update(kw)
    train(TrainConfig(**cfg), after_step=hook, log=lambda m: None)


def checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def best(out):
    return json.loads((out / "best.json").read_text())


LOSSES = {1: 3.0, 2: 1.0, 3: 2.0, 4: 4.0, 5: 0.5, 6: 0.7}


def test_keep_best_survives_rotation_and_resume(tmp_path, files, monkeypatch):
    data, heldout = files
    ref = tmp_path / "ref"
    keep_best_run(ref, data, heldout, monkeypatch, losses=LOSSES)
    assert checkpoints(ref) == ["step-00000005", "step-00000006"]  # --keep 1, plus the best
    assert best(ref) == {"step": 5, "checkpoint": "checkpoints/step-00000005", "eval_loss": 0.5}

    run = tmp_path / "run"
    with pytest.raises(Crash):
        keep_best_run(run, data, heldout, monkeypatch, losses=LOSSES, crash_at=4)
    # a new best is checkpointed when it happens (steps 1, 2; --keep 1 rotated step 1 away); 3 is no best
    assert checkpoints(run) == ["step-00000002"]
    assert best(run) == {"step": 2, "checkpoint": "checkpoints/step-00000002", "eval_loss": 1.0}
    keep_best_run(run, data, heldout, monkeypatch, losses=LOSSES, resume=True)  # best-so-far 1.0 restored:
    assert checkpoints(run) == checkpoints(ref) and best(run) == best(ref)  # 4.0 and 2.0 are not new bests
    strip = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_time_s")} for r in records(run)]
    assert strip == [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_time_s")}
                     for r in records(ref)]


def test_an_old_best_is_kept_beside_the_newest(tmp_path, files, monkeypatch):
    data, heldout = files
    keep_best_run(tmp_path, data, heldout, monkeypatch, losses={s: float(s) for s in range(1, 7)},
                  save_every=1, keep=2)
    assert checkpoints(tmp_path) == ["step-00000001", "step-00000005", "step-00000006"]
    assert best(tmp_path)["step"] == 1


@pytest.mark.parametrize("argv, needle", [
    (["--keep-best"], "--keep-best, --eval-every and --eval-batches need --eval-data"),
    (["--eval-every", "3"], "need --eval-data"),
    (["--eval-data", "EVAL", "--eval-every", "0"], "--eval-every must be >= 1, got 0"),
    (["--eval-data", "EVAL", "--eval-batches", "-1"], "--eval-batches must be >= 1, got -1"),
    (["--eval-data", "nope.jsonl"], "nope.jsonl: no such file"),
])
def test_bad_eval_flags_are_one_line_and_leave_nothing(tmp_path, files, capsys, argv, needle):
    data, heldout = files
    argv = [str(heldout) if a == "EVAL" else str(tmp_path / a) if a.endswith(".jsonl") else a for a in argv]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "X"), *TRAIN, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rwkvslice: error: ") and needle in err[0], err
    assert not (tmp_path / "X").exists()


@pytest.mark.parametrize("flag", ["--batches", "--batch-size"])
def test_bad_eval_batches_is_one_line(tmp_path, files, capsys, flag):
    assert main(["eval", "--ckpt", str(tmp_path), "--data", str(files[1]), flag, "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rwkvslice: error: {flag} must be >= 1, got 0"]


def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(tmp_path, files):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    data, heldout = files
    cfg = TrainConfig(out=str(tmp_path / "run"), data=str(data), eval_data=str(heldout), model="demo",
                      ctx_len=32, batch_size=4, steps=3, eval_every=2, eval_batches=1, progress=False,
                      device="cpu", tensorboard=str(tmp_path / "tb"))
    train(cfg, log=lambda m: None)
    acc = ea.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    got = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    want = {(k, r["step"]): v for r in records(tmp_path / "run") for k, v in r.items()
            if k != "step" and isinstance(v, (int, float))}
    assert got.keys() == want.keys() and ("eval_loss", 2) in got
    for key, value in want.items():  # TensorBoard stores float32
        assert got[key] == pytest.approx(value, rel=1e-6), key


def test_init_from_a_pickle_with_objects_is_refused_in_one_line(tmp_path, files, capsys):
    data, _ = files
    bad = tmp_path / "bad.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "args": argparse.Namespace(lr=1)}, bad)
    assert main(["train", "--data", str(data), "--init-from", str(bad), "--out", str(tmp_path / "X"),
                 "--ctx-len", "32", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rwkvslice: error: {bad}: refusing to load: it holds arbitrary "
                                               "Python objects (argparse.Namespace)"), err
    assert "weights_only=False" not in err[0] and "trust" not in err[0]
    assert not (tmp_path / "X").exists()


# Under DDP every rank evaluates its share of the batches (i % world_size) and gets the all-reduced total.
EVAL_WORKER = """
import json, sys
from rwkvslice.data import build_dataset
from rwkvslice.train.distributed import setup_distributed, teardown_distributed
from rwkvslice.train.evaluate import evaluate_loss
sys.path.insert(0, sys.argv[3])
from test_train_eval import make_eval_model

env = setup_distributed("cpu")
try:
    ds = build_dataset(sys.argv[2], "byte", 32)
    res = evaluate_loss(make_eval_model(), ds, batch_size=3, env=env)
    with open(f"{sys.argv[1]}/rank{env.rank}.json", "w") as f:
        json.dump({"loss": res.loss, "tokens": res.tokens, "windows": res.windows, "batches": res.batches}, f)
finally:
    teardown_distributed(env)
"""


def make_eval_model():
    from rwkvslice import RWKV7, RWKV7Config

    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(vocab_size=256, n_embd=64, n_layer=2, head_size=32))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every layer contributes (the official init zeroes output projections)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.ddp
def test_ddp_eval_is_sharded_and_every_rank_gets_the_same_number(tmp_path, files):
    import os
    import sys

    from test_ddp import WORLD, launch

    from rwkvslice.data import build_dataset
    from rwkvslice.train.evaluate import evaluate_loss

    _, heldout = files  # 13 windows in batches of 3: 5 batches, 3 on rank 0 and 2 on rank 1
    here = os.path.dirname(__file__)
    for rc, err in launch(tmp_path, lambda r: [sys.executable, "-c", EVAL_WORKER, str(tmp_path), str(heldout), here]):
        assert rc == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    single = evaluate_loss(make_eval_model(), build_dataset(heldout, "byte", 32), batch_size=3)
    assert ranks[0] == ranks[1]  # bit for bit the same on every rank
    assert ranks[0]["tokens"] == single.tokens and ranks[0]["windows"] == 13 and ranks[0]["batches"] == 5
    assert ranks[0]["loss"] == pytest.approx(single.loss, rel=1e-12)  # fp64 sums in another order
