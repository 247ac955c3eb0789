"""Self-check of the CUDA WKV-7 kernel (see rwkvslice/selfcheck.py): forward + backward on a small random
problem against the "torch" backend on the same device, once per (device, compute dtype, head size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rwkvslice.selfcheck import compare, decide

# RMS-relative. The kernel and the torch backend are each within 5e-3 (bf16) / 1e-4 (fp32) of an fp64
# reference (tests/runtime/test_wkv7_cuda.py), so they differ by well under these; a kernel bug (a missed
# barrier, a wrong index) shows up as O(1) errors.
WKV7_RMS_REL = {torch.bfloat16: 2e-2, torch.float32: 1e-3}


def wkv7_problem(B: int, T: int, H: int, N: int, dtype: torch.dtype, device, seed: int = 0):
    """Model-like inputs (w <= -0.5, a = -kk, b = kk * iclr) in `dtype`, an fp32 state and upstream gradients."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    w = -F.softplus(-randn(B, T, H, N)) - 0.5
    kk = F.normalize(randn(B, T, H, N), dim=-1)
    a, b = -kk, kk * torch.sigmoid(randn(B, T, H, N))
    inputs = [x.to(device=device, dtype=dtype) for x in (r, w, k, v, a, b)]
    inputs.append(randn(B, H, N, N).to(device))
    upstream = (randn(B, T, H, N).to(device), randn(B, H, N, N).to(device))
    return inputs, upstream


def _wkv7_fwd_bwd(fn, inputs, upstream) -> dict[str, torch.Tensor]:
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    y, s = fn(*leaves[:6], leaves[6])
    gy, gs = upstream
    grads = torch.autograd.grad((y.float() * gy).sum() + (s.float() * gs).sum(), leaves)
    names = ("dr", "dw", "dk", "dv", "da", "db", "dstate")
    return {"y": y.detach(), "state": s.detach(), **dict(zip(names, grads, strict=True))}


def check_wkv7(kernel, reference, dtype: torch.dtype, head_size: int, device) -> str | None:
    """Forward + backward of `kernel` and `reference` (wkv7-like callables) on B=2, T=40 (two full
    snapshot chunks and a partial one), H=2 from a random state; None when they agree within
    WKV7_RMS_REL[dtype], else what differed."""
    # gradients on whatever the caller's mode; tensors made under inference_mode could not be saved
    with torch.inference_mode(False), torch.enable_grad():
        inputs, upstream = wkv7_problem(2, 40, 2, head_size, dtype, device)
        want = _wkv7_fwd_bwd(reference, inputs, upstream)
        got = _wkv7_fwd_bwd(kernel, inputs, upstream)
    return compare({name: (got[name], want[name]) for name in want}, WKV7_RMS_REL[dtype])


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CUDA kernel computes inputs of `dtype` in (ops/wkv7_cuda.py: bf16 and fp32 as they are)."""
    return dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32


def wkv7_kernel_trusted(r: torch.Tensor) -> bool:
    """Whether "auto" may run the CUDA WKV-7 kernel for inputs like r (checked once per device, dtype, N)."""
    dtype, N = kernel_dtype(r.dtype), r.shape[-1]
    from rwkvslice.ops import wkv7_cuda as kernel_module
    from rwkvslice.ops.wkv7_torch import wkv7_torch

    def kernel(*args):
        return kernel_module.wkv7_cuda(*args)  # looked up at call time (tests stand in for it)

    return decide(
        ("wkv7", str(r.device), dtype, N),
        lambda: check_wkv7(kernel, wkv7_torch, dtype, N, r.device),
        f"the CUDA WKV-7 kernel ({str(dtype).removeprefix('torch.')}, head size {N}, {r.device}) "
        "against backend='torch'",
        "backend='auto' uses 'torch' for these inputs",
    )
