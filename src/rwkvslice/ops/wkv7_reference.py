"""WKV-7 reference: the official recurrence as a plain sequential loop.

Per batch b and head h, with the state S of shape (N, N) in the official [value][key] layout:

    decay_t = exp(-exp(w_t))
    S_t     = S_{t-1} diag(decay_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T
    y_t     = S_t r_t

With `resets` (B, T) bool, the state before step t is replaced by `reset_state` (zeros when None) wherever
resets[:, t] is True: a sample that starts at t sees a fresh state whatever came before (packing).

This is the ground truth for tests: it runs in the dtype of `compute_dtype` (fp32 by default, fp64 in
tests) and lets autograd differentiate through every step. It is slow and memory hungry on purpose.
"""

from __future__ import annotations

import torch


def wkv7_reference(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    resets: torch.Tensor | None = None,
    reset_state: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, T, H, N); state and reset_state (B, H, N, N); resets (B, T) bool.
    Returns y (B, T, H, N) in r.dtype, final state.

    The final state is fp32 unless `compute_dtype` is fp64 (then fp64, for tests).
    """
    B, T, H, N = r.shape
    in_dtype = r.dtype
    cd = compute_dtype or (torch.float64 if r.dtype == torch.float64 else torch.float32)
    r, w, k, v, a, b = (x.to(cd) for x in (r, w, k, v, a, b))
    decay = torch.exp(-torch.exp(w))
    S = torch.zeros(B, H, N, N, dtype=cd, device=r.device) if state is None else state.to(cd)
    if resets is not None:
        fresh = torch.zeros_like(S) if reset_state is None else reset_state.to(cd)
    ys = []
    for t in range(T):
        if resets is not None:
            S = torch.where(resets[:, t, None, None, None], fresh, S)
        sa = (S @ a[:, t, :, :, None]).squeeze(-1)  # (B, H, N_value)
        S = (
            S * decay[:, t, :, None, :]
            + sa[..., :, None] * b[:, t, :, None, :]
            + v[:, t, :, :, None] * k[:, t, :, None, :]
        )
        ys.append((S @ r[:, t, :, :, None]).squeeze(-1))
    y = torch.stack(ys, dim=1) if T > 0 else r.new_zeros(B, 0, H, N)
    out_state_dtype = torch.float64 if cd == torch.float64 else torch.float32
    return y.to(in_dtype if compute_dtype is None else cd), S.to(out_state_dtype)
