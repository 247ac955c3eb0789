"""Optimizer parameter groups (official rules) and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.errors import ConfigError
from rwkvslice.train.optim import WarmupCosine, build_optimizer, lr_factor, param_groups


@pytest.fixture(scope="module")
def model():
    return RWKV7(RWKV7Config(vocab_size=64, n_embd=32, n_layer=2, head_size=16))


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_groups_follow_the_official_rules(model):
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.1)}
    # Written out by hand from the official rule: >= 2-D and ".weight" in the name.
    expected_decay = {"emb.weight", "head.weight"}
    for i in range(2):
        expected_decay |= {f"blocks.{i}.att.{n}.weight" for n in ("receptance", "key", "value", "output")}
        expected_decay |= {f"blocks.{i}.ffn.key.weight", f"blocks.{i}.ffn.value.weight"}
    assert _names(model, groups["decay"]) == expected_decay
    assert _names(model, groups["w0"]) == {"blocks.0.att.w0", "blocks.1.att.w0"}
    no_decay = _names(model, groups["no_decay"])
    # LoRA factors are 2-D but not ".weight": no decay (as in the official trainer); so are LayerNorms.
    assert {"blocks.0.att.w1", "blocks.1.att.a2", "blocks.0.ln1.weight", "ln_out.weight",
            "blocks.0.att.x_r", "blocks.1.att.r_k"} <= no_decay
    # every trainable parameter is in exactly one group
    all_names = {n for n, _ in model.named_parameters()}
    assert len(expected_decay) + 2 + len(no_decay) == len(all_names)
    assert expected_decay | no_decay | {"blocks.0.att.w0", "blocks.1.att.w0"} == all_names
    assert groups["decay"]["weight_decay"] == 0.1
    assert groups["w0"]["weight_decay"] == 0.0 and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["w0"]["base_lr"] == 2e-3 and groups["decay"]["base_lr"] == 1e-3


def test_frozen_parameters_are_left_out():
    m = RWKV7(RWKV7Config(vocab_size=64, n_embd=32, n_layer=1, head_size=16))
    m.emb.weight.requires_grad_(False)
    groups = param_groups(m, lr=1e-3, weight_decay=0.0)
    assert all(p is not m.emb.weight for g in groups for p in g["params"])


def test_w0_moves_twice_as_far_with_adamw(model):
    """One AdamW step from zero moments moves every parameter by ~lr*sign(g); w0 by ~2*lr."""
    m = RWKV7(RWKV7Config(vocab_size=64, n_embd=32, n_layer=1, head_size=16))
    opt = build_optimizer(m, lr=1e-3, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    step_w0 = (m.blocks[0].att.w0 - before["blocks.0.att.w0"]).abs()
    step_x = (m.blocks[0].att.x_r - before["blocks.0.att.x_r"]).abs()
    # fp32 rounding of p - step: one ulp of |w0| (up to ~8) is 9.5e-7
    torch.testing.assert_close(step_w0, torch.full_like(step_w0, 2e-3), rtol=0, atol=1e-6)
    torch.testing.assert_close(step_x, torch.full_like(step_x, 1e-3), rtol=0, atol=1e-7)


def test_weight_decay_only_touches_matrices():
    m = RWKV7(RWKV7Config(vocab_size=64, n_embd=32, n_layer=1, head_size=16))
    opt = build_optimizer(m, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)  # Adam update is 0/(0+eps) = 0: only decay can move a weight
    opt.step()
    for n, p in m.named_parameters():
        if n in ("emb.weight", "blocks.0.att.key.weight"):
            torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5), rtol=1e-6, atol=0)
        elif n in ("blocks.0.att.w1", "blocks.0.att.x_r", "blocks.0.ln1.weight", "blocks.0.att.w0"):
            assert torch.equal(p, before[n]), n


def test_lr_factor_hand_computed():
    f = lambda s: lr_factor(s, total_steps=110, warmup_steps=10, min_ratio=0.1)  # noqa: E731
    assert f(1) == pytest.approx(0.1, abs=1e-12)
    assert f(5) == pytest.approx(0.5, abs=1e-12)
    assert f(10) == pytest.approx(1.0, abs=1e-12)
    # halfway through the cosine: 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55
    assert f(60) == pytest.approx(0.55, abs=1e-12)
    # a quarter: 0.1 + 0.9 * 0.5 * (1 + cos(pi/4))
    assert f(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)), abs=1e-12)
    assert f(110) == pytest.approx(0.1, abs=1e-12)
    assert f(500) == pytest.approx(0.1, abs=1e-12)  # past the end: stays at the floor
    assert lr_factor(1, total_steps=5, warmup_steps=0, min_ratio=0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 5)), abs=1e-12)
    assert lr_factor(3, total_steps=3, warmup_steps=5, min_ratio=0.0) == pytest.approx(0.6)


def test_schedule_sets_every_group(model):
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.01)
    sched = WarmupCosine(opt, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    sched.apply(5)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["decay"] == pytest.approx(5e-4) and lrs["no_decay"] == pytest.approx(5e-4)
    assert lrs["w0"] == pytest.approx(1e-3)
    state = sched.state_dict()
    other = WarmupCosine(opt, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    other.load_state_dict(state)
    assert other.last_step == 5


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": 0.0, "weight_decay": 0.0}, "--lr"),
    ({"lr": float("nan"), "weight_decay": 0.0}, "--lr"),
    ({"lr": 1e-3, "weight_decay": -1.0}, "--weight-decay"),
    ({"lr": 1e-3, "weight_decay": 0.0, "eps": 0.0}, "--adam-eps"),
])
def test_bad_optimizer_arguments(model, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_optimizer(model, **kwargs)


def test_bad_schedule_arguments(model):
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    with pytest.raises(ConfigError, match="--steps"):
        WarmupCosine(opt, total_steps=0, warmup_steps=0, min_lr_ratio=0.1)
    with pytest.raises(ConfigError, match="--min-lr"):
        WarmupCosine(opt, total_steps=10, warmup_steps=0, min_lr_ratio=2.0)
    with pytest.raises(ConfigError, match=r"^--warmup-steps must be >= 0, got -1$"):
        WarmupCosine(opt, total_steps=10, warmup_steps=-1, min_lr_ratio=0.1)


def test_no_cosine_left_after_a_warmup_as_long_as_the_run():
    """warmup_steps >= total_steps: the LR ramps up and then stays at the peak (no decay phase to run)."""
    f = lambda s: lr_factor(s, total_steps=4, warmup_steps=4, min_ratio=0.1)  # noqa: E731
    assert [f(s) for s in (1, 2, 3, 4, 5, 9)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(7, total_steps=4, warmup_steps=6, min_ratio=0.0) == 1.0


@pytest.mark.parametrize("eps, expected_step", [
    (1e-8, 1e-3 * 1e-17 / (1e-17 + 1e-8)),    # default: a noise-level gradient does nothing
    (1e-18, 1e-3 * 1e-17 / (1e-17 + 1e-18)),  # official demo value: ~0.9 lr for the same gradient
])
def test_adam_eps_and_noise_level_gradients(eps, expected_step):
    """Why the default eps is 1e-8 (see optim.py): first AdamW step = lr * g / (|g| + eps)."""
    m = torch.nn.Module()
    m.register_parameter("x_r", torch.nn.Parameter(torch.zeros(4)))
    opt = build_optimizer(m, lr=1e-3, weight_decay=0.0, eps=eps)
    m.x_r.grad = torch.full((4,), 1e-17)
    opt.step()
    torch.testing.assert_close(-m.x_r.detach(), torch.full((4,), expected_step), rtol=1e-5, atol=1e-20)
