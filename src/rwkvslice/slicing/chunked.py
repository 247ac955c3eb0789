"""Chunked fused linear + cross-entropy: the N x V logits never exist at once.

The rows (kept positions) are processed in chunks. For each chunk the forward pass computes the
logits, their log-sum-exp in fp32 and, when gradients are wanted, the gradient of the logits
(softmax - onehot); it folds that straight into grad_x[chunk] = dlogits @ W and into an fp32
accumulator grad_W += dlogits^T @ x[chunk] (addmm into the buffer itself, so no V x C temporary per
chunk). Backward only scales the stored gradients by the upstream gradient. Peak memory is therefore
W + grad_W (fp32) + x + grad_x + one chunk of logits.

Numerics (see shared/research/loss_memory.md section 6.5):
- log-sum-exp, softmax and the loss run in fp32 (fp64 for fp64 inputs) even for bf16 logits.
- The target column is taken out of the exp-sum: with s_rest = sum_{j != y} exp(z_j - m) and
  d = z_y - m (m the row max), loss = log1p(expm1(d) + s_rest) - d and the true-class gradient
  p_y - 1 = -s_rest / (exp(d) + s_rest). Neither subtracts two numbers near 1, so a confident row
  (p_y -> 1) keeps a small loss and true-class gradient with full relative precision instead of the
  catastrophic cancellation of p_y - 1 (Liger-Kernel PR #1329).

GEMM dtypes:
- logits = x @ W^T runs in the compute dtype (the autocast dtype under autocast, as F.linear would).
- On CUDA with bf16/fp16 the two gradient GEMMs run in that dtype (tensor cores), with grad_W
  accumulated in fp32 by addmm(out_dtype=float32) where torch has it: the aten::addmm.dtype_out
  overload, CUDA only, since torch 2.8 (2.5-2.7 have no out_dtype and raise TypeError; CPU raises
  NotImplementedError on 2.13). Elsewhere the chunk's dlogits and x are upcast to fp32 for grad_W (one
  extra n x V fp32 copy per chunk). A probe on the first use decides (an overload that does not
  accumulate into `out` is refused too: pytorch/pytorch#154086 reports early builds of the overload
  mishandling out=), and last_grad_w_path() says which path the last call took.
  That path is used only after it agreed with the fp32 path on a small problem (slicing/selfcheck.py).
- Elsewhere (CPU) they run in fp32 from the fp32 gradient buffer: measured here (avx512_bf16 Xeon,
  torch 2.13) the fp32 GEMMs of these shapes were ~1.7x faster than bf16 ones, CPU has no
  mixed-dtype addmm, and fp32 is the more accurate choice anyway.
"""

from __future__ import annotations

import torch

# Chunk-size rule (rows per chunk), see choose_chunk_size.
_MIN_CHUNK_ROWS = 32


def choose_chunk_size(
    num_rows: int, vocab_size: int, channels: int, compute_dtype: torch.dtype = torch.float32
) -> int:
    """Rows per chunk, from N, V, C and the compute dtype.

    A chunk's logits buffers (n x V in the compute dtype, plus an fp32 copy for bf16/fp16) are kept at
    about half of the fp32 V x C weight-gradient accumulator that training holds anyway, i.e.
    n = 2C / (bytes per logit): C/2 rows in fp32, C/3 in bf16. Chunking then adds at most ~50 % to the
    unavoidable memory, independent of N and V. Smaller chunks cost time, not just memory: each chunk
    re-reads W twice and reads+writes the whole V x C accumulator, so the GEMMs turn memory-bound.
    Measured (single process, N=2048, C=512, V=65536, fp32, CPU seconds, median of 2): unchunked
    4.1; 64 rows 6.0, 128 rows 4.7, 256 rows (= C/2) 4.1, 512 rows 3.7. Liger's rule (logits of one
    chunk as big as x: N / ceil(V/C) = 16 rows here) would be ~1.5x slower than unchunked. At least
    _MIN_CHUNK_ROWS rows (for tiny C), never more than N.
    """
    if num_rows <= 0:
        return 1
    bytes_per_logit = _dtype_size(compute_dtype) + (4 if _dtype_size(compute_dtype) < 4 else 0)
    rows = (channels * 4) // (2 * bytes_per_logit)  # n * V * bytes = (V * C * 4) / 2
    return max(1, min(max(rows, _MIN_CHUNK_ROWS), num_rows))


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# Devices whose bf16/fp16 gradient GEMMs run in that dtype (tensor cores); elsewhere they run in fp32.
LOW_PRECISION_GRAD_GEMM_DEVICES: tuple[str, ...] = ("cuda",)

_FP32_OUT_ADDMM: dict[str, bool] = {}


