"""backend="torch" (`wkv7_torch`, the chunked CPU path with a hand-written backward) against the fp64
reference loop: y, the final state, the gradients of r, w, k, v, a, b and of the initial state, with random
upstream gradients on both y and the final state. Plus gradcheck, the state-carry property, the extreme-
decay fallback, dtypes, what autograd keeps for backward, and the `wkv7` dispatch.

Tolerances (relative norm error ||x - ref|| / ||ref||):
- fp32 against fp64: 1e-5 (the issue's bound; measured ~1e-7..5e-7, the largest on dw).
- fp64 against fp64: 1e-12.
- bf16 inputs: y is rounded to bf16 (8 mantissa bits), so 1e-2 against the fp32 result of the same inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import rwkvslice.ops.wkv7_torch as wkv7_torch_module
from rwkvslice.errors import ConfigError
from rwkvslice.ops import wkv7
from rwkvslice.ops.wkv7 import _resolve
from rwkvslice.ops.wkv7_reference import wkv7_reference
from rwkvslice.ops.wkv7_torch import CHUNK_LEN, wkv7_torch

NAMES = ("r", "w", "k", "v", "a", "b")
FP32_REL = 1e-5
FP64_REL = 1e-12


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The fp64 reference loop runs many tiny ops; on a busy 2-core machine intra-op threads only add
    wake-up latency. One thread keeps this file fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_inputs(B, T, H, N, *, seed=0, w_range=None, dtype=torch.float32):
    """Inputs as the model makes them: w = -softplus(-x) - 0.5 (decay in (0.545, 1)), a = -kk,
    b = kk * iclr with kk unit-norm per head and iclr in (0, 1); or w uniform in w_range.
    Returns ([r, w, k, v, a, b], state, (dy, dstate)) with state and the upstream gradients in fp64."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    if w_range is None:
        w = -F.softplus(-randn(B, T, H, N)) - 0.5
    else:
        lo, hi = w_range
        w = lo + (hi - lo) * torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    kk = F.normalize(randn(B, T, H, N), dim=-1)
    iclr = torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    inputs = [x.to(dtype) for x in (r, w, k, v, -kk, kk * iclr)]
    return inputs, randn(B, H, N, N), (randn(B, T, H, N), randn(B, H, N, N))


def rel_err(got, want):
    """||got - want|| / ||want||; the absolute error where the reference is exactly zero (e.g. dw, da, db
    at T = 1 from a zero state: the decay and the sa term only act on the previous state)."""
    diff, scale = (got.double() - want.double()).norm().item(), want.double().norm().item()
    return diff / scale if scale > 0 else diff


def run(fn, inputs, state, upstream, *, state_dtype=torch.float32, use_y=True, use_state=True):
    """Forward + backward of `fn`; returns {"y", "state", "r".."b", "state0"} (state0: initial-state grad)."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    s0 = None if state is None else state.detach().to(state_dtype).requires_grad_()
    y, final = fn(*xs, s0)
    dy, dstate = upstream
    loss = 0.0
    if use_y:
        loss = loss + (y.double() * dy).sum()
    if use_state:
        loss = loss + (final.double() * dstate).sum()
    loss.backward()
    out = {"y": y.detach(), "state": final.detach()}
    # No gradient (r when only the final state is used) counts as a zero gradient.
    out.update({name: torch.zeros_like(x) if x.grad is None else x.grad for name, x in zip(NAMES, xs)})
    if s0 is not None:
        out["state0"] = s0.grad
    return out


def reference_fp64(inputs, state, upstream, **kw):
    return run(wkv7_reference, [x.double() for x in inputs], state, upstream, state_dtype=torch.float64, **kw)


def assert_close_to_reference(got, want, tol=FP32_REL, skip=()):
    assert got.keys() == want.keys()
    errors = {name: rel_err(got[name], want[name]) for name in want if name not in skip}
    bad = {name: err for name, err in errors.items() if not err < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


# --- against the fp64 reference ------------------------------------------------------------------------


@pytest.mark.parametrize("state_kind", ["none", "zero", "random"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 100])
def test_fp32_matches_fp64_reference(T, B, state_kind):
    inputs, state, upstream = make_inputs(B, T, 2, 16, seed=T * 10 + B)
    state = {"none": None, "zero": torch.zeros_like(state), "random": state}[state_kind]
    got = run(wkv7_torch, inputs, state, upstream)
    assert got["y"].dtype == torch.float32 and got["state"].dtype == torch.float32
    assert_close_to_reference(got, reference_fp64(inputs, state, upstream))


def test_fp32_matches_fp64_reference_at_model_head_size():
    inputs, state, upstream = make_inputs(2, 45, 2, 64, seed=7)
    assert_close_to_reference(
        run(wkv7_torch, inputs, state, upstream), reference_fp64(inputs, state, upstream)
    )


@pytest.mark.component("Backward Pass")
@pytest.mark.parametrize("use_y,use_state", [(True, False), (False, True)])
def test_gradients_when_only_one_output_is_used(use_y, use_state):
    """The backward receives None for the unused output; the other one's gradient must still be exact."""
    inputs, state, upstream = make_inputs(2, 37, 2, 8, seed=3)
    kw = {"use_y": use_y, "use_state": use_state}
    got = run(wkv7_torch, inputs, state, upstream, **kw)
    assert_close_to_reference(got, reference_fp64(inputs, state, upstream, **kw))


