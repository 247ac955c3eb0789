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


# ------------------------------------------------------------------------------------------------
# _LoRALinearFn: the adapter as one autograd node that keeps only the parts of its input.

from test_model import saved_for_backward_bytes  # noqa: E402

from rwkvslice.model.rwkv7 import _mix  # noqa: E402
from rwkvslice.peft.lora import _LoRALinearFn  # noqa: E402

# (fn, shapes of the parts, which parts require grad): the four inputs the model gives its targets
INPUT_KINDS = {
    "plain": (None, [(2, 3, 5)], [True]),
    "mix": (_mix, [(2, 3, 5), (2, 3, 5), (1, 1, 5)], [True, True, True]),  # x + xx * mu, mu trained too
    "mix_frozen_mu": (_mix, [(2, 3, 5), (2, 3, 5), (1, 1, 5)], [True, True, False]),
    "mul": (torch.mul, [(2, 3, 5), (2, 3, 5)], [True, True]),  # y * g
    "square": (torch.square, [(2, 3, 5)], [True]),  # relu(k) ** 2
    "no_input_grad": (None, [(2, 3, 5)], [False]),  # layer 0 below frozen embeddings: no dx at all
}


def _plain_lora(fn, s, W, A, B, *parts):
    """The same maths through plain autograd (the reference)."""
    u = parts[0] if fn is None else fn(*parts)
    return F.linear(u, W) + F.linear(F.linear(u, A), B) * s


def _fn_inputs(kind, dtype, train_weight=False):
    fn, shapes, needs = INPUT_KINDS[kind]
    g = torch.Generator().manual_seed(7)
    W = torch.randn(4, 5, generator=g, dtype=dtype).requires_grad_(train_weight)
    A = torch.randn(2, 5, generator=g, dtype=dtype).requires_grad_()
    B = torch.randn(4, 2, generator=g, dtype=dtype).requires_grad_()
    parts = [torch.randn(sh, generator=g, dtype=dtype).requires_grad_(n) for sh, n in zip(shapes, needs)]
    return fn, [W, A, B, *parts]


@pytest.mark.parametrize("kind", list(INPUT_KINDS))
def test_lora_function_gradients_pass_gradcheck_and_match_plain_autograd_in_fp64(kind):
    """gradcheck (central finite differences, fp64, its default atol 1e-5 / rtol 1e-3) for dW, dA, dB and
    every part's gradient; and the plain-autograd reference of the same maths to 1e-12 (fp64 rounding)."""
    fn, inputs = _fn_inputs(kind, torch.float64, train_weight=True)
    s = 1.7
    assert torch.autograd.gradcheck(lambda *t: _LoRALinearFn.apply(fn, s, *t), inputs)
    got_y = _LoRALinearFn.apply(fn, s, *inputs)
    want_y = _plain_lora(fn, s, *inputs)
    assert rel(got_y, want_y) < 1e-12
    dy = torch.randn(want_y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    wanted = [t for t in inputs if t.requires_grad]
    got = torch.autograd.grad(got_y, wanted, dy)
    want = torch.autograd.grad(want_y, wanted, dy)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and rel(a, b) < 1e-12


def test_lora_function_under_bf16_autocast_matches_plain_autograd():
    """CPU bf16 autocast: same outputs and gradients as plain autograd under the same autocast, within
    bf16 rounding (relative error < 2e-2; both run bf16 matmuls, summed in different orders), and every
    gradient in its tensor's own dtype (fp32 masters)."""
    fn, inputs = _fn_inputs("mix", torch.float32)
    inputs = [t.detach().mul(0.5).requires_grad_(t.requires_grad) for t in inputs]
    dy = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(8))
    results = []
    for f in (_LoRALinearFn.apply, _plain_lora):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = f(fn, 1.7, *inputs)
        grads = torch.autograd.grad(y, [t for t in inputs if t.requires_grad], dy.to(y.dtype))
        results.append((y, grads))
    (y, grads), (y_ref, grads_ref) = results
    assert y.dtype == y_ref.dtype == torch.bfloat16 and rel(y, y_ref) < 2e-2
    for a, b, t in zip(grads, grads_ref, [t for t in inputs if t.requires_grad], strict=True):
        assert a.dtype == t.dtype and rel(a, b) < 2e-2


def _saved_bytes(model, idx):
    """Bytes autograd keeps for backward of one loss forward (test_model's counter)."""
    return saved_for_backward_bytes(model, lambda: model.loss(idx, torch.zeros_like(idx)))[0]


class _PlainLoRALinear(LoRALinear):
    """The adapter through plain autograd, as before _LoRALinearFn: it keeps its own input per target."""

    def forward_of(self, fn, *parts):
        return _plain_lora(fn, self.scaling, self.weight, self.lora_A, self.lora_B, *parts)


def test_lora_keeps_only_three_activation_rows_per_layer_for_backward():
    """Over the frozen model (backprop to its input only), LoRA on all six targets may keep per layer and
    token at most x and xx (shared by att.receptance/key/value) and ffn.key's input: 3 C floats; the
    other inputs (y, g for att.output, relu(k) for ffn.value) are what the frozen model keeps anyway.
    Plain autograd kept 9 C (each target's own input, ffn.value's 4 C wide) + the x A^T rows."""
    C, L, T = 64, 3, 16
    idx = torch.randint(0, 96, (1, T))
    frozen = make_model(n_layer=L)
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen.emb.weight.requires_grad_(True)  # so every layer's input needs a gradient, as in a LoRA run
    tuned = copy.deepcopy(frozen)
    add_lora(tuned, r=4, alpha=8)
    plain = copy.deepcopy(frozen)
    add_lora(plain, r=4, alpha=8)
    for m in lora_modules(plain).values():
        m.__class__ = _PlainLoRALinear
    base, new, old = (_saved_bytes(m, idx) for m in (frozen, tuned, plain))
    row = T * C * 4  # one C-wide fp32 activation
    assert new - base <= 3 * row * L, (new - base) / (row * L)
    assert old - base >= 9 * row * L  # the measurement does see what plain autograd keeps