def _has_fp32_out_addmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether addmm(out_dtype=float32, out=fp32) accepts `dtype` inputs on this device (CUDA, torch>=2.8)."""
    key = f"{device}:{dtype}"
    if key not in _FP32_OUT_ADDMM:
        try:
            acc = torch.ones(2, 2, device=device)
            low = torch.ones(2, 2, device=device, dtype=dtype)
            torch.addmm(acc, low, low, out_dtype=torch.float32, out=acc)  # accumulates: 1 + 2
            _FP32_OUT_ADDMM[key] = bool(acc.dtype == torch.float32 and acc[0, 0].item() == 3.0)
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_OUT_ADDMM[key] = False
    return _FP32_OUT_ADDMM[key]


# How the last chunked forward that computed grad_W accumulated it (see last_grad_w_path).
GRAD_W_PATHS = ("addmm_fp32_out", "upcast_fp32", "fp32")
_last_grad_w_path: str | None = None


def last_grad_w_path() -> str | None:
    """The weight-gradient GEMM path of the most recent chunked forward that computed grad_W (None before):
    "addmm_fp32_out" (low-precision GEMM accumulating into the fp32 buffer: the fast CUDA path),
    "upcast_fp32" (low-precision dlogits and x upcast to fp32 first: torch without the overload), or
    "fp32" (the fp32 path: CPU, fp32 compute, or a low-precision path that failed its self-check)."""
    return _last_grad_w_path


def _accumulate_grad_w_low(grad_w, u, xs, fp32_out_addmm: bool) -> None:
    """grad_w (fp32) += u^T @ xs for low-precision u (dlogits) and xs."""
    if fp32_out_addmm:
        torch.addmm(grad_w, u.t(), xs, out_dtype=torch.float32, out=grad_w)
    else:
        grad_w.addmm_(u.t().to(grad_w.dtype), xs.to(grad_w.dtype))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(x @ W^T, target). All targets must be valid ids in [0, V) (the caller
    checks and drops -100 rows). Gradients are computed in forward for the inputs flagged in
    need_grad_x / need_grad_w; backward may run once (no retain_graph)."""

    @staticmethod
    def forward(ctx, x, weight, target, chunk_size, compute_dtype, need_grad_x, need_grad_w):
        # Autocast is decided by the caller (compute_dtype); inside, every dtype is explicit.
        with torch.autocast(device_type=x.device.type, enabled=False):
            loss, grad_x, grad_w = _forward(
                x, weight, target, chunk_size, compute_dtype, need_grad_x, need_grad_w
            )
        ctx.grads = (grad_x, grad_w)
        ctx.mark_non_differentiable(target)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError(
                "chunked linear_cross_entropy: backward ran twice; its gradients are computed in "
                "forward and handed over once (retain_graph is not supported)"
            )
        grad_x, grad_w = ctx.grads
        ctx.grads = None  # hand the buffers over; autograd now owns them
        # Skipping the scale when the upstream gradient is exactly 1 saves a pass over V x C.
        if grad_output.item() != 1.0:
            if grad_x is not None:
                grad_x.mul_(grad_output.to(grad_x.dtype))
            if grad_w is not None:
                grad_w.mul_(grad_output.to(grad_w.dtype))
        return grad_x, grad_w, None, None, None, None, None


def grad_gemm_plan(device: torch.device, compute_dtype: torch.dtype, need_grad_x: bool, need_grad_w: bool,
                   grad_gemm_low: bool | None = None) -> tuple[bool, bool]:
    """(low-precision gradient GEMMs?, fp32-out addmm for grad_W?) for a chunked forward, recording the
    grad_W path for last_grad_w_path(). grad_gemm_low forces the low-precision GEMMs on or off (None decides):
    on CUDA with bf16/fp16 once they passed their self-check, else fp32 GEMMs."""
    global _last_grad_w_path
    acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    low_precision = compute_dtype != acc_dtype
    if grad_gemm_low is None:
        grad_gemm_low = low_precision and device.type in LOW_PRECISION_GRAD_GEMM_DEVICES
        if grad_gemm_low and (need_grad_x or need_grad_w):
            from rwkvslice.slicing import selfcheck

            grad_gemm_low = selfcheck.low_precision_grad_gemm_trusted(device, compute_dtype)
    grad_gemm_low = grad_gemm_low and low_precision
    fp32_out_addmm = grad_gemm_low and need_grad_w and _has_fp32_out_addmm(device, compute_dtype)
    if need_grad_w:
        _last_grad_w_path = "addmm_fp32_out" if fp32_out_addmm else "upcast_fp32" if grad_gemm_low else "fp32"
    return grad_gemm_low, fp32_out_addmm


