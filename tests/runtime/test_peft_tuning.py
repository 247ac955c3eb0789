"""rwkvslice.peft.tuning: what trains (--tune, --train-also), frozen tensors, tuned checkpoint files."""

from __future__ import annotations

import copy

import pytest
import torch

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.errors import CheckpointError, ConfigError
from rwkvslice.peft import TuneSpec, lora_modules, prepare
from rwkvslice.peft.tuning import keep_frozen_in_bf16, load_trainable, part_of, read_tuned, save_tuned
from rwkvslice.train.optim import build_optimizer
from rwkvslice.train.step import autocast_context

pytestmark = pytest.mark.component("PEFT")


def make_model(seed=0):
    torch.manual_seed(seed)
    model = RWKV7(RWKV7Config(vocab_size=96, n_embd=64, n_layer=2, head_size=32))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (2, 16), generator=g), torch.randint(0, 96, (2, 16), generator=g)


SPECS = {
    "lora": TuneSpec(kind="lora", lora_r=4, lora_alpha=8),
    "lora+time,ln": TuneSpec(kind="lora", lora_r=4, lora_alpha=8, train_also=("time", "ln")),
    "pissa": TuneSpec(kind="lora", lora_r=4, lora_alpha=8, lora_init="pissa"),
    "state": TuneSpec(kind="state"),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_only_trainable_tensors_get_gradients_and_optimizer_state(name):
    model = make_model()
    prepare(model, SPECS[name])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if name == "state":
        assert list(trainable) == ["initial_state"]
    else:
        assert all("lora_" in n or part_of(n) in SPECS[name].train_also for n in trainable)
        assert sum("lora_" in n for n in trainable) == 2 * 6 * 2
    if name == "lora+time,ln":
        assert "blocks.1.att.w0" in trainable and "ln_out.weight" in trainable and "emb.weight" in frozen
    opt = build_optimizer(model, lr=1e-2, weight_decay=1e-3)
    for step in range(3):
        model.loss(*batch(step)).backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)
    optimized = {id(p) for p in opt.state}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}


def test_spec_validation_is_one_line():
    for spec, msg in [
        (TuneSpec(kind="state", train_also=("ln",)), "--tune state trains only the initial state"),
        (TuneSpec(kind="full", train_also=("ln",)), "--train-also needs --tune lora"),
        (TuneSpec(kind="lora", train_also=("bias",)), "--train-also: unknown part 'bias'"),
        (TuneSpec(kind="lora", lora_r=0), "--lora-r must be >= 1"),
        (TuneSpec(kind="lora", lora_targets=("head",)), "unknown module 'head'"),
        (TuneSpec(kind="prefix"), "--tune must be one of full, lora, state"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            spec.validate()


@pytest.mark.parametrize("name", ["lora", "pissa", "state"])
def test_tuned_checkpoint_files_round_trip(tmp_path, name):
    model = make_model()
    prepare(model, SPECS[name])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    save_tuned(model, tmp_path, base={"init_from": None, "sha256": "x"})
    spec, base, tensors, factors = read_tuned(tmp_path)
    assert spec == SPECS[name] and base["sha256"] == "x" and (bool(factors) == (name == "pissa"))
    again = make_model()
    prepare(again, spec, pissa_factors=factors or None)
    load_trainable(again, tensors, str(tmp_path))
    idx, _ = batch(0)
    assert torch.equal(again(idx), model(idx))
    tensors["blocks.0.att.bogus"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="do not match the run's --tune settings"):
        load_trainable(again, tensors, str(tmp_path))


def test_frozen_linear_weights_in_bf16_give_the_same_autocast_loss():
    """Under bf16 autocast every linear casts its weight to bf16, so storing the frozen ones in bf16
    changes nothing (bit for bit) while trainable tensors keep fp32 masters."""
    model = make_model()
    prepare(model, SPECS["lora"])
    idx, targets = batch(1)
    with autocast_context("bf16", torch.device("cpu")):
        want = model.loss(idx, targets)
    lean = copy.deepcopy(model)
    assert keep_frozen_in_bf16(lean) == 2 * 6
    assert all(m.weight.dtype == torch.bfloat16 and m.lora_A.dtype == torch.float32
               for m in lora_modules(lean).values())
    assert lean.head.weight.dtype == torch.float32 and lean.emb.weight.dtype == torch.float32
    with autocast_context("bf16", torch.device("cpu")):
        got = lean.loss(idx, targets)
    assert torch.equal(got, want)
    got.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lean.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["lora", "state"])
def test_accumulation_and_grad_checkpointing_give_the_one_batch_gradient(name):
    """train_step over 2 micro-batches (and with per-block, per-segment recomputation) updates the
    trainable tensors as one batch does: SGD lr 1 makes the update the gradient itself. Tolerance rel 1e-4:
    the update is read back as before - after, so fp32 rounding of the weights (~6e-8 of |w| ~ 0.1-1)
    shows against updates of ~5e-4 (measured 2e-6); a normalisation bug is off by O(1)."""
    from rwkvslice.train.distributed import DistEnv
    from rwkvslice.train.step import LossModule, train_step

    idx, targets = torch.randint(0, 96, (4, 16)), torch.randint(0, 96, (4, 16))
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    updates = []
    for micro, checkpointing in (([(idx, targets)], False), ([(idx[:1], targets[:1]), (idx[1:], targets[1:])], False),
                                 ([(idx, targets)], True)):
        model = make_model()
        prepare(model, SPECS[name])
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.normal_(0, 0.05)
            if name == "state":
                model.initial_state.normal_(0, 0.3)
        model.grad_checkpointing, model.grad_checkpoint_len = checkpointing, 5
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        train_step(LossModule(model), opt, micro, env, grad_clip=0.0)
        updates.append({n: before[n] - p.detach() for n, p in model.named_parameters() if n in before})
    for other in updates[1:]:
        for n, u in updates[0].items():
            assert ((other[n] - u).norm() / u.norm()).item() < 1e-4, n
