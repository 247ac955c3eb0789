"""Fused CPU kernel for RNN-mode generation (fp32): one whole layer per call, GEMVs included.

Reference: the eager `Block.step` (TimeMix.step + ChannelMix.step) in model/rwkv7.py; tests compare the
two, and the kernel op by op against fp64. The C++ is cuda/rnn_step_host.cpp, compiled on first use by
the host C++ compiler (about a second) into the kernel cache and loaded with ctypes; see cuda/build.py.

Why: a generated token reads every weight once. torch's GEMVs do that at memory speed, but an eager layer
also runs ~60 small ops, each a few microseconds once the weights have evicted its operands from the
cache: at 6 layers x 512 that is ~10% of a token, and most of a small model's time. One call per layer
removes it; the head stays one large torch GEMV.

`kernels()` returns the loaded library, or None (the caller then runs the eager step): RWKVSLICE_FUSED_STEP=0,
no BLAS sgemm_ in torch's libraries, a build failure (one warning), or an sgemm_ that disagrees with torch
on a probe (one warning). `step_layer` takes a Block duck-typed (this module never imports the model).
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path

import torch

from rwkvslice.cuda.build import KernelBuildError, load_rnn_step_library

ENV_SWITCH = "RWKVSLICE_FUSED_STEP"
MAX_HEAD_SIZE = 256  # the kernel keeps one head's vectors on the stack


def torch_sgemm() -> int | None:
    """Address of the BLAS `sgemm_` torch links (MKL in the x86 wheels), or None if its libraries export none."""
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "libtorch.so"):
        path = lib_dir / name
        if not path.exists():
            continue
        try:
            return ctypes.cast(ctypes.CDLL(str(path)).sgemm_, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The fused kernel library, or None: disabled, not buildable (warns once with the reason), or no BLAS
    sgemm in torch's libraries to call (then the eager step is as fast as anything here could be)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    sgemm = torch_sgemm()
    if sgemm is None:
        return None
    try:
        lib = load_rnn_step_library()
    except KernelBuildError as e:
        warnings.warn(f"rwkvslice: fused CPU generation kernels unavailable, using eager ops: {e}", stacklevel=2)
        return None
    if lib.rwkvslice_step_n_params() != N_PARAMS:  # a stale library for another parameter table
        raise KernelBuildError("fused CPU generation kernels: parameter table mismatch; clear the kernel cache")
    lib.rwkvslice_step_set_sgemm(sgemm)
    if not _blas_agrees(lib):  # e.g. a torch build whose BLAS takes 64-bit integers
        warnings.warn("rwkvslice: torch's BLAS sgemm_ disagrees with torch on a probe; using eager ops", stacklevel=2)
        return None
    return lib


def _blas_agrees(lib) -> bool:
    """The layer's GEMM path (the sgemm_ handed over) against torch on a small odd-shaped product."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)
    y = torch.full((3, 5), float("nan"))
    if lib.rwkvslice_step_linear_probe(3, 7, 5, w.data_ptr(), x.data_ptr(), y.data_ptr()) != 0:
        return False
    return bool(torch.allclose(y, x @ w.T, rtol=1e-5, atol=1e-5))


def usable(*tensors: torch.Tensor) -> bool:
    """Can the kernel take these tensors (fp32, CPU, contiguous)?"""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def layer_parameters(block) -> list[torch.Tensor | None]:
    """The layer's parameters in the kernel's table order (enum Param in the .cpp); v0/v1/v2 None in layer 0."""
    att, ffn = block.att, block.ffn
    p = att._parameters
    return [
        block.ln1.weight, block.ln1.bias, block.ln2.weight, block.ln2.bias,
        p["x_r"], p["x_w"], p["x_k"], p["x_v"], p["x_a"], p["x_g"],
        p["w0"], p["w1"], p["w2"], p["a0"], p["a1"], p["a2"], p.get("v0"), p.get("v1"), p.get("v2"),
        p["g1"], p["g2"], p["k_k"], p["k_a"], p["r_k"],
        att.receptance.weight, att.key.weight, att.value.weight, att.output.weight, att.ln_x.weight,
        att.ln_x.bias, ffn.x_k, ffn.key.weight, ffn.value.weight,
    ]  # fmt: skip


N_PARAMS = 33


def step_layer(lib, block, x, dx, v_first, state_in, state_out, x_out, dx_out) -> None:
    """Block.step for B rows through the kernel. Input x + dx (dx None: x alone); writes x_out + dx_out (the
    next layer's input, unadded), v_first (B, C; layer 0 writes it), and the new states into state_out.

    Every tensor must be fp32, CPU and contiguous: parameters are checked here (a model converted to
    another dtype or with a transposed view raises ValueError, so the caller's fallback check is the
    place to route those to the eager step), activations and states are the caller's own buffers.
    """
    if block.ln1.eps != block.ln2.eps:
        raise ValueError("fused RNN step: ln1 and ln2 must share their eps")
    params = layer_parameters(block)
    bad = [i for i, t in enumerate(params) if t is not None and not usable(t)]
    if bad:
        raise ValueError(f"fused RNN step: parameters {bad} of the layer are not contiguous fp32 CPU tensors")
    att = block.att
    B, C = x.shape
    dims = (ctypes.c_int * 8)(C, att.n_head, att.head_size, att._parameters["w1"].shape[1],
                              att._parameters["a1"].shape[1],
                              att._parameters["v1"].shape[1] if att.layer_id else 0,
                              att._parameters["g1"].shape[1], block.ffn.key.weight.shape[0])
    table = (ctypes.c_void_p * N_PARAMS)(*(None if t is None else t.data_ptr() for t in params))
    rc = lib.rwkvslice_step_layer(
        B, dims, int(att.layer_id == 0), block.ln1.eps, att.ln_x.eps, table, x.data_ptr(),
        None if dx is None else dx.data_ptr(), v_first.data_ptr(), *(t.data_ptr() for t in state_in),
        *(t.data_ptr() for t in state_out), x_out.data_ptr(), dx_out.data_ptr(),
    )
    if rc == 1:
        raise ValueError(f"fused RNN step: head size {att.head_size} > {MAX_HEAD_SIZE} is not supported")
    if rc != 0:
        raise RuntimeError("fused RNN step: the library has no BLAS sgemm (use kernels(), which sets it)")
