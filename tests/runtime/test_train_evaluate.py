"""train/evaluate.py: the held-out loss shared by `rwkvslice train --eval-data` and `rwkvslice eval --data`,
against an independent reference (full logits, masked CE in fp64, one window at a time)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.data import DemoTask, build_dataset
from rwkvslice.train.evaluate import EvalResult, HeldOutEval, batch_ranges, evaluate_loss, metrics_of

pytestmark = pytest.mark.component("Held-out Evaluation")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = RWKV7(RWKV7Config(vocab_size=256, n_embd=64, n_layer=2, head_size=32))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every layer contributes (the official init zeroes output projections)
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = DemoTask(seed=3).write_jsonl(tmp_path_factory.mktemp("ev") / "eval.jsonl", 11, "train")
    return build_dataset(path, "byte", 32)


def reference(model, dataset, windows):
    total, kept = 0.0, 0
    with torch.no_grad():
        for i in windows:
            idx, targets = dataset[i]
            logits = model(idx[None])[0].double()
            total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            kept += int((targets != -100).sum())
    return total / kept, kept


def test_batch_ranges():
    assert batch_ranges(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert batch_ranges(7, 3, max_batches=2) == [range(0, 3), range(3, 6)]
    assert batch_ranges(2, 5, max_batches=9) == [range(0, 2)]


@pytest.mark.parametrize("batch_size, max_batches", [(4, None), (3, 2), (20, None), (1, 5)])
def test_mean_ce_over_kept_tokens_matches_full_logits(model, dataset, batch_size, max_batches):
    res = evaluate_loss(model, dataset, batch_size=batch_size, max_batches=max_batches)
    n = len(dataset) if max_batches is None else min(len(dataset), batch_size * max_batches)
    ref_loss, ref_kept = reference(model, dataset, range(n))
    assert res.tokens == ref_kept and res.windows == n
    assert res.batches == math.ceil(n / batch_size)
    assert res.loss == pytest.approx(ref_loss, rel=1e-5)  # fp32 sliced CE vs fp64 full logits
    assert res.ppl == pytest.approx(math.exp(ref_loss), rel=1e-5)


def test_restores_the_models_mode_and_keeps_gradients_off(model, dataset):
    model.train()
    evaluate_loss(model, dataset, batch_size=4)
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    evaluate_loss(model, dataset, batch_size=4)
    assert not model.training


def test_held_out_schedule_and_best_so_far(model, dataset, monkeypatch):
    ev = HeldOutEval(dataset, every=3, batch_size=4, max_batches=None, last_step=10)
    assert [s for s in range(1, 11) if ev.due(s)] == [3, 6, 9, 10]
    scripted = iter([2.0, 1.5, float("nan"), 1.7, 1.2])
    monkeypatch.setattr("rwkvslice.train.evaluate.evaluate_loss",
                        lambda *a, **k: EvalResult(loss=next(scripted), tokens=5, windows=2, batches=1))
    news = [ev.run(step, model, None)[1] for step in (3, 6, 9, 10)]
    assert news == [True, True, False, False] and (ev.best_step, ev.best_loss) == (6, 1.5)
    other = HeldOutEval(dataset, every=3, batch_size=4, max_batches=None, last_step=10)
    other.load_state_dict(ev.state_dict())
    assert other.run(12, model, None) == (EvalResult(1.2, 5, 2, 1), True) and other.best_step == 12


def test_metrics_fields():
    assert metrics_of(EvalResult(loss=2.0, tokens=7, windows=1, batches=1)) == {
        "eval_loss": 2.0, "eval_ppl": math.exp(2.0), "eval_tokens": 7}
    assert metrics_of(EvalResult(loss=float("nan"), tokens=0, windows=0, batches=0)) == {
        "eval_loss": None, "eval_ppl": None, "eval_tokens": 0}
