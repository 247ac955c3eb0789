"""`wkv7(..., resets=, reset_state=)`: the state reset used by exact packing, on every backend that runs here,
against an independent fp64 loop written in this file from the definition:

    at a step t with resets[b, t] True: S <- reset_state[b] (zeros when None), then the usual step
    S_t = S diag(exp(-exp(w_t))) + (S a_t) b_t^T + v_t k_t^T,  y_t = S_t r_t

Checked: y, the final state and the gradients of r, w, k, v, a, b, the carried state and reset_state, with
resets inside and at the edges of the torch backend's chunks (CHUNK_LEN 16), several in one chunk, at
position 0, and property-based masks (hypothesis). Plus: all-False resets equal no resets bit for bit; a
reset at 0 equals starting from reset_state; one-line errors for bad resets.

Tolerances (relative norm error): fp32 backends against fp64 1e-5 (as for the backends without resets);
fp64 torch against fp64 1e-10.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import rwkvslice.ops.wkv7_torch as wkv7_torch_module
from rwkvslice.errors import ConfigError
from rwkvslice.ops import wkv7
from rwkvslice.ops.wkv7_cuda import wkv7_host

FP32_REL = 1e-5
FP64_REL = 1e-10
NAMES = ("r", "w", "k", "v", "a", "b", "state", "reset_state")
HOST_HAS_RESETS = "resets" in inspect.signature(wkv7_host).parameters
HOST = pytest.param("host", marks=pytest.mark.xfail(
    not HOST_HAS_RESETS, strict=True, reason="host resets land with the kernel branch"))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_inputs(B, T, H, N, *, seed=0, w_range=None):
    """fp64 model-like inputs (decay in (0.545, 1), a = -kk, b = kk * iclr), a carried state, a reset
    state, and random upstream gradients for y and the final state."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    if w_range is None:
        w = -F.softplus(-randn(B, T, H, N)) - 0.5
    else:
        w = w_range[0] + (w_range[1] - w_range[0]) * torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    kk = F.normalize(randn(B, T, H, N), dim=-1)
    iclr = torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    return [r, w, k, v, -kk, kk * iclr], randn(B, H, N, N), randn(B, H, N, N), (randn(B, T, H, N),
                                                                                randn(B, H, N, N))


def loop_fp64(r, w, k, v, a, b, state, resets, reset_state):
    """The definition, one batch row and one step at a time (differentiable fp64 torch ops)."""
    B, T, H, N = r.shape
    ys, finals = [], []
    for bi in range(B):
        S = torch.zeros(H, N, N, dtype=torch.float64) if state is None else state[bi]
        fresh = torch.zeros(H, N, N, dtype=torch.float64) if reset_state is None else reset_state[bi]
        row = []
        for t in range(T):
            if bool(resets[bi, t]):
                S = fresh
            decay = torch.exp(-torch.exp(w[bi, t]))  # (H, N)
            sa = torch.einsum("hij,hj->hi", S, a[bi, t])
            S = S * decay[:, None, :] + sa[:, :, None] * b[bi, t][:, None, :] + v[bi, t][:, :, None] * k[bi, t][
                :, None, :]
            row.append(torch.einsum("hij,hj->hi", S, r[bi, t]))
        ys.append(torch.stack(row))
        finals.append(S)
    return torch.stack(ys), torch.stack(finals)


def run(fn, inputs, state, reset_state, resets, upstream, dtype):
    """Forward + backward; returns {"y", "final", grads by NAMES} (a missing gradient counts as zero)."""
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    s0 = None if state is None else state.detach().to(dtype).requires_grad_()
    rs = None if reset_state is None else reset_state.detach().to(dtype).requires_grad_()
    y, final = fn(*xs, s0, resets, rs)
    dy, dfinal = upstream
    ((y.double() * dy).sum() + (final.double() * dfinal).sum()).backward()
    out = {"y": y.detach().double(), "final": final.detach().double()}
    for name, x in zip(NAMES, [*xs, s0, rs], strict=True):
        if x is not None:
            out[name] = torch.zeros_like(x) if x.grad is None else x.grad.double()
    return out


