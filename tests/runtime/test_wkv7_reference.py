"""The WKV-7 ground truth itself: `wkv7_reference` (the plain loop every backend is tested against) against
an independent per-head loop written with Python scalars and `math.exp`, plus hand-computed cases that pin
the decay formula (exp(-exp(w))) and the [value][key] state layout.

Tolerances: fp64 against fp64, 1e-12 relative (the two loops round differently only in summation order).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rwkvslice.ops.wkv7_reference import wkv7_reference

FP64_REL = 1e-12


def make_inputs(B, T, H, N, *, seed=0, dtype=torch.float64):
    """Model-like inputs: w = -softplus(-x) - 0.5, a = -kk, b = kk * iclr with kk unit-norm per head."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    w = -F.softplus(-randn(B, T, H, N)) - 0.5
    kk = F.normalize(randn(B, T, H, N), dim=-1)
    iclr = torch.sigmoid(randn(B, T, H, N))
    state = randn(B, H, N, N)
    return [x.to(dtype) for x in (r, w, k, v, -kk, kk * iclr)], state


def scalar_loop(r, w, k, v, a, b, state):
    """WKV-7 one (batch, head) at a time with Python floats, written from the recurrence:
    sa_i = sum_j S[i][j] a_j;  S[i][j] = S[i][j] exp(-exp(w_j)) + sa_i b_j + v_i k_j;  y_i = sum_j S[i][j] r_j.
    """
    r, w, k, v, a, b, state = (np.asarray(x, dtype=np.float64) for x in (r, w, k, v, a, b, state))
    B, T, H, N = r.shape
    y = np.zeros((B, T, H, N))
    final = np.zeros((B, H, N, N))
    for bi in range(B):
        for h in range(H):
            S = [[float(state[bi, h, i, j]) for j in range(N)] for i in range(N)]
            for t in range(T):
                at, bt, kt, vt, rt = (x[bi, t, h] for x in (a, b, k, v, r))
                decay = [math.exp(-math.exp(float(w[bi, t, h, j]))) for j in range(N)]
                sa = [sum(S[i][j] * at[j] for j in range(N)) for i in range(N)]
                for i in range(N):
                    for j in range(N):
                        S[i][j] = S[i][j] * decay[j] + sa[i] * bt[j] + vt[i] * kt[j]
                for i in range(N):
                    y[bi, t, h, i] = sum(S[i][j] * rt[j] for j in range(N))
            final[bi, h] = S
    return y, final


def rel_err(got, want):
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("with_state", [False, True])
def test_reference_matches_independent_scalar_loop(with_state):
    (r, w, k, v, a, b), state = make_inputs(2, 6, 2, 4, seed=1)
    s0 = state if with_state else None
    y, final = wkv7_reference(r, w, k, v, a, b, s0)
    y_want, final_want = scalar_loop(r, w, k, v, a, b, state if with_state else torch.zeros_like(state))
    assert y.dtype == final.dtype == torch.float64
    assert rel_err(y, y_want) < FP64_REL
    assert rel_err(final, final_want) < FP64_REL


def test_state_layout_is_value_by_key():
    """One step from a zero state with a = b = 0: S = v k^T, so S[i, j] = v_i k_j and y = v (k . r)."""
    r = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).view(1, 1, 1, 3)
    k = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).view(1, 1, 1, 3)
    v = torch.tensor([-2.0, 0.25, 4.0], dtype=torch.float64).view(1, 1, 1, 3)
    zeros = torch.zeros_like(r)
    y, final = wkv7_reference(r, zeros, k, v, zeros, zeros)
    want_state = torch.tensor([[-2.0, -4.0, -6.0], [0.25, 0.5, 0.75], [4.0, 8.0, 12.0]], dtype=torch.float64)
    assert torch.equal(final[0, 0], want_state)
    k_dot_r = 0.5 * 1.0 + -1.0 * 2.0 + 2.0 * 3.0  # 4.5
    assert torch.equal(y[0, 0, 0], v[0, 0, 0] * k_dot_r)


def test_decay_is_exp_of_minus_exp_w():
    """Step 2 has k = v = a = b = 0, so the state is only decayed: S2[i, j] = v1_i k1_j exp(-exp(w2_j))."""
    w2 = [-3.0, -0.5, 0.0, 1.2]
    k1 = [1.0, -2.0, 0.5, 3.0]
    v1 = [2.0, -1.0, 0.5, 1.5]
    shape = (1, 2, 1, 4)
    zeros = torch.zeros(shape, dtype=torch.float64)
    k, v, w = zeros.clone(), zeros.clone(), zeros.clone()
    k[0, 0, 0], v[0, 0, 0] = torch.tensor(k1, dtype=torch.float64), torch.tensor(v1, dtype=torch.float64)
    w[0, 1, 0] = torch.tensor(w2, dtype=torch.float64)
    _, final = wkv7_reference(zeros, w, k, v, zeros, zeros)
    for i in range(4):
        for j in range(4):
            want = v1[i] * k1[j] * math.exp(-math.exp(w2[j]))
            assert final[0, 0, i, j].item() == pytest.approx(want, rel=1e-15, abs=0.0)


def test_dtypes_follow_the_contract():
    (r, w, k, v, a, b), state = make_inputs(1, 3, 1, 4)
    y, final = wkv7_reference(*(x.float() for x in (r, w, k, v, a, b)), state.float())
    assert (y.dtype, final.dtype) == (torch.float32, torch.float32)
    y, final = wkv7_reference(*(x.bfloat16() for x in (r, w, k, v, a, b)), state.float())
    assert (y.dtype, final.dtype) == (torch.bfloat16, torch.float32)
    y, final = wkv7_reference(*(x.float() for x in (r, w, k, v, a, b)), compute_dtype=torch.float64)
    assert (y.dtype, final.dtype) == (torch.float64, torch.float64)


def test_empty_sequence_returns_the_initial_state():
    (r, w, k, v, a, b), state = make_inputs(2, 0, 2, 3)
    y, final = wkv7_reference(r, w, k, v, a, b, state)
    assert y.shape == (2, 0, 2, 3)
    assert torch.equal(final, state)
