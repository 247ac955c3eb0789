"""WKV-7 through our kernel: `wkv7_cuda` (CUDA, fused, bf16/fp32 in, fp32 state) and `wkv7_host` (the
same arithmetic compiled for the CPU, for tests).

Both run one autograd.Function, `_WKV7Function`, over an "ops" object with two calls mirroring the kernel:

    y, sT, snap, sa = ops.wkv7_forward(r, w, k, v, a, b, s0, resets, reset_state, need_backward)
    dr, dw, dk, dv, da, db, ds0, dreset_state = ops.wkv7_backward(
        r, w, k, v, a, b, dy, dsT, snap, sa, s0, resets, reset_state)

snap and sa are empty when need_backward is False (a forward under no_grad); resets (B, T) bool and
reset_state (B, H, N, N) fp32 are None without resets (then dreset_state is empty).

For "cuda" the ops are torch.ops.rwkvslice (registered by cuda/wkv7_op.cpp); for "host" they are
`HostOps` below, calling the ctypes-loaded host build. So the CPU tests of backend="host" also exercise the
autograd wiring used on the GPU. A static test checks these calls against the C++ schemas.

Resets (packed sequences): where resets[b, t] is True the state before step t is replaced by reset_state[b];
the backward replays a chunk forward from its snapshot instead of backstepping across a reset.

The kernel handles any T itself (the last state snapshot is taken at T-1), so nothing is padded.
The backward rebuilds earlier states by dividing by the decay (see cuda/wkv7_core.cuh): accurate for the
model's decays (>= 0.545), not for decays near 0.
"""

from __future__ import annotations

import functools
import warnings

import torch

from rwkvslice.cuda.build import KernelBuildError, load_cuda_extension, load_host_library
from rwkvslice.errors import ConfigError

# Steps between two fp32 state snapshots; WKV7_CHUNK_LEN in cuda/wkv7_core.cuh (checked by a static test and
# when the host library loads).
CHUNK_LEN = 16
# Head sizes compiled into the CUDA kernels (cuda/wkv7_cuda.cu) and into the host build (cuda/wkv7_host.cpp).
CUDA_HEAD_SIZES = (16, 32, 64)
HOST_HEAD_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def num_chunks(T: int) -> int:
    return (T + CHUNK_LEN - 1) // CHUNK_LEN


class HostOps:
    """The kernel's two ops on CPU fp32 contiguous tensors, computed by the host build."""

    @staticmethod
    def _lib():
        lib = load_host_library()
        if lib.rwkvslice_wkv7_chunk_len() != CHUNK_LEN:
            raise KernelBuildError(
                f"host kernel chunk length {lib.rwkvslice_wkv7_chunk_len()} != CHUNK_LEN {CHUNK_LEN}"
            )
        return lib

    @staticmethod
    def wkv7_forward(r, w, k, v, a, b, s0, resets, reset_state, need_backward):
        B, T, H, N = r.shape
        y = torch.empty_like(r)
        sT = r.new_empty(B, H, N, N)
        # The backward's buffers; empty (a null pointer: the kernel skips them) when no backward will run.
        snap = r.new_empty(B, H, num_chunks(T), N, N) if need_backward else r.new_empty(0)
        sa = r.new_empty(B, T, H, N) if need_backward else r.new_empty(0)
        rc = HostOps._lib().rwkvslice_wkv7_host_forward(
            B, T, H, N, *_ptrs(r, w, k, v, a, b, s0, resets, reset_state, y, sT, snap, sa)
        )
        _check_rc("forward", rc, N)
        return y, sT, snap, sa

    @staticmethod
    def wkv7_backward(r, w, k, v, a, b, dy, dsT, snap, sa, s0, resets, reset_state):
        B, T, H, N = r.shape
        dr, dw, dk, dv, da, db = (torch.empty_like(r) for _ in range(6))
        ds0 = r.new_empty(B, H, N, N)
        # Zeroed and accumulated by the kernel at the reset steps; empty (not written) without resets.
        dreset_state = r.new_empty(B, H, N, N) if resets is not None else r.new_empty(0)
        # fmt: off
        rc = HostOps._lib().rwkvslice_wkv7_host_backward(
            B, T, H, N,
            *_ptrs(r, w, k, v, a, b, dy, dsT, snap, sa, s0, resets, reset_state,
                   dr, dw, dk, dv, da, db, ds0, dreset_state),
        )
        # fmt: on
        _check_rc("backward", rc, N)
        return dr, dw, dk, dv, da, db, ds0, dreset_state


def _ptrs(*tensors: torch.Tensor | None) -> list[int | None]:
    """Raw pointers for the host library; None or an empty tensor passes a null pointer (an absent input, an
    output to skip)."""
    for x in tensors:  # the C side indexes raw memory: anything else would be read wrongly, not rejected
        assert x is None or (
            x.dtype in (torch.float32, torch.bool) and x.device.type == "cpu" and x.is_contiguous()
        )
    return [x.data_ptr() if x is not None and x.numel() else None for x in tensors]


def _check_rc(what: str, rc: int, N: int) -> None:
    if rc != 0:
        raise ConfigError(
            f"wkv7 backend='host' {what}: head size {N} not compiled (one of {HOST_HEAD_SIZES})"
        )