def test_fp64_inputs_compute_in_fp64():
    inputs, state, upstream = make_inputs(2, 33, 2, 8, seed=4, dtype=torch.float64)
    got = run(wkv7_torch, inputs, state, upstream, state_dtype=torch.float64)
    assert got["y"].dtype == torch.float64 and got["state"].dtype == torch.float64
    assert_close_to_reference(got, reference_fp64(inputs, state, upstream), tol=FP64_REL)


def test_many_segments_match_reference(monkeypatch):
    """Long inputs are processed in segments of chunks; force one chunk per segment to cross every
    segment boundary (state carried forward and state gradient carried backward between segments)."""
    monkeypatch.setattr(wkv7_torch_module, "_SEGMENT_ELEMS", 1)
    inputs, state, upstream = make_inputs(2, 53, 2, 8, seed=5)
    assert_close_to_reference(
        run(wkv7_torch, inputs, state, upstream), reference_fp64(inputs, state, upstream)
    )


# --- decays: the factored fast path and the pairwise fallback ------------------------------------------


def test_model_decays_use_the_factored_form_and_extreme_ones_the_pairwise_form():
    model_w = make_inputs(1, 64, 1, 8)[0][1]
    assert not wkv7_torch_module._needs_pairwise(model_w)
    assert not wkv7_torch_module._needs_pairwise(torch.ones(1, 16, 1, 8))  # w = 1: exponents <= 22
    assert wkv7_torch_module._needs_pairwise(torch.full((1, 16, 1, 8), 4.0))


@pytest.mark.parametrize("segment_elems", [None, 1])
def test_pairwise_form_matches_reference_on_model_decays(monkeypatch, segment_elems):
    monkeypatch.setattr(wkv7_torch_module, "_needs_pairwise", lambda w: True)
    if segment_elems is not None:
        monkeypatch.setattr(wkv7_torch_module, "_SEGMENT_ELEMS", segment_elems)
    inputs, state, upstream = make_inputs(3, 37, 2, 8, seed=6)
    assert_close_to_reference(
        run(wkv7_torch, inputs, state, upstream), reference_fp64(inputs, state, upstream)
    )


def test_strong_decays_w_up_to_1_stay_accurate():
    """w in [-8, 1]: decays from ~1 down to exp(-e) = 0.066 per step, still the factored form."""
    inputs, state, upstream = make_inputs(2, 50, 2, 16, seed=8, w_range=(-8.0, 1.0))
    got = run(wkv7_torch, inputs, state, upstream)
    assert all(torch.isfinite(t).all() for t in got.values())
    assert_close_to_reference(got, reference_fp64(inputs, state, upstream))


@pytest.mark.parametrize("w_range", [(-8.0, 5.0), (-3.0, 6.0)])
def test_extreme_decays_stay_accurate(w_range):
    """Decays down to exp(-exp(6)) = exp(-403) (0 in fp32), handled by the pairwise form. dw is the
    sensitive one: dw = dlam * lam with |lam| up to 403 magnifies any rounding residue in dlam."""
    inputs, state, upstream = make_inputs(2, 50, 2, 16, seed=9, w_range=w_range)
    got = run(wkv7_torch, inputs, state, upstream)
    assert all(torch.isfinite(t).all() for t in got.values())
    assert_close_to_reference(got, reference_fp64(inputs, state, upstream))


