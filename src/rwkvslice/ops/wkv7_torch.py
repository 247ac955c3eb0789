"""WKV-7, the fast differentiable CPU path: a chunked form with a hand-written, memory-lean backward.

Recurrence (per batch and head, state S is N x N in the official [value][key] layout):

    S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,   y_t = S_t r_t,   d_t = exp(-exp(w_t))

The sequence is cut into chunks of L = CHUNK_LEN steps. Inside a chunk, with lam = log d = -exp(w),
Gi_t = lam_0 + ... + lam_t, Gx_t = Gi_t - lam_t, G_L the chunk total, S0 the chunk's start state and
sa_t = S_{t-1} a_t, all stacked with time as rows:

    SA  = Aw S0^T + M_ka V + M_ba SA        -> SA = P (Aw S0^T + M_ka V),  P = (I - M_ba)^{-1}
    Y   = Rw S0^T + Q_kr V + Q_br SA
    S_L = S0 diag(e^{G_L}) + V^T Kend + SA^T Bend

    Aw_t = a_t e^{Gx_t}, Rw_t = r_t e^{Gi_t}, Kend_s = k_s e^{G_L - Gi_s}, Bend_s = b_s e^{G_L - Gi_s}
    M_ka[t,s] = sum_j a_t k_s e^{Gx_t - Gi_s}  (s < t),   Q_kr[t,s] = sum_j r_t k_s e^{Gi_t - Gi_s}  (s <= t)
    (M_ba, Q_br: the same with b_s in place of k_s.)

Every exponent is a sum of log-decays over a range of steps, computed directly as such (an exact 0/+-1
matrix times lam), never by dividing by a cumulative decay product. The pairwise factors of the L x L
matrices are formed in one of two ways:
- "factored" (fast path): e^{Gx_t - Gi_s} = e^{Gx_t - c} e^{c - Gi_s}, c the cumulative log-decay at the
  chunk middle, so each factor is bounded by half a chunk of decay. Used only when that bound stays far
  from overflow, which always holds for the model's decays (>= exp(-exp(-0.5)) = 0.545).
- "pairwise" (fallback for extreme decays, w > ~1.6 in fp32): e^{sum of lam over s+1..t-1} per
  (t, s, channel), <= 1; its gradient goes to exactly the steps s < u < t (no cancelling terms).

Forward: a parallel pass over chunks computes the intra-chunk quantities, a sequential scan carries the
state from chunk to chunk (one snapshot per chunk), and Y follows in parallel. Autograd keeps only the
inputs and the snapshots. Backward recomputes the intra-chunk quantities, scans the state gradient
backwards, then forms all gradients in parallel. Inputs are converted and gradients written one segment
of chunks at a time, so the temporaries stay bounded for long inputs.

Resets (packing): where resets[b, t] is True the state before step t is replaced by R (`reset_state`,
zeros when None). Inside a chunk the steps then fall into segments (a new one at each reset); each row t
reads the initial state X of its own segment (S0 for the first, R for the others) and every exponent of
Aw_t, Rw_t runs from the start of t's segment; the L x L matrices are masked to pairs (t, s) of the same
segment, and Kend, Bend to the last segment, whose start state X_last (R if the chunk has a reset) is what
the scan carries. So the reset costs a few masks and a second small matmul per chunk, not a split of the
sequence; without resets nothing of this runs.

Autocast is disabled inside (fp32 compute regardless); y takes the inputs' dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CHUNK_LEN = 16
# Largest exponent allowed in the factored form: e^40 ~ 2e17 keeps fp32 products far from overflow.
_FACTORED_EXP_LIMIT = {torch.float32: 40.0, torch.float64: 300.0}
# Bound on the elements of the largest per-segment temporary (bounds peak memory for long inputs).
_SEGMENT_ELEMS = 1 << 20
_MID = CHUNK_LEN // 2 - 1  # the reference step c of the factored form
_LAM_MAX = 1e4  # bound on -log(decay); exp(-1e4) is 0 in fp32 and fp64 alike


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_view(buf: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """A (n_chunks, B*H, L, N) buffer seen as (B, n_chunks, L, H, N), i.e. the input's time layout."""
    n_chunks, _, L, N = buf.shape
    return buf.view(n_chunks, B, H, L, N).permute(1, 0, 3, 2, 4)