class _WKV7Function(torch.autograd.Function):
    """y, final state = WKV-7(r, w, k, v, a, b, s0, resets, reset_state) through `ops`; inputs already in the
    kernel's dtype and layout (resets None, or bool (B, T) with reset_state fp32 (B, H, N, N))."""

    @staticmethod
    def forward(ctx, ops, need_backward, r, w, k, v, a, b, s0, resets, reset_state):
        y, sT, snap, sa = ops.wkv7_forward(r, w, k, v, a, b, s0, resets, reset_state, need_backward)
        ctx.ops = ops
        if need_backward:
            ctx.save_for_backward(r, w, k, v, a, b, snap, sa, s0, resets, reset_state)
        return y, sT

    @staticmethod
    def backward(ctx, dy, dsT):
        r, w, k, v, a, b, snap, sa, s0, resets, reset_state = ctx.saved_tensors
        B, T, H, N = r.shape
        dy = torch.zeros_like(r) if dy is None else dy.to(r.dtype).contiguous()
        dsT = r.new_zeros(B, H, N, N, dtype=torch.float32) if dsT is None else dsT.float().contiguous()
        dr, dw, dk, dv, da, db, ds0, dreset_state = ctx.ops.wkv7_backward(
            r, w, k, v, a, b, dy, dsT, snap, sa, s0, resets, reset_state
        )
        return None, None, dr, dw, dk, dv, da, db, ds0, None, (None if resets is None else dreset_state)


def _check_resets(backend: str, r: torch.Tensor, resets, reset_state) -> None:
    """resets: (B, T) bool; reset_state: (B, H, N, N) fp32; both on r's device. One-line ConfigError else."""
    B, T, H, N = r.shape
    where = f"wkv7 backend={backend!r}"
    for name, x, dtype, shape in (
        ("resets", resets, torch.bool, (B, T)),
        ("reset_state", reset_state, torch.float32, (B, H, N, N)),
    ):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"{where}: {name} must be a tensor, got {type(x).__name__}")
        if x.dtype != dtype:
            raise ConfigError(f"{where}: {name} must be {dtype}, got {x.dtype}")
        if tuple(x.shape) != shape:
            raise ConfigError(f"{where}: {name} has shape {tuple(x.shape)}, expected {shape}")
        if x.device != r.device:
            raise ConfigError(f"{where}: {name} is on {x.device}, r on {r.device}")


def _run(ops, compute_dtype, r, w, k, v, a, b, state, resets, reset_state):
    """Cast to the kernel's dtype (autograd carries gradients back to the callers' dtypes), run, cast y back."""
    B, T, H, N = r.shape
    in_dtype = r.dtype
    r, w, k, v, a, b = (x.to(compute_dtype).contiguous() for x in (r, w, k, v, a, b))
    if state is None:
        s0 = r.new_zeros(B, H, N, N, dtype=torch.float32)
    else:
        s0 = state.to(device=r.device, dtype=torch.float32).contiguous()
    if resets is None:
        reset_state = None  # only read at resets
    else:
        resets = resets.contiguous()
        reset_state = (
            r.new_zeros(B, H, N, N, dtype=torch.float32) if reset_state is None else reset_state.contiguous()
        )
    # Under no_grad (or with no input requiring grad) the forward skips the backward's state snapshots (T/16
    # states) and sa (the size of y). ctx.needs_input_grad cannot tell: it stays True under no_grad.
    differentiable = (r, w, k, v, a, b, s0) + (() if reset_state is None else (reset_state,))
    need_backward = torch.is_grad_enabled() and any(x.requires_grad for x in differentiable)
    y, sT = _WKV7Function.apply(ops, need_backward, r, w, k, v, a, b, s0, resets, reset_state)
    return y.to(in_dtype), sT


def wkv7_host(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
    reset_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 through the host build of the kernel: fp32 arithmetic on the CPU whatever the input dtype.

    resets (B, T) bool: where True, the state before step t is replaced by reset_state ((B, H, N, N) fp32,
    zeros when None; unused without resets). Inputs on another device are computed on the CPU and the results
    moved back. Slow; meant for tests.
    """
    device = r.device
    B, T, H, N = r.shape
    if N not in HOST_HEAD_SIZES:
        raise ConfigError(f"wkv7 backend='host': head size {N} not compiled (one of {HOST_HEAD_SIZES})")
    _check_resets("host", r, resets, reset_state)
    rc, wc, kc, vc, ac, bc = (x.to("cpu") for x in (r, w, k, v, a, b))
    cpu = [None if x is None else x.to("cpu") for x in (state, resets, reset_state)]
    y, sT = _run(HostOps, torch.float32, rc, wc, kc, vc, ac, bc, *cpu)
    return y.to(device), sT.to(device)


def _cuda_ops():
    load_cuda_extension()
    return torch.ops.rwkvslice


def wkv7_cuda(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
    reset_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 through the fused CUDA kernel. bf16 inputs run in bf16 (fp32 state and accumulation); fp32 inputs
    in fp32; other dtypes are computed in fp32. y comes back in the input dtype, the final state in fp32.
    resets / reset_state as in `wkv7_host`."""
    if not r.is_cuda:
        raise ConfigError(f"wkv7 backend='cuda' needs CUDA tensors, got r on {r.device}")
    N = r.shape[-1]
    if N not in CUDA_HEAD_SIZES:
        raise ConfigError(
            f"wkv7 backend='cuda': head size {N} not compiled (one of {CUDA_HEAD_SIZES}); use backend='torch'"
        )
    _check_resets("cuda", r, resets, reset_state)
    ops = _cuda_ops()
    compute_dtype = r.dtype if r.dtype in (torch.bfloat16, torch.float32) else torch.float32
    return _run(ops, compute_dtype, r, w, k, v, a, b, state, resets, reset_state)


@functools.cache
def cuda_backend_available() -> bool:
    """True when a CUDA device is visible and the kernel builds and loads. Never raises; cached.

    When a device is there but the build fails, warns once with the one-line reason (auto falls back to torch).
    """
    try:
        if not torch.cuda.is_available():
            return False
        _cuda_ops()
        return True
    except Exception as e:
        warnings.warn(f"rwkvslice: CUDA WKV-7 kernel unavailable, using backend='torch': {e}", stacklevel=2)
        return False
