"""The training loop in-process: learning, accumulation == big batch, save -> load -> generate,
non-finite handling, argument checks."""

from __future__ import annotations

import json

import pytest
import torch

from rwkvslice.data import DemoTask, get_tokenizer
from rwkvslice.errors import ConfigError
from rwkvslice.generate import generate
from rwkvslice.generate.loading import load_model
from rwkvslice.train import step as step_mod
from rwkvslice.train.checkpoint import latest_checkpoint, list_checkpoints
from rwkvslice.train.distributed import DistEnv
from rwkvslice.train.optim import build_optimizer
from rwkvslice.train.trainer import NonFiniteError, TrainConfig, train


@pytest.fixture(scope="module")
def demo_jsonl(tmp_path_factory):
    return DemoTask(seed=0).write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", 400, "train")


def small(out, data, **kw):
    base = dict(out=str(out), data=str(data), tokenizer="byte", model="demo", ctx_len=32, batch_size=8,
                lr=1e-3, warmup_steps=2, steps=6, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_goes_down_and_everything_is_logged(tmp_path, demo_jsonl):
    res = train(small(tmp_path, demo_jsonl, steps=40, save_every=20, keep=5), log=lambda m: None)
    recs = metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 41))
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-5:]) / 5
    # from ~ln(320) = 5.8 to the format of the answer (digit + eod): well below half
    assert first > 5.0 and last < 0.4 * first, (first, last)
    for r in recs:
        assert set(r) >= {"step", "loss", "lr", "tokens", "kept_tokens", "tokens_per_s"}
        assert r["tokens"] == 8 * 32 and 0 < r["kept_tokens"] < r["tokens"]
    assert recs[0]["lr"] == pytest.approx(0.5e-3) and recs[1]["lr"] == pytest.approx(1e-3)
    assert recs[-1]["lr"] == pytest.approx(1e-4)  # cosine reaches min_lr = lr / 10 at the last step
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [20, 40]
    assert res.last_loss == recs[-1]["loss"]
    assert (tmp_path / "loss.png").is_file()


def test_save_load_generate_is_consistent(tmp_path, demo_jsonl):
    res = train(small(tmp_path, demo_jsonl, steps=3), log=lambda m: None)
    loaded, tok, weights, run_info = load_model(tmp_path)
    assert weights == latest_checkpoint(tmp_path / "checkpoints") and run_info["tokenizer"] == "byte"
    assert tok.name == "byte"
    for (name, a), (_, b) in zip(res.model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a.cpu(), b), name
    prompts = [tok.encode(s["prompt"]) for s in DemoTask(seed=0).samples(4, "heldout")]
    a = generate(res.model, prompts, max_new_tokens=5, temperature=0.8, top_p=0.9, seed=1)
    b = generate(loaded, prompts, max_new_tokens=5, temperature=0.8, top_p=0.9, seed=1)
    assert a == b


def _batch(seed, b, t=16, vocab=320):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, vocab, (b, t), generator=g)
    targets = torch.randint(1, vocab, (b, t), generator=g)
    keep = torch.rand(b, t, generator=g) < torch.linspace(0.1, 0.9, b)[:, None]  # uneven per row
    return idx, torch.where(keep, targets, torch.full_like(targets, -100))


def _one_step(micro, seed=0):
    from rwkvslice import RWKV7, RWKV7Config

    torch.manual_seed(seed)
    model = RWKV7(RWKV7Config(vocab_size=320, n_embd=64, n_layer=2, head_size=32))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the official init zeroes output projections: make every gradient non-trivial
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    grads = {}
    real_step = opt.step

    def step(*args, **kwargs):  # the gradients exactly as the optimizer receives them
        grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
        return real_step(*args, **kwargs)

    opt.step = step
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    stats = step_mod.train_step(step_mod.LossModule(model), opt, micro, env, grad_clip=0.0)
    return grads, stats


def test_grad_accumulation_equals_one_big_batch():
    idx, targets = _batch(0, 6)
    big_grads, big = _one_step([(idx, targets)])
    # uneven micro-batches: 1 + 2 + 3 rows with different kept counts
    acc_grads, acc = _one_step([(idx[:1], targets[:1]), (idx[1:3], targets[1:3]), (idx[3:], targets[3:])])
    assert big.kept_tokens == acc.kept_tokens == int((targets != -100).sum())
    assert acc.loss == pytest.approx(big.loss, rel=1e-6)
    assert acc.grad_norm == pytest.approx(big.grad_norm, rel=1e-5)
    assert big_grads.keys() == acc_grads.keys() and len(big_grads) > 0
    for n in big_grads:
        # the same sums in another order (3 partial sums vs 1): fp32, relative to the tensor's norm
        # (elementwise, entries that cancel to ~0 carry large relative noise)
        err = ((acc_grads[n].double() - big_grads[n].double()).norm() / big_grads[n].double().norm()).item()
        assert err < 1e-5, (n, err)