def call(backend):
    def fn(r, w, k, v, a, b, s0, resets, rs):
        return wkv7(r, w, k, v, a, b, s0, resets=resets, reset_state=rs, backend=backend)
    return fn


def rel(got, want):
    diff, scale = (got - want).norm().item(), want.norm().item()
    return diff / scale if scale > 0 else diff


def check(backend, B, T, reset_rows, *, H=2, N=8, with_state=True, with_reset_state=True, seed=0,
          dtype=torch.float32, tol=FP32_REL, w_range=None):
    inputs, state, reset_state, upstream = make_inputs(B, T, H, N, seed=seed, w_range=w_range)
    resets = torch.zeros(B, T, dtype=torch.bool)
    for bi, positions in enumerate(reset_rows):
        resets[bi, list(positions)] = True
    state = state if with_state else None
    reset_state = reset_state if with_reset_state else None
    want = run(loop_fp64, inputs, state, reset_state, resets, upstream, torch.float64)
    got = run(call(backend), inputs, state, reset_state, resets, upstream, dtype)
    assert got.keys() == want.keys()
    errors = {name: rel(got[name], want[name]) for name in want}
    bad = {name: e for name, e in errors.items() if not e < tol}
    assert not bad, f"{backend}: relative errors above {tol}: {bad} (all {errors})"
    return want


# Resets at the chunk edges (15 | 16, 31 | 32), inside chunks, several in one chunk, consecutive, and at 0.
PATTERNS = {
    "inside": [[5], [9]],
    "edges": [[15, 16, 32], [16, 31]],
    "several_in_a_chunk": [[3, 4, 9, 14], [1, 2, 3]],
    "at_zero_and_later": [[0, 20], [0]],
    "one_row_only": [[7, 23], []],
}
BACKENDS = ["reference", "torch", HOST]


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_fp64_loop(backend, pattern):
    want = check(backend, 2, 40, PATTERNS[pattern])
    assert want["reset_state"].norm() > 0  # the reset state really is used (and differentiated)


@pytest.mark.parametrize("with_state,with_reset_state", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_optional_states(backend, with_state, with_reset_state):
    check(backend, 2, 33, [[4, 16], [0, 17, 30]], with_state=with_state, with_reset_state=with_reset_state)


@pytest.mark.parametrize("T", [1, 2, 16, 17])
def test_short_sequences_torch(T):
    check("torch", 2, T, [[0], [T - 1]])


def test_fp64_torch_is_exact_to_rounding():
    check("torch", 2, 40, PATTERNS["several_in_a_chunk"], dtype=torch.float64, tol=FP64_REL)


def test_torch_pairwise_form_with_resets():
    """Decays far stronger than the model's (w up to 3) switch the torch backend to its pairwise form."""
    assert wkv7_torch_module._needs_pairwise(torch.tensor([3.0]))
    check("torch", 2, 40, PATTERNS["edges"], w_range=(-3.0, 3.0), dtype=torch.float64, tol=FP64_REL)
    check("torch", 2, 40, PATTERNS["several_in_a_chunk"], w_range=(-3.0, 3.0), tol=1e-4)


def test_torch_resets_across_memory_segments(monkeypatch):
    """Inputs converted a few chunks at a time (tiny segment budget): resets still land where they should."""
    monkeypatch.setattr(wkv7_torch_module, "_SEGMENT_ELEMS", 1)
    check("torch", 2, 70, [[15, 16, 33, 64], [0, 47, 48]], dtype=torch.float64, tol=FP64_REL)


def test_torch_gradcheck_with_resets():
    inputs, state, reset_state, _ = make_inputs(1, 20, 1, 2, seed=3)
    resets = torch.zeros(1, 20, dtype=torch.bool)
    resets[0, [3, 16, 17]] = True
    xs = [x.clone().requires_grad_() for x in (*inputs, state, reset_state)]

    def fn(r, w, k, v, a, b, s0, rs):
        return wkv7(r, w, k, v, a, b, s0, resets=resets, reset_state=rs, backend="torch")

    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_random_reset_masks_torch(data):
    T = data.draw(st.integers(1, 50), label="T")
    rows = [data.draw(st.sets(st.integers(0, T - 1)), label=f"resets row {i}") for i in range(2)]
    check("torch", 2, T, rows, dtype=torch.float64, tol=FP64_REL, seed=T)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_all_false_resets_equal_no_resets_bit_for_bit(backend):
    inputs, state, reset_state, upstream = make_inputs(2, 37, 2, 8, seed=5)
    inputs = [x.float() for x in inputs]
    none = run(call(backend), inputs, state, None, None, upstream, torch.float32)
    false = run(call(backend), inputs, state, reset_state, torch.zeros(2, 37, dtype=torch.bool), upstream,
                torch.float32)
    for name in none:
        assert torch.equal(none[name], false[name]), name
    assert torch.equal(false["reset_state"], torch.zeros_like(false["reset_state"]))


@pytest.mark.parametrize("backend", ["reference", "torch", HOST])
def test_reset_at_zero_equals_starting_from_reset_state(backend):
    inputs, state, reset_state, _ = make_inputs(2, 30, 2, 8, seed=6)
    inputs = [x.float() for x in inputs]
    resets = torch.zeros(2, 30, dtype=torch.bool)
    resets[:, 0] = True
    y1, s1 = wkv7(*inputs, state.float(), resets=resets, reset_state=reset_state.float(), backend=backend)
    y2, s2 = wkv7(*inputs, reset_state.float(), backend=backend)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=1e-6)


