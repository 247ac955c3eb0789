"""`wkv7`: the public entry point and backend dispatch of the WKV-7 operator.

Backends:
- "reference": `wkv7_reference`, a plain loop; the ground truth for tests.
- "torch":     `wkv7_torch`, the fast differentiable CPU path (chunked, memory-lean backward).
- "host":      the CUDA kernel's own per-head arithmetic compiled for the CPU (for tests on CPU CI).
- "cuda":      the fused CUDA kernel (bf16 in, fp32 state), JIT-built on first use.
- "auto":      "cuda" for CUDA tensors when the kernel can be built, otherwise "torch".
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rwkvslice.errors import ConfigError

BACKENDS = ("auto", "reference", "torch", "host", "cuda")


def _check_inputs(r, w, k, v, a, b, state):
    shape = r.shape
    if r.dim() != 4:
        raise ConfigError(f"wkv7: r must be (B, T, H, N), got shape {tuple(shape)}")
    for name, x in (("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if x.shape != shape:
            raise ConfigError(f"wkv7: {name} has shape {tuple(x.shape)}, expected {tuple(shape)} like r")
    if state is not None:
        B, _, H, N = shape
        if tuple(state.shape) != (B, H, N, N):
            raise ConfigError(f"wkv7: state has shape {tuple(state.shape)}, expected {(B, H, N, N)}")


def _resolve(backend: str, r: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"wkv7: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if r.is_cuda:
        from rwkvslice.ops.wkv7_cuda import cuda_backend_available

        if cuda_backend_available():
            return "cuda"
    return "torch"


def wkv7(r, w, k, v, a, b, state=None, *, backend: str = "auto"):
    """WKV-7 over a sequence.

    Args:
        r, w, k, v, a, b: (B, T, H, N). `w` is the raw official decay parameter: decay = exp(-exp(w)).
            In the model a = -kk and b = kk * a (kk the L2-normalised key).
        state: optional initial state (B, H, N, N), fp32, official [value][key] layout.
        backend: one of BACKENDS.

    Returns:
        y (B, T, H, N) in the input dtype, and the final state (B, H, N, N) in fp32.
    """
    _check_inputs(r, w, k, v, a, b, state)
    name = _resolve(backend, r)
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    if name == "reference":
        from rwkvslice.ops.wkv7_reference import wkv7_reference as fn
    elif name == "torch":
        from rwkvslice.ops.wkv7_torch import wkv7_torch as fn
    elif name == "host":
        from rwkvslice.ops.wkv7_cuda import wkv7_host as fn
    else:
        from rwkvslice.ops.wkv7_cuda import wkv7_cuda as fn
    return fn(r, w, k, v, a, b, state)