def test_decays_of_exactly_zero_and_one_stay_finite():
    """w = +-100: exp(w) overflows fp32 (decay exactly 0) or is 3.7e-44 (decay 1 to fp32 precision).
    dw is ~1e-43 everywhere (0 where the decay is 0), below fp32's normal range, so it is compared in
    absolute terms."""
    inputs, state, upstream = make_inputs(2, 40, 2, 8, seed=10)
    pick = torch.rand(inputs[1].shape, generator=torch.Generator().manual_seed(1)) < 0.5
    inputs[1] = torch.where(pick, 100.0, -100.0)
    got = run(wkv7_torch, inputs, state, upstream)
    assert all(torch.isfinite(t).all() for t in got.values())
    want = reference_fp64(inputs, state, upstream)
    assert_close_to_reference(got, want, skip=("w",))
    assert (got["w"].double() - want["w"]).abs().max() < 1e-40
    assert torch.all(got["w"][pick] == 0)


# --- gradcheck (fp64) -----------------------------------------------------------------------------------


@pytest.mark.component("Backward Pass")
@pytest.mark.parametrize("T,pairwise", [(19, False), (5, False), (17, True)])
def test_gradcheck_fp64(monkeypatch, T, pairwise):
    """T = 19 and 17 span two chunks, the last one partial; T = 5 is a single partial chunk."""
    if pairwise:
        monkeypatch.setattr(wkv7_torch_module, "_needs_pairwise", lambda w: True)
    inputs, state, _ = make_inputs(2 if T != 17 else 1, T, 1, 3, seed=T, dtype=torch.float64)
    args = [x.requires_grad_() for x in inputs] + [state.requires_grad_()]
    assert torch.autograd.gradcheck(wkv7_torch, args, eps=1e-6, atol=1e-7, rtol=1e-5)


# --- state carry ---------------------------------------------------------------------------------------


def split_time(inputs, t):
    return [x[:, :t] for x in inputs], [x[:, t:] for x in inputs]


@settings(max_examples=12, deadline=None)
@given(t1=st.integers(0, 40), t2=st.integers(0, 40), batch=st.integers(1, 2), with_state=st.booleans())
def test_state_carry_equals_one_long_run(t1, t2, batch, with_state):
    """run(T1 + T2) == run(T2, state=run(T1).state): y concatenates and the final states agree."""
    inputs, state, _ = make_inputs(batch, t1 + t2, 2, 8, seed=t1 * 41 + t2)
    state = state.float() if with_state else None
    y_full, s_full = wkv7_torch(*inputs, state)
    first, second = split_time(inputs, t1)
    y1, s1 = wkv7_torch(*first, state)
    y2, s2 = wkv7_torch(*second, s1)
    assert y1.shape[1] == t1 and y2.shape[1] == t2
    if t1 + t2:
        assert rel_err(torch.cat([y1, y2], 1), y_full) < FP32_REL
    assert rel_err(s2, s_full) < FP32_REL


@pytest.mark.component("Backward Pass")
def test_gradients_flow_through_a_carried_state():
    """Two chained calls give the same gradients as one call: the final-state gradient of the first call
    is the initial-state gradient of the second."""
    inputs, state, upstream = make_inputs(2, 40, 2, 8, seed=11)

    def chained(r, w, k, v, a, b, s0):
        first, second = split_time([r, w, k, v, a, b], 23)
        y1, s1 = wkv7_torch(*first, s0)
        y2, s2 = wkv7_torch(*second, s1)
        return torch.cat([y1, y2], 1), s2

    assert_close_to_reference(run(chained, inputs, state, upstream), run(wkv7_torch, inputs, state, upstream))


def test_empty_sequence_returns_a_copy_of_the_state():
    inputs, state, _ = make_inputs(2, 0, 2, 4)
    state = state.float()
    y, final = wkv7_torch(*inputs, state)
    assert y.shape == (2, 0, 2, 4)
    assert torch.equal(final, state) and final.data_ptr() != state.data_ptr()
    _, final = wkv7_torch(*inputs)
    assert torch.equal(final, torch.zeros(2, 2, 4, 4))


# --- dtypes, layouts, memory ----------------------------------------------------------------------------