def test_none_path_is_unchanged_and_never_builds_segments(monkeypatch):
    """resets=None never reaches the reset code of the torch backend (no extra cost on the hot path)."""
    def boom(*args, **kwargs):
        raise AssertionError("reset code ran without resets")

    monkeypatch.setattr(wkv7_torch_module, "_segment_resets", boom)
    inputs, state, _, _ = make_inputs(1, 20, 1, 4)
    xs = [x.float().requires_grad_() for x in inputs]
    y, _ = wkv7(*xs, state.float(), backend="torch")
    y.sum().backward()
    assert all(x.grad is not None for x in xs)


# --- bad input -------------------------------------------------------------------------------------------


def _ok_inputs():
    inputs, state, reset_state, _ = make_inputs(2, 5, 1, 4)
    return [x.float() for x in inputs], reset_state.float()


@pytest.mark.parametrize("resets,match", [
    (torch.zeros(2, 4, dtype=torch.bool), r"resets has shape \(2, 4\), expected \(2, 5\)"),
    (torch.zeros(5, dtype=torch.bool), r"resets has shape \(5,\), expected \(2, 5\)"),
    (torch.zeros(2, 5, dtype=torch.int64), r"resets must be a bool tensor \(B, T\), got torch.int64"),
    ([[False] * 5] * 2, r"resets must be a bool tensor \(B, T\), got list"),
    (torch.zeros(2, 5, dtype=torch.bool, device="meta"), r"resets is on meta, the inputs on cpu"),
])
def test_bad_resets_are_one_line_config_errors(resets, match):
    inputs, _ = _ok_inputs()
    with pytest.raises(ConfigError, match=match) as info:
        wkv7(*inputs, resets=resets, backend="reference")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("make,match", [
    (lambda rs: rs[:, :, :2], r"reset_state has shape \(2, 1, 2, 4\), expected \(2, 1, 4, 4\)"),
    (lambda rs: rs.long(), r"reset_state must be a float tensor \(B, H, N, N\), got torch.int64"),
    (lambda rs: rs.to("meta"), r"reset_state is on meta, the inputs on cpu"),
])
def test_bad_reset_state_is_a_one_line_config_error(make, match):
    inputs, reset_state = _ok_inputs()
    resets = torch.zeros(2, 5, dtype=torch.bool)
    with pytest.raises(ConfigError, match=match) as info:
        wkv7(*inputs, resets=resets, reset_state=make(reset_state), backend="torch")
    assert "\n" not in str(info.value)


def test_reset_state_without_resets_is_refused():
    inputs, reset_state = _ok_inputs()
    with pytest.raises(ConfigError, match="reset_state given without resets"):
        wkv7(*inputs, reset_state=reset_state)
