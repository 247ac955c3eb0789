"""RWKV7's public API edges: the state container's helpers, shape errors of hidden_states / forward /
loss, and the differentiable RNN step of a bf16 model (its WKV recurrence runs in fp32)."""

from __future__ import annotations

import copy

import pytest
import torch

from rwkvslice import RWKV7, RWKV7Config

pytestmark = pytest.mark.component("Architecture")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = RWKV7(RWKV7Config(vocab_size=50, n_embd=32, n_layer=2, head_size=16))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the official init zeroes the output projections: make every layer matter
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return m.eval()


def _filled_state(model, batch):
    s = model.init_state(batch)
    g = torch.Generator().manual_seed(5)
    for t in (s.att_shift, s.wkv, s.ffn_shift):
        t.copy_(torch.randn(t.shape, generator=g))
    return s


def test_state_clone_to_and_index_select(model):
    s = _filled_state(model, 3)
    assert s.batch_size == 3
    c = s.clone()
    c.wkv.zero_()
    assert s.wkv.abs().sum() > 0  # the clone owns its memory
    moved = s.to("cpu")
    assert all(torch.equal(a, b) for a, b in zip((moved.att_shift, moved.wkv, moved.ffn_shift),
                                                 (s.att_shift, s.wkv, s.ffn_shift)))
    picked = s.index_select(torch.tensor([2, 0]))
    assert picked.batch_size == 2
    assert torch.equal(picked.wkv[:, 0], s.wkv[:, 2]) and torch.equal(picked.att_shift[:, 1], s.att_shift[:, 0])
    assert torch.equal(picked.ffn_shift[:, 0], s.ffn_shift[:, 2])


def test_shape_errors(model):
    idx = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^idx must be \(B, T\), got shape \(5,\)$"):
        model.hidden_states(idx[0])
    with pytest.raises(ValueError, match=r"^positions must be \(B, K\), got shape \(1, 2\)$"):
        model(idx, positions=torch.tensor([[0, 1]]))  # one row for a batch of two
    with pytest.raises(ValueError, match=r"^positions must be \(B, K\), got shape \(2,\)$"):
        model(idx, positions=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^targets \(2, 4\) must have the shape of idx \(2, 5\)$"):
        model.loss(idx, torch.zeros(2, 4, dtype=torch.long))


def test_differentiable_step_of_a_bf16_model_keeps_an_fp32_state(model):
    """With gradients enabled, model.step runs GPT mode on T = 1; for a bf16 model the single-step WKV
    upcasts its bf16 inputs and keeps the state fp32. Reference: the fp32 model's step (tolerance 3e-2:
    bf16 weights and activations over 2 layers and 8 tokens, as in test_model.py)."""
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(9))
    s32, s16 = model.init_state(2), m16.init_state(2)
    for t in range(idx.shape[1]):
        with torch.no_grad():
            l32, s32 = model.step(idx[:, t], s32)
        l16, s16 = m16.step(idx[:, t], s16)
        assert l16.requires_grad and l16.dtype == torch.bfloat16
        assert s16.wkv.dtype == torch.float32
        assert rel_err(l16.detach(), l32) < 3e-2, t
    assert rel_err(s16.wkv.detach(), s32.wkv) < 3e-2
    l16.float().sum().backward()
    assert m16.blocks[0].att.w0.grad is not None and torch.isfinite(m16.blocks[0].att.w0.grad).all()
