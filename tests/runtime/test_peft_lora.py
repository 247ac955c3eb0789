"""rwkvslice.peft.lora: LoRA / PiSSA adapters on RWKV-7's linear layers.

References: the base model's own logits (LoRA at init adds exact zeros, so bit for bit), the merged
model's logits (fp32, relative error < 1e-6), the weight W itself for PiSSA's residual + BA (< 1e-6),
and an fp64 copy of the whole model run with the reference WKV loop and full-logits cross-entropy for
the adapters' gradients (fp32 vs fp64: relative norm error < 1e-4, the fp32 forward's rounding through
2 layers measures ~1e-6).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.errors import ConfigError
from rwkvslice.peft import LORA_TARGETS, LoRALinear, TuneSpec, add_lora, lora_modules, merge_lora, prepare

pytestmark = pytest.mark.component("PEFT")


def make_model(seed=0, n_layer=2):
    torch.manual_seed(seed)
    model = RWKV7(RWKV7Config(vocab_size=96, n_embd=64, n_layer=n_layer, head_size=32))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every layer contributes (the official init zeroes the output projections)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def perturb_adapters(model, scale=0.05, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.add_(torch.randn(m.lora_B.shape, generator=g) * scale)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


IDX = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(5))
TARGETS = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(6))


def test_lora_at_init_gives_the_base_logits_and_loss_bit_for_bit():
    base = make_model()
    tuned = copy.deepcopy(base)
    add_lora(tuned, r=4, alpha=8)
    assert len(lora_modules(tuned)) == 2 * len(LORA_TARGETS)
    assert torch.equal(tuned(IDX), base(IDX))
    assert torch.equal(tuned.loss(IDX, TARGETS), base.loss(IDX, TARGETS))
    # the frozen weight keeps its official name
    assert torch.equal(tuned.state_dict()["blocks.1.att.key.weight"], base.state_dict()["blocks.1.att.key.weight"])


def test_merged_equals_unmerged_in_gpt_and_rnn_mode():
    model = make_model()
    add_lora(model, r=4, alpha=8)
    perturb_adapters(model)
    unmerged = model(IDX)
    with torch.no_grad():  # RNN mode with unmerged adapters must see them too (it runs through forward)
        state, steps = model.init_state(2), []
        for t in range(IDX.shape[1]):
            logits, state = model.step(IDX[:, t], state)
            steps.append(logits)
    assert rel(torch.stack(steps, 1), unmerged) < 1e-5
    base_logits = make_model()(IDX)
    assert rel(unmerged, base_logits) > 1e-3  # the adapters do change the model
    merge_lora(model)
    assert not lora_modules(model) and not model.step_via_forward
    assert set(model.state_dict()) == set(make_model().state_dict())  # an official state dict again
    assert rel(model(IDX), unmerged) < 1e-6


def test_pissa_residual_plus_ba_reconstructs_w_and_starts_at_the_base():
    base = make_model()
    tuned = copy.deepcopy(base)
    factors = add_lora(tuned, r=8, alpha=16, init="pissa")
    for name, m in lora_modules(tuned).items():
        W = base.get_submodule(name).weight.double()
        recon = m.weight.double() + m.scaling * (m.lora_B.double() @ m.lora_A.double())
        assert rel(recon, W) < 1e-6, name
        # A, B are the top-r singular directions: B A has W's top singular values
        s_top = torch.linalg.svdvals(W)[:8]
        s_ba = torch.linalg.svdvals(m.scaling * m.lora_B.double() @ m.lora_A.double())[:8]
        assert rel(s_ba, s_top) < 1e-2, name
        assert torch.equal(factors[name][0], m.lora_A.detach())
    assert rel(tuned(IDX), base(IDX)) < 1e-5
    # replaying the stored factors rebuilds the same residual bit for bit
    again = copy.deepcopy(base)
    add_lora(again, r=8, alpha=16, init="pissa", pissa_factors=factors)
    for name, m in lora_modules(again).items():
        assert torch.equal(m.weight, lora_modules(tuned)[name].weight)


def _ref_loss(model, idx, targets):
    """fp64 reference: the reference WKV loop, full logits, plain cross-entropy."""
    h, _ = model.hidden_states(idx, backend="reference")
    logits = model.head(h)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def test_lora_gradients_match_an_fp64_reference():
    model = make_model()
    prepare(model, TuneSpec(kind="lora", lora_r=4, lora_alpha=8))
    perturb_adapters(model)  # B != 0, so A gets a gradient too
    ref = copy.deepcopy(model).double()
    model.loss(IDX, TARGETS).backward()
    _ref_loss(ref, IDX, TARGETS).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and all("lora_" in n for n in got)
    for n in got:
        assert rel(got[n], want[n]) < 1e-4, n
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_bad_targets_and_ranks_are_one_line_errors():
    model = make_model()
    with pytest.raises(ConfigError, match=r"unknown module 'att\.foo'.*att\.receptance,att\.key"):
        add_lora(model, targets="att.key,att.foo")
    with pytest.raises(ConfigError, match="--lora-r must be >= 1"):
        add_lora(model, r=0)
    with pytest.raises(ConfigError, match=r"--lora-r 65 is larger than att.receptance allows \(64 x 64"):
        add_lora(model, r=65)
    with pytest.raises(ConfigError, match="--lora-init"):
        add_lora(model, init="svd")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing was half-applied