@pytest.mark.component("BFloat16")
def test_bf16_inputs_give_bf16_y_and_fp32_state():
    inputs, state, upstream = make_inputs(2, 20, 2, 8, seed=12)
    bf16 = [x.bfloat16() for x in inputs]
    got = run(wkv7_torch, bf16, state, upstream)
    assert got["y"].dtype == torch.bfloat16 and got["state"].dtype == torch.float32
    assert all(got[name].dtype == torch.bfloat16 for name in NAMES)
    assert got["state0"].dtype == torch.float32
    # Same bf16 values computed in fp32: only y's rounding to bf16 (and the grads' rounding) differ.
    want = run(wkv7_torch, [x.float() for x in bf16], state, upstream)
    assert rel_err(got["state"], want["state"]) < FP32_REL
    assert rel_err(got["y"], want["y"]) < 1e-2
    for name in NAMES:
        assert rel_err(got[name], want[name]) < 1e-2


def test_non_contiguous_inputs():
    inputs, state, _ = make_inputs(2, 21, 3, 8, seed=13)
    transposed = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs]
    assert not transposed[0].is_contiguous()
    y, s = wkv7_torch(*transposed, state.float().mT.contiguous().mT)
    y_want, s_want = wkv7_torch(*inputs, state.float())
    assert torch.equal(y, y_want) and torch.equal(s, s_want)


def test_no_grad_gives_the_same_result():
    inputs, state, _ = make_inputs(2, 30, 2, 8, seed=14)
    y, s = wkv7_torch(*[x.requires_grad_() for x in inputs], state.float())
    with torch.no_grad():
        y_ng, s_ng = wkv7_torch(*inputs, state.float())
    assert not y_ng.requires_grad
    assert torch.equal(y.detach(), y_ng) and torch.equal(s.detach(), s_ng)


@pytest.mark.component("BFloat16")
def test_autocast_does_not_lower_the_internal_precision():
    """Under CPU bf16 autocast (as in bf16 training) fp32 inputs still compute in fp32: same y, state and
    gradients as without autocast."""
    inputs, state, upstream = make_inputs(2, 30, 2, 8, seed=17)
    want = run(wkv7_torch, inputs, state, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(wkv7_torch, inputs, state, upstream)
    assert got["y"].dtype == torch.float32
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.component("Backward Pass")
def test_backward_keeps_only_inputs_and_chunk_snapshots():
    """Memory-lean: autograd keeps the six inputs and one fp32 state per 16-step chunk, nothing per step."""
    B, T, H, N = 2, 70, 2, 16
    inputs, state, _ = make_inputs(B, T, H, N, seed=15)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    xs = [x.requires_grad_() for x in inputs]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, s = wkv7_torch(*xs, state.float().requires_grad_())
    n_chunks = -(-T // CHUNK_LEN)
    assert sum(saved) == 6 * B * T * H * N + n_chunks * B * H * N * N
    (y.sum() + s.sum()).backward()  # still differentiable after the hooks
    assert all(x.grad is not None for x in xs)


# --- dispatch (ops/wkv7.py) -----------------------------------------------------------------------------


def test_auto_backend_on_cpu_runs_torch(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(len(args))
        return wkv7_torch(*args)

    monkeypatch.setattr(wkv7_torch_module, "wkv7_torch", spy)
    inputs, state, _ = make_inputs(1, 5, 1, 4)
    y, s = wkv7(*inputs, state.float(), backend="auto")
    assert calls == [7]
    assert _resolve("auto", inputs[0]) == "torch"
    y_want, s_want = wkv7_torch(*inputs, state.float())
    assert torch.equal(y, y_want) and torch.equal(s, s_want)


def test_torch_and_reference_backends_agree_through_dispatch():
    inputs, state, _ = make_inputs(2, 18, 2, 8, seed=16)
    y_t, s_t = wkv7(*inputs, state.float(), backend="torch")
    y_r, s_r = wkv7(*[x.double() for x in inputs], state, backend="reference")
    assert rel_err(y_t, y_r) < FP32_REL and rel_err(s_t, s_r) < FP32_REL


def test_unknown_backend_is_a_config_error():
    inputs, _, _ = make_inputs(1, 3, 1, 4)
    with pytest.raises(ConfigError, match="unknown backend 'fast'"):
        wkv7(*inputs, backend="fast")


@pytest.mark.parametrize(
    "bad,match",
    [
        ("w", "w has shape"),
        ("state", "state has shape"),
        ("r3d", "r must be"),
    ],
)
def test_shape_mismatch_is_a_config_error(bad, match):
    inputs, state, _ = make_inputs(2, 3, 2, 4)
    state = state.float()
    if bad == "w":
        inputs[1] = inputs[1][:, :2]
    elif bad == "state":
        state = state[:, :1]
    else:
        inputs = [x[0] for x in inputs]
    with pytest.raises(ConfigError, match=match):
        wkv7(*inputs, state)