def fold_chunk_gradients(z, logits, xs, w_c, w_acc, row_scale, grad_x_rows, grad_w, grad_gemm_low: bool,
                         fp32_out_addmm: bool) -> None:
    """One chunk's gradients from its unnormalised dlogits z (acc dtype, n x V; overwritten):
    grad_x_rows = (z * row_scale) @ W and grad_w += (z * row_scale)^T @ xs, for row_scale (n x 1) the
    softmax normaliser 1/total times any per-row weight. Either output may be None (not wanted).

    On the fp32 path the row scale is applied to the small (n x C) operands and results instead of the
    n x V buffer. On the low-precision path the dlogits are normalised first, so the low-precision copy
    (written into the chunk's `logits` buffer) holds values in [-1, 1] (fp16-safe)."""
    acc_dtype = z.dtype
    if grad_gemm_low:
        u = logits.copy_(z.mul_(row_scale))
        if grad_x_rows is not None:
            grad_x_rows.copy_(torch.mm(u, w_c))
        if grad_w is not None:
            _accumulate_grad_w_low(grad_w, u, xs, fp32_out_addmm)
        return
    if grad_x_rows is not None:
        if grad_x_rows.dtype == acc_dtype:
            torch.mm(z, w_acc, out=grad_x_rows)
            grad_x_rows.mul_(row_scale)
        else:
            grad_x_rows.copy_(torch.mm(z, w_acc).mul_(row_scale))
    if grad_w is not None:
        grad_w.addmm_(z.t(), xs.to(acc_dtype) * row_scale)


def target_free_exp(z: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one chunk's logits z (acc dtype, n x V, overwritten) and targets ts (n x 1): returns (row max m,
    the target's logit z_y, rest = sum over j != y of exp(z_j - m)), leaving z = exp(z - m) with the
    target column 0."""
    z_target = z.gather(1, ts)
    row_max = z.amax(dim=1, keepdim=True)
    z.sub_(row_max).exp_()
    z.scatter_(1, ts, 0.0)
    return row_max, z_target, z.sum(dim=1, keepdim=True)


def stable_ce(d: torch.Tensor, rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss, 1/total) from d = z_y - m (<= 0) and rest = sum_{j != y} exp(z_j - m): loss =
    log1p(expm1(d) + rest) - d, with no subtraction of two numbers near 1 (module docstring)."""
    return torch.log1p(torch.expm1(d) + rest) - d, (torch.exp(d) + rest).reciprocal()


def _forward(x, weight, target, chunk_size, compute_dtype, need_grad_x, need_grad_w, grad_gemm_low=None):
    """grad_gemm_low: force the low-precision gradient GEMMs on (True) or off (False); None decides."""
    num_rows = x.shape[0]
    device = x.device
    acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    grad_gemm_low, fp32_out_addmm = grad_gemm_plan(device, compute_dtype, need_grad_x, need_grad_w, grad_gemm_low)

    x_c = x.to(compute_dtype)
    w_c = weight.to(compute_dtype)
    # fp32 W for the fp32 gradient GEMM (no copy when W is an fp32 master weight).
    w_acc = weight.to(acc_dtype) if need_grad_x and not grad_gemm_low else None

    grad_x = torch.empty(x.shape, dtype=x.dtype, device=device) if need_grad_x else None
    grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=device) if need_grad_w else None
    loss = torch.zeros((), dtype=acc_dtype, device=device)

    for start in range(0, num_rows, chunk_size):
        stop = min(start + chunk_size, num_rows)
        xs = x_c[start:stop]
        ts = target[start:stop].unsqueeze(1)
        logits = torch.mm(xs, w_c.t())
        z = logits if logits.dtype == acc_dtype else logits.to(acc_dtype)
        row_max, z_target, rest = target_free_exp(z, ts)
        d = z_target - row_max  # <= 0
        row_loss, inv_total = stable_ce(d, rest)
        loss += row_loss.sum()

        if need_grad_x or need_grad_w:
            # dlogits = softmax - onehot = u / total with u_j = exp(z_j - m) (j != y), u_y = -rest:
            # p_y - 1 = -rest / total without cancellation.
            z.scatter_(1, ts, -rest)
            fold_chunk_gradients(z, logits, xs, w_c, w_acc, inv_total,
                                 grad_x[start:stop] if need_grad_x else None, grad_w,
                                 grad_gemm_low, fp32_out_addmm)
        del logits, z  # free this chunk's buffers before the next chunk allocates its own

    if grad_w is not None and grad_w.dtype != weight.dtype:
        grad_w = grad_w.to(weight.dtype)
    return loss.to(torch.float64 if acc_dtype == torch.float64 else torch.float32), grad_x, grad_w