def test_all_ignored_step_is_finite_and_leaves_weights(tmp_path):
    idx, targets = _batch(0, 2)
    grads, stats = _one_step([(idx, torch.full_like(targets, -100))])
    assert stats.loss == 0.0 and stats.kept_tokens == 0 and stats.nonfinite is None
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())  # no loss, no gradient


def _poison_loss_at(monkeypatch, calls_to_poison):
    real = step_mod.LossModule.forward
    count = {"n": 0}

    def forward(self, idx, targets, num_items):
        count["n"] += 1
        loss = real(self, idx, targets, num_items)
        return loss * float("nan") if count["n"] in calls_to_poison else loss

    monkeypatch.setattr(step_mod.LossModule, "forward", forward)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, demo_jsonl, monkeypatch):
    _poison_loss_at(monkeypatch, {3})
    with pytest.raises(NonFiniteError, match=r"^step 3: non-finite loss \(micro-batch 1\).*step-00000002"):
        train(small(tmp_path, demo_jsonl, save_every=2), log=lambda m: None)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
    monkeypatch.undo()
    load_model(tmp_path)  # the surviving checkpoint loads


def test_nonfinite_gradient_names_the_tensor(tmp_path, demo_jsonl):
    def poison(step, model):
        if step == 1:
            model.blocks[1].att.w0.register_hook(lambda g: g * float("inf"))

    with pytest.raises(NonFiniteError, match=r"step 2: non-finite gradient of blocks\.1\.att\.w0"):
        train(small(tmp_path, demo_jsonl), after_step=poison, log=lambda m: None)


def test_skip_nonfinite_skips_the_step_without_touching_weights(tmp_path, demo_jsonl, monkeypatch):
    _poison_loss_at(monkeypatch, {3})
    snapshots = {}

    def snap(step, model):
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}

    res = train(small(tmp_path, demo_jsonl, skip_nonfinite=True), after_step=snap, log=lambda m: None)
    recs = metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[2]["loss"] is None and recs[2]["skipped"].startswith("loss")
    assert all(r["loss"] is not None for i, r in enumerate(recs) if i != 2)
    for k in snapshots[2]:
        assert torch.equal(snapshots[2][k], snapshots[3][k]), k
    assert any(not torch.equal(snapshots[3][k], snapshots[4][k]) for k in snapshots[3])
    assert res.step == 6


def test_existing_run_needs_resume_and_same_arguments(tmp_path, demo_jsonl):
    train(small(tmp_path, demo_jsonl, steps=2), log=lambda m: None)
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume"):
        train(small(tmp_path, demo_jsonl, steps=4), log=lambda m: None)
    with pytest.raises(ConfigError, match="--lr is 0.002 but .* was trained with 0.001"):
        train(small(tmp_path, demo_jsonl, steps=4, lr=2e-3, resume=True), log=lambda m: None)


@pytest.mark.parametrize("kw, match", [
    ({"precision": "fp16"}, "fp16 is not supported.*bf16"),
    ({"precision": "int8"}, "--precision"),
    ({"steps": 0}, "--steps"),
    ({"ctx_len": 1}, "--ctx-len"),
    ({"min_lr": 1.0}, "--min-lr"),
    ({"model": "huge"}, "unknown model preset"),
    ({"model": "missing.json"}, "no such config file"),
    ({"batch_size": 1000}, "fewer than one batch"),
    ({"grad_checkpoint_len": 0}, "--grad-checkpoint-len"),
])
def test_bad_configuration(tmp_path, demo_jsonl, kw, match):
    with pytest.raises(ConfigError, match=match):
        train(small(tmp_path / "run", demo_jsonl, **kw), log=lambda m: None)
    assert not (tmp_path / "run").exists()  # a user error leaves no run directory behind


def test_out_that_is_a_file_is_a_config_error(tmp_path, demo_jsonl):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(ConfigError, match="--out .*run exists and is not a directory"):
        train(small(tmp_path / "run", demo_jsonl), log=lambda m: None)


