"""Fused CPU kernels for RNN-mode generation (fp32): the work between the GEMVs of one layer, in four calls.

Reference: the eager `TimeMix.step` / `ChannelMix.step` / `Block.step` in model/rwkv7.py (tests compare the
two). The C++ is cuda/rnn_step_host.cpp, compiled on first use by the host C++ compiler (about a second)
into the kernel cache and loaded with ctypes; see cuda/build.py.

Why: a generated token reads every weight once, which torch's GEMVs do at memory speed, but each of the
~40 small ops per layer also costs a few microseconds once the weights have evicted its operands from the
cache. Fusing them is what lets eager PyTorch keep up with the official package's TorchScript.

`kernels()` returns the loaded library, or None when it cannot be built (no compiler) or when
RWKVSLICE_FUSED_STEP=0; then generation uses the eager path, after a one-line warning.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings

import torch

from rwkvslice.cuda.build import KernelBuildError, load_rnn_step_library

ENV_SWITCH = "RWKVSLICE_FUSED_STEP"


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The fused kernels, or None (disabled, or not buildable: warns once with the reason)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    try:
        return load_rnn_step_library()
    except KernelBuildError as e:
        warnings.warn(f"rwkvslice: fused CPU generation kernels unavailable, using eager ops: {e}", stacklevel=2)
        return None


def usable(*tensors: torch.Tensor) -> bool:
    """Can the fused kernels take these tensors (fp32, CPU, contiguous)?"""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _in(*tensors):
    """Inputs as fp32 contiguous tensors (a no-op for the usual ones). The caller keeps the returned list
    alive across the C call: a converted copy's memory must not be freed while the kernel reads it."""
    return [None if t is None else t if (t.dtype == torch.float32 and t.is_contiguous()) else
            t.float().contiguous() for t in tensors]


def _out(*tensors) -> list[int]:
    for t in tensors:
        if not usable(t):
            raise ValueError("fused RNN step: outputs must be contiguous fp32 CPU tensors")
    return [t.data_ptr() for t in tensors]


def _ptrs(tensors) -> list[int | None]:
    return [None if t is None else t.data_ptr() for t in tensors]


def att_in(lib, x, dx, x_out, ln_w, ln_b, eps, prev, mixes, shift_out, xs) -> None:
    """x_out = x + dx (dx may be None); shift_out = LayerNorm(x_out); xs[j] = h + (prev - h) * mixes[j]."""
    B, C = x.shape
    ins = _in(x, dx, ln_w, ln_b, prev, *mixes)
    x_p, dx_p, w_p, b_p, prev_p, *mix_p = _ptrs(ins)
    x_out_p, shift_p, xs_p = _out(x_out, shift_out, xs)
    rc = lib.rwkvslice_step_att_in(B, C, x_p, dx_p, x_out_p, w_p, b_p, eps, prev_p, *mix_p, shift_p, xs_p)
    assert rc == 0


def att_wkv(lib, r, z, k, v, v_first, vz, az, g, k_k, k_a, r_k, lnx_w, lnx_b, lnx_eps, s_in, s_out, out) -> None:
    """The WKV state update and read-out, GroupNorm, bonus and output gate of one layer (see the .cpp)."""
    B, H, N = s_in.shape[0], s_in.shape[1], s_in.shape[2]
    if N > 256:
        raise ValueError(f"fused RNN step: head size {N} > 256 is not supported")
    ins = _in(r, z, k, v, v_first, vz, az, g, k_k, k_a, r_k, lnx_w, lnx_b, s_in)
    *in_p, s_in_p = _ptrs(ins)
    s_out_p, out_p = _out(s_out, out)
    rc = lib.rwkvslice_step_att_wkv(B, H, N, *in_p, lnx_eps, s_in_p, s_out_p, out_p)
    assert rc == 0


def ffn_in(lib, x, dx, x_out, ln_w, ln_b, eps, prev, x_k, shift_out, xk) -> None:
    """x_out = x + dx; shift_out = LayerNorm(x_out); xk = h + (prev - h) * x_k."""
    B, C = x.shape
    ins = _in(x, dx, ln_w, ln_b, prev, x_k)
    x_p, dx_p, w_p, b_p, prev_p, xk_w_p = _ptrs(ins)
    x_out_p, shift_p, xk_p = _out(x_out, shift_out, xk)
    rc = lib.rwkvslice_step_ffn_in(B, C, x_p, dx_p, x_out_p, w_p, b_p, eps, prev_p, xk_w_p, shift_p, xk_p)
    assert rc == 0


def relu_square_(lib, x: torch.Tensor) -> torch.Tensor:
    """relu(x)**2 in place."""
    (x_p,) = _out(x)
    rc = lib.rwkvslice_step_relu_square(x.numel(), x_p)
    assert rc == 0
    return x