def _to_chunks(xs, n_chunks: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, t, H, N) tensors with (n_chunks - 1) * L < t <= n_chunks * L -> one buffer
    (n_chunks, B*H, len(xs)*L, N), the last chunk zero-padded."""
    B, T, H, N = xs[0].shape
    L = CHUNK_LEN
    buf = torch.empty(n_chunks, B * H, len(xs) * L, N, dtype=dtype, device=xs[0].device)
    parts = buf.view(n_chunks, B * H, len(xs), L, N)
    full, tail = divmod(T, L)
    for i, x in enumerate(xs):
        dst = _chunk_view(parts[:, :, i], B, H)
        dst[:, :full].copy_(x[:, : full * L].reshape(B, full, L, H, N))
        if tail:
            dst[:, full, :tail].copy_(x[:, full * L :])
            dst[:, full, tail:].zero_()
    return buf


def _from_chunks(buf: torch.Tensor, out: torch.Tensor) -> None:
    """Copy a (n_chunks, B*H, L, N) buffer into `out` (B, t, H, N), t <= n_chunks * L (casting dtype)."""
    B, T, H, N = out.shape
    L = CHUNK_LEN
    src = _chunk_view(buf, B, H)
    full, tail = divmod(T, L)
    out[:, : full * L].view(B, full, L, H, N).copy_(src[:, :full])
    if tail:
        out[:, full * L :].copy_(src[:, full, :tail])


_CONSTS: dict = {}


def _consts(dtype: torch.dtype, device: torch.device):
    """Exponent matrix (8L x L) and the 2L x 2L causal mask, cached per dtype/device.

    Rows of the exponent matrix, as sums of lam over step ranges, in the order of the products
    [Aw, Rw, Kend, Bend, Al, Rl, Kr, Br] (a, r, k, b scaled; the last four only in the factored form):
    Gx_t, Gi_t, G_L - Gi_s, G_L - Gi_s, Gx_t - c, Gi_t - c, c - Gi_s, c - Gi_s.
    """
    key = (dtype, device)
    if key not in _CONSTS:
        L = CHUNK_LEN
        ones = torch.ones(L, L, dtype=dtype, device=device)
        incl, excl, after = ones.tril(), ones.tril(-1), ones.triu(1)
        upto_mid = incl[_MID].expand(L, L)  # row of c = Gi_mid
        expo = torch.cat(
            [excl, incl, after, after, excl - upto_mid, incl - upto_mid, upto_mid - incl, upto_mid - incl]
        )
        top = torch.cat([excl, excl], 1)  # sa_t reads S_{t-1}: strictly causal
        bottom = torch.cat([incl, incl], 1)  # y_t reads S_t: includes step t
        _CONSTS[key] = (expo, torch.cat([top, bottom]))
    return _CONSTS[key]


def _needs_pairwise(w: torch.Tensor) -> bool:
    """True when the factored form could leave the safe exponent range (decays far below the model's)."""
    if w.numel() == 0:
        return False
    # Half a chunk of the strongest decay (|lam| = exp(w)) bounds every exponent of the factored form.
    worst = math.exp(min(float(w.max()), 80.0)) * (CHUNK_LEN // 2)
    return worst > _FACTORED_EXP_LIMIT[_compute_dtype(w)]


class _Segments:
    """Where the resets fall in a batch of chunks: resets (n, L) bool, one row per (chunk, batch, head).

    same (n, L, L): 1 where steps t and s lie in the same segment; first (n, L): t reads the chunk's
    start state S0 (no reset in the chunk up to t); has_reset (n,): the chunk ends in a segment that
    starts from R; last (n, L, 1): 1 for the steps of the chunk's last segment.
    """

    def __init__(self, resets: torch.Tensor, dtype: torch.dtype):
        sid = resets.to(torch.int32).cumsum(1)  # segment number of each step in its chunk
        self.same = (sid[:, :, None] == sid[:, None, :]).to(dtype)
        self.first = sid == 0
        self.has_reset = sid[:, -1] > 0
        self.last = (sid == sid[:, -1:]).to(dtype)[..., None]


def _segment_resets(resets: torch.Tensor, H: int, c0: int, c1: int, dtype: torch.dtype) -> _Segments:
    """_Segments of chunks c0..c1-1 in the row order of `_flat(_to_chunks(...))`: (chunk, batch, head)."""
    B, L = resets.shape[0], CHUNK_LEN
    part = resets[:, c0 * L : c1 * L]
    padded = part.new_zeros(B, (c1 - c0) * L)
    padded[:, : part.shape[1]] = part
    rows = padded.view(B, c1 - c0, 1, L).transpose(0, 1).expand(c1 - c0, B, H, L)
    return _Segments(rows.reshape(-1, L), dtype)


def _per_row(first: torch.Tensor, from_s0: torch.Tensor, x: torch.Tensor, R: torch.Tensor, bh: int):
    """Rows t of `from_s0` (= x @ S0-side operand) where `first`, else x @ R, for R (bh, N, N) shared by
    every chunk of the batch row. x (n, m, N) -> (n, m, N)."""
    n, m, N = x.shape
    from_r = torch.matmul(x.view(n // bh, bh, m, N), R).view(n, m, N)
    return torch.where(first[..., None], from_s0, from_r)


class _Intra:
    """Quantities of a batch of chunks that depend only on the chunk inputs.

    x4: (n, 4L, N) = [a; r; k; b] per chunk, lam: (n, L, N). `mall` (n, 2L, 2L) holds the four L x L
    matrices as [[M_ka, M_ba], [Q_kr, Q_br]]: rows [a-side; r-side], columns [k-side; b-side].
    `seg` (resets): exponents of Aw, Rw from each step's segment start, matrices masked to segments.
    """

    def __init__(self, x4: torch.Tensor, lam: torch.Tensor, pairwise: bool, seg: _Segments | None = None):
        L = CHUNK_LEN
        self.x4, self.lam, self.pairwise, self.seg = x4, lam, pairwise, seg
        expo_mat, self.mask = _consts(lam.dtype, lam.device)
        n_blocks = 4 if pairwise else 8
        self.expo_mat = expo_mat[: n_blocks * L]
        if seg is not None:  # per chunk: Aw, Rw rows sum lam over [segment start, t - 1 or t] only
            n = lam.shape[0]
            own = self.expo_mat[: 2 * L] * seg.same.repeat(1, 2, 1)
            self.expo_mat = torch.cat([own, self.expo_mat[2 * L :].expand(n, -1, -1)], 1)
            self.mask = self.mask * seg.same.repeat(1, 2, 2)
        self.e = torch.matmul(self.expo_mat, lam).exp_()  # (n, n_blocks*L, N)
        if seg is not None:  # only the last segment writes the chunk's end state
            self.e[:, 2 * L : 4 * L] *= seg.last.repeat(1, 2, 1)
        n, _, N = lam.shape
        prod = self.e.view(n, n_blocks // 4, 4 * L, N) * x4[:, None]
        self.prod = prod.view(n, n_blocks * L, N)  # [Aw, Rw, Kend, Bend (, Al, Rl, Kr, Br)]
        self.aw, self.rw = self.prod[:, :L], self.prod[:, L : 2 * L]
        self.kb_end, self.b_end = self.prod[:, 2 * L : 4 * L], self.prod[:, 3 * L : 4 * L]
        self.e_chunk = self.e[:, 2 * L - 1 : 2 * L]  # e^{G_L}, (n, 1, N)

        if pairwise:
            self.mall = self._pairwise_matrices()
            if seg is not None:
                self.mall.mul_(self.mask)
        else:
            self.lhs, self.rhs = self.prod[:, 4 * L : 6 * L], self.prod[:, 6 * L :]
            self.mall = torch.bmm(self.lhs, self.rhs.mT).mul_(self.mask)
        m_ka, m_ba = self.mall[:, :L, :L], self.mall[:, :L, L:]
        q_kr, q_br = self.mall[:, L:, :L], self.mall[:, L:, L:]
        self.m_ka, self.q_br = m_ka, q_br
        eye = torch.eye(L, dtype=lam.dtype, device=lam.device).expand_as(m_ba)
        self.p = torch.linalg.solve_triangular(eye - m_ba, eye, upper=False, unitriangular=True)
        self.w1 = torch.bmm(self.p, self.aw)  # SA = w1 S0^T + w2 V
        self.w2 = torch.bmm(self.p, m_ka)
        self.rq = torch.baddbmm(self.rw, q_br, self.w1)  # Y = rq S0^T + qv V
        self.qv = torch.baddbmm(q_kr, q_br, self.w2)
        # S_L = S0 diag(e^{G_L}) + (S0 w1^T) Bend + V^T u
        self.u = torch.baddbmm(self.prod[:, 2 * L : 3 * L], self.w2.mT, self.b_end)

    def _pairwise_matrices(self) -> torch.Tensor:
        L = CHUNK_LEN
        a, r, k, b = self.x4.unflatten(1, (4, L)).unbind(1)
        ones = torch.ones(L, L, dtype=torch.bool, device=a.device)
        strict = ones.tril(-1)
        # e[n, t, s, j] = exp(sum of lam over steps s+1 .. t-1) for s < t, accumulated along t as
        # lam_{t-1} [s < t-1]; the exponent is <= 0.
        lam_prev = F.pad(self.lam[:, :-1], (0, 0, 1, 0))
        expo = (lam_prev[:, :, None, :] * ones.tril(-2)[:, :, None]).cumsum(1)
        self.e_pair = expo.masked_fill_(~strict[:, :, None], float("-inf")).exp_()
        self.rdec = r * self.lam.exp()  # e^{Gi_t - Gi_s} = d_t e^{Gx_t - Gi_s}
        ea = a[:, :, None, :] * self.e_pair
        er = self.rdec[:, :, None, :] * self.e_pair
        k_s, b_s = k[:, None], b[:, None]
        top = torch.cat([(ea * k_s).sum(-1), (ea * b_s).sum(-1)], 2)
        diag_kr = torch.diag_embed((r * k).sum(-1))
        diag_br = torch.diag_embed((r * b).sum(-1))
        bottom = torch.cat([(er * k_s).sum(-1) + diag_kr, (er * b_s).sum(-1) + diag_br], 2)
        return torch.cat([top, bottom], 1)

    def backward(self, dprod, dmall, d_echunk, dx4_out):
        """Chain rule from the products to the inputs.

        dprod: like `prod`, its first 4L rows filled with the gradients of [Aw, Rw, Kend, Bend];
        dmall: gradient of the masked `mall`; d_echunk: of e^{G_L}. Writes d[a; r; k; b] (n, 4L, N)
        into dx4_out and returns dlam (n, L, N). Overwrites dprod and self.prod.
        """
        L = CHUNK_LEN
        if not self.pairwise:
            torch.bmm(dmall, self.rhs, out=dprod[:, 4 * L : 6 * L])
            torch.bmm(dmall.mT, self.lhs, out=dprod[:, 6 * L :])
        dexpo = self.prod.mul_(dprod)  # gradient of each exponent row (prod is not needed any more)
        dx = dprod.mul_(self.e)
        if self.pairwise:
            dx4_pair, dlam_pair = self._pairwise_backward(dmall)
            torch.add(dx, dx4_pair, out=dx4_out)
        else:
            torch.add(dx[:, : 4 * L], dx[:, 4 * L :], out=dx4_out)
        dlam = torch.matmul(self.expo_mat.mT, dexpo)
        if self.seg is None:
            dlam += d_echunk * self.e_chunk  # e^{G_L} with G_L = sum of all lam
        else:  # e^{sum of lam over the last segment}
            dlam += (d_echunk * self.e_chunk) * self.seg.last
        if self.pairwise:
            dlam += dlam_pair
        return dlam

    def _pairwise_backward(self, dmall: torch.Tensor):
        L = CHUNK_LEN
        a, r, k, b = self.x4.unflatten(1, (4, L)).unbind(1)
        d_ka, d_ba = dmall[:, :L, :L, None], dmall[:, :L, L:, None]
        d_kr, d_br = dmall[:, L:, :L], dmall[:, L:, L:]
        diag_kr, diag_br = d_kr.diagonal(0, 1, 2)[..., None], d_br.diagonal(0, 1, 2)[..., None]
        d_kr, d_br = d_kr.tril(-1)[..., None], d_br.tril(-1)[..., None]
        e = self.e_pair
        k_s, b_s = k[:, None], b[:, None]
        a_t, rd_t = a[:, :, None], self.rdec[:, :, None]
        da = (e * (d_ka * k_s + d_ba * b_s)).sum(2)
        drd = (e * (d_kr * k_s + d_br * b_s)).sum(2)
        dk = (e * (d_ka * a_t + d_kr * rd_t)).sum(1)
        db = (e * (d_ba * a_t + d_br * rd_t)).sum(1)
        # The pair (t, s) exponent is the sum of lam_u over s < u < t. Its gradient is added to exactly
        # those u (prefix sums over s, then a masked sum over t), not as +Gx_t / -Gi_s terms that cancel:
        # a cancellation residue would be multiplied by |lam|, which is large on this path.
        grad_pair = e * (a_t * (d_ka * k_s + d_ba * b_s) + rd_t * (d_kr * k_s + d_br * b_s))
        before_u = F.pad(grad_pair.cumsum(2)[:, :, :-1], (0, 0, 1, 0))  # [t, u]: sum over s < u
        strict = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)  # t > u
        dlam = (before_u * strict[:, :, None]).sum(1) + drd * self.rdec  # rdec = r_t e^{lam_t}
        dr = drd * self.lam.exp() + diag_kr * k + diag_br * b
        dk = dk + diag_kr * r
        db = db + diag_br * r
        return torch.cat([da, dr, dk, db], 1), dlam


def _segments(n_chunks: int, bh: int, N: int, pairwise: bool):
    per_chunk = bh * CHUNK_LEN * N * (CHUNK_LEN if pairwise else 8)
    size = max(1, _SEGMENT_ELEMS // per_chunk)
    return [(c0, min(c0 + size, n_chunks)) for c0 in range(0, n_chunks, size)]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[2:])


def _segment_inputs(r, w, k, v, a, b, c0: int, c1: int):
    """The chunks c0..c1-1 of the inputs: x4 = [a; r; k; b] (n, 4L, N), v (n, L, N) and lam (n, L, N)."""
    cd = _compute_dtype(r)
    t = slice(c0 * CHUNK_LEN, c1 * CHUNK_LEN)
    # The clamp keeps exp(w) finite (decay exp(-1e4) is 0 anyway); zero padding = decay 1 keeps the state.
    lam = _to_chunks([-w[:, t].to(cd).exp().clamp_(max=_LAM_MAX)], c1 - c0, cd)
    x4 = _to_chunks([a[:, t], r[:, t], k[:, t], b[:, t]], c1 - c0, cd)
    return _flat(x4), _flat(_to_chunks([v[:, t]], c1 - c0, cd)), _flat(lam)


class _WKV7Chunked(torch.autograd.Function):
    # Autocast is switched off inside: it would run the matmuls in bf16/fp16 (losing the fp32 accuracy)
    # and clash with the fp32 out= buffers. The inputs' own dtype still decides y's dtype.

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, state, resets=None, reset_state=None):
        with torch.autocast(r.device.type, enabled=False):
            return _WKV7Chunked._forward(ctx, r, w, k, v, a, b, state, resets, reset_state)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, ds_final):
        with torch.autocast(ctx.device_type, enabled=False):
            return _WKV7Chunked._backward(ctx, dy, ds_final)

    @staticmethod
    def _forward(ctx, r, w, k, v, a, b, state, resets, reset_state):
        B, T, H, N = r.shape
        bh, L, cd = B * H, CHUNK_LEN, _compute_dtype(r)
        R = None if resets is None else _reset_matrix(reset_state, bh, N, cd, r.device)
        n_chunks = -(-T // L)
        pairwise = _needs_pairwise(w)
        snaps = torch.empty(n_chunks, bh, N, N, dtype=cd, device=r.device)  # start state of each chunk
        final = torch.empty(bh, N, N, dtype=cd, device=r.device)
        if state is None:
            snaps[0].zero_()
        else:
            snaps[0].copy_(state.reshape(bh, N, N))
        y = torch.empty(r.shape, dtype=r.dtype, device=r.device)
        for c0, c1 in _segments(n_chunks, bh, N, pairwise):
            x4, vs, lam = _segment_inputs(r, w, k, v, a, b, c0, c1)
            seg = None if resets is None else _segment_resets(resets, H, c0, c1, cd)
            it = _Intra(x4, lam, pairwise, seg)
            # Each chunk's next state starts as its value part V^T u, written where it will live.
            last = (c1 - c0 - 1) * bh
            torch.bmm(vs[:last].mT, it.u[:last], out=_flat(snaps[c0 + 1 : c1]))
            torch.bmm(vs[last:].mT, it.u[last:], out=snaps[c1] if c1 < n_chunks else final)
            for c in range(c0, c1):
                rows = slice((c - c0) * bh, (c - c0 + 1) * bh)
                s, nxt = snaps[c], (snaps[c + 1] if c + 1 < n_chunks else final)
                if seg is not None:  # the last segment starts from R where the chunk has a reset
                    s = torch.where(seg.has_reset[rows, None, None], R, s)
                nxt.baddbmm_(torch.bmm(s, it.w1[rows].mT), it.b_end[rows]).addcmul_(s, it.e_chunk[rows])
            if seg is None:
                y_seg = torch.baddbmm(torch.bmm(it.qv, vs), it.rq, _flat(snaps[c0:c1]).mT)
            else:
                s0_part = torch.bmm(it.rq, _flat(snaps[c0:c1]).mT)
                y_seg = torch.bmm(it.qv, vs) + _per_row(seg.first, s0_part, it.rq, R.mT, bh)
            _from_chunks(y_seg.view(c1 - c0, bh, L, N), y[:, c0 * L : c1 * L])
        ctx.save_for_backward(r, w, k, v, a, b, snaps, resets, R)
        ctx.state_dtype = None if state is None else state.dtype
        ctx.reset_dtype = None if reset_state is None else reset_state.dtype
        ctx.pairwise = pairwise
        ctx.device_type = r.device.type
        return y, final.view(B, H, N, N)

    @staticmethod
    def _backward(ctx, dy, ds_final):
        r, w, k, v, a, b, snaps, resets, R = ctx.saved_tensors
        B, T, H, N = r.shape
        bh, L, cd = B * H, CHUNK_LEN, snaps.dtype
        n_chunks = snaps.shape[0]
        dy = torch.zeros_like(r) if dy is None else dy
        # ds: the gradient of the state at the current chunk boundary, carried backwards.
        ds = torch.zeros(bh, N, N, dtype=cd, device=r.device)
        if ds_final is not None:
            ds.copy_(ds_final.reshape(bh, N, N))
        grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (a, r, k, b, v, w)]
        dR = None if resets is None else torch.zeros(bh, N, N, dtype=cd, device=r.device)
        for c0, c1 in reversed(_segments(n_chunks, bh, N, ctx.pairwise)):
            n_seg, t = c1 - c0, slice(c0 * L, c1 * L)
            x4, vs, lam = _segment_inputs(r, w, k, v, a, b, c0, c1)
            seg = None if resets is None else _segment_resets(resets, H, c0, c1, cd)
            it = _Intra(x4, lam, ctx.pairwise, seg)
            dys = _flat(_to_chunks([dy[:, t]], n_seg, cd))
            dys_s0 = dys
            if seg is not None:  # rows of later segments read R: their gradient goes to dR, not to S0
                dys_s0 = dys * seg.first[..., None]
                dR += torch.bmm((dys - dys_s0).mT, it.rq).view(n_seg, bh, N, N).sum(0)
            # Backward scan: ds_end[i] is the gradient of chunk c0+i's end state; each start-state
            # gradient begins as dY^T rq, written where it will live.
            ds_end = torch.empty(n_seg, bh, N, N, dtype=cd, device=r.device)
            ds_end[-1] = ds
            torch.bmm(dys_s0[bh:].mT, it.rq[bh:], out=_flat(ds_end[:-1]))
            torch.bmm(dys_s0[:bh].mT, it.rq[:bh], out=ds)
            for i in reversed(range(n_seg)):
                rows = slice(i * bh, (i + 1) * bh)
                prev = ds_end[i - 1] if i > 0 else ds
                if seg is None:
                    prev.baddbmm_(torch.bmm(ds_end[i], it.b_end[rows].mT), it.w1[rows])
                    prev.addcmul_(ds_end[i], it.e_chunk[rows])
                else:  # the gradient of the last segment's start state: S0's, or R's after a reset
                    g = torch.bmm(torch.bmm(ds_end[i], it.b_end[rows].mT), it.w1[rows])
                    g.addcmul_(ds_end[i], it.e_chunk[rows])
                    reset = seg.has_reset[rows, None, None]
                    prev += torch.where(reset, 0.0, g)
                    dR += torch.where(reset, g, 0.0)
            s0, dsl = _flat(snaps[c0:c1]), _flat(ds_end)
            if seg is None:
                sa = torch.baddbmm(torch.bmm(it.w2, vs), it.w1, s0.mT)  # SA_t = S_{t-1} a_t
            else:
                sa = torch.bmm(it.w2, vs) + _per_row(seg.first, torch.bmm(it.w1, s0.mT), it.w1, R.mT, bh)
            v_sa = torch.cat([vs, sa], 1)
            kb_dsl = torch.bmm(it.kb_end, dsl.mT)  # [Kend; Bend] dS_L^T
            dsa = torch.baddbmm(kb_dsl[:, L:], it.q_br.mT, dys)
            dzy = torch.empty_like(v_sa)  # [dZ; dY]
            torch.bmm(it.p.mT, dsa, out=dzy[:, :L])  # adjoint of SA = Aw S0^T + M_ka V + M_ba SA
            dzy[:, L:] = dys
            dmall = torch.bmm(dzy, v_sa.mT).mul_(it.mask)  # [[dM_ka, dM_ba], [dQ_kr, dQ_br]]
            dv = torch.baddbmm(kb_dsl[:, :L], it.mall[:, :, :L].mT, dzy)
            # Gradients of the products [Aw, Rw] (they read S0), [Kend, Bend] (they write S_L) and,
            # in the factored form, of the factors of the intra-chunk matrices.
            dprod = torch.empty_like(it.prod)
            if seg is None:
                torch.bmm(dzy, s0, out=dprod[:, : 2 * L])
                d_echunk = (s0 * dsl).sum(-2, keepdim=True)
            else:
                dprod[:, : 2 * L] = _per_row(seg.first.repeat(1, 2), torch.bmm(dzy, s0), dzy, R, bh)
                s_last = torch.where(seg.has_reset[:, None, None], R.repeat(n_seg, 1, 1), s0)
                d_echunk = (s_last * dsl).sum(-2, keepdim=True)
            torch.bmm(v_sa, dsl, out=dprod[:, 2 * L : 4 * L])
            dx4 = torch.empty_like(x4)
            dlam = it.backward(dprod, dmall, d_echunk, dx4_out=dx4)
            dx4 = dx4.view(n_seg, bh, 4, L, N)
            for i in range(4):
                _from_chunks(dx4[:, :, i], grads[i][:, t])
            _from_chunks(dv.view(n_seg, bh, L, N), grads[4][:, t])
            _from_chunks(dlam.mul_(lam).view(n_seg, bh, L, N), grads[5][:, t])  # lam = -exp(w): dlam/dw = lam
        da, dr, dk, db, dv_out, dw_out = grads
        d_state = None if ctx.state_dtype is None else ds.view(B, H, N, N).to(ctx.state_dtype)
        d_reset = None
        if ctx.reset_dtype is not None and dR is not None:
            d_reset = dR.view(B, H, N, N).to(ctx.reset_dtype)
        return dr, dw_out, dk, dv_out, da, db, d_state, None, d_reset


def _reset_matrix(reset_state, bh: int, N: int, dtype: torch.dtype, device) -> torch.Tensor:
    if reset_state is None:
        return torch.zeros(bh, N, N, dtype=dtype, device=device)
    return reset_state.reshape(bh, N, N).to(dtype)


def wkv7_torch(r, w, k, v, a, b, state=None, *, resets=None, reset_state=None):
    """WKV-7 over a sequence (chunked, differentiable). Same contract as `rwkvslice.ops.wkv7`.

    Computes in fp64 for fp64 inputs, otherwise in fp32. Returns y in r's dtype and the final state
    (B, H, N, N) in the compute dtype (fp32, or fp64 for fp64 inputs).
    resets with no True at all run the plain path (bit for bit as resets=None; reset_state then gets no
    gradient, as it is not used).
    """
    B, T, H, N = r.shape
    if resets is not None and not bool(resets.any()):
        resets, reset_state = None, None
    if T == 0:
        cd = _compute_dtype(r)
        s = torch.zeros(B, H, N, N, dtype=cd, device=r.device) if state is None else state.to(cd) + 0
        return r.new_zeros(B, 0, H, N), s
    if resets is None:
        return _WKV7Chunked.apply(r, w, k, v, a, b, state)
    return _WKV7Chunked.apply(r, w, k, v, a, b, state, resets, reset_state)