def test_model_from_json_config(tmp_path, demo_jsonl):
    cfg_path = tmp_path / "model.json"
    cfg_path.write_text(json.dumps({"n_embd": 64, "n_layer": 1, "head_size": 32}))
    res = train(small(tmp_path / "run", demo_jsonl, steps=1, model=str(cfg_path)), log=lambda m: None)
    c = res.model.config
    assert (c.n_embd, c.n_layer, c.head_size, c.vocab_size) == (64, 1, 32, get_tokenizer("byte").vocab_size)


def test_init_from_an_official_pth_starts_from_its_weights(tmp_path, demo_jsonl):
    from rwkvslice import RWKV7, RWKV7Config
    from rwkvslice.data import ResumableLoader, build_dataset

    torch.manual_seed(7)
    base = RWKV7(RWKV7Config(vocab_size=320, n_embd=64, n_layer=1, head_size=32))
    with torch.no_grad():
        base.head.weight.mul_(3.0)  # distinguishable from a fresh init
    base.save_official(tmp_path / "base.pth")
    # independent expectation: the official model's loss on the first batch the loader yields
    ds = build_dataset(demo_jsonl, get_tokenizer("byte"), 32)
    idx, targets = next(iter(ResumableLoader(ds, 8, seed=0)))
    with torch.no_grad():
        expected = float(RWKV7.from_official(tmp_path / "base.pth").loss(idx, targets))
    res = train(small(tmp_path / "run", demo_jsonl, steps=2, model="tiny", init_from=str(tmp_path / "base.pth")),
                log=lambda m: None)
    assert res.model.config.n_embd == 64 and res.model.config.n_layer == 1
    assert metrics(tmp_path / "run")[0]["loss"] == pytest.approx(expected, rel=1e-6)


def test_world_tokenizer_run(tmp_path):
    try:
        tok = get_tokenizer("world")
    except Exception as exc:  # the optional `rwkv` extra ships the vocab file
        pytest.skip(f"World tokenizer unavailable: {exc}")
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"document {i}: 你好, world! " * 8 for i in range(40)))
    res = train(small(tmp_path / "run", text, tokenizer="world", steps=2, ctx_len=64, batch_size=2),
                log=lambda m: None)
    assert res.model.config.vocab_size == tok.vocab_size == 65536
    assert all(r["loss"] > 0 for r in metrics(tmp_path / "run"))


def test_grad_checkpoint_run_equals_plain_run(tmp_path, demo_jsonl, monkeypatch):
    """--grad-checkpoint changes memory, not the trajectory: the same losses and final weights, bit for
    bit; and the trainer really turns checkpointing on (torch.utils.checkpoint is entered per block)."""
    from rwkvslice.cli import main
    from rwkvslice.model import rwkv7 as rwkv7_mod

    calls = []
    real = rwkv7_mod.checkpoint
    monkeypatch.setattr(rwkv7_mod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = train(small(tmp_path / "plain", demo_jsonl, steps=3), log=lambda m: None)
    assert not calls
    common = ["--data", str(demo_jsonl), "--model", "demo", "--ctx-len", "32", "--batch-size", "8", "--lr", "1e-3",
              "--warmup-steps", "2", "--steps", "3", "--no-progress", "--device", "cpu"]
    assert main(["train", *common, "--out", str(tmp_path / "ckpt"), "--grad-checkpoint"]) == 0
    n_layer = len(plain.model.blocks)
    assert len(calls) == 3 * n_layer  # one checkpointed region per block per step
    assert [r["loss"] for r in metrics(tmp_path / "ckpt")] == [r["loss"] for r in metrics(tmp_path / "plain")]
    again = load_model(tmp_path / "ckpt")[0]
    for (name, a), (_, b) in zip(plain.model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a.cpu(), b), name
    # in time segments (8 tokens of the 32-token windows): every block on every segment, same losses
    # to fp32 rounding (the segments' gradients are summed in another order)
    calls.clear()
    assert main(["train", *common, "--out", str(tmp_path / "seg"), "--grad-checkpoint-len", "8"]) == 0
    assert len(calls) == 3 * n_layer * 4
    seg_losses = [r["loss"] for r in metrics(tmp_path / "seg")]
    assert seg_losses == pytest.approx([r["loss"] for r in metrics(tmp_path / "plain")], rel=1e-5)
