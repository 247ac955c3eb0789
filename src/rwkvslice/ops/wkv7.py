"""`wkv7`: the public entry point and backend dispatch of the WKV-7 operator.

Backends:
- "reference": `wkv7_reference`, a plain loop; the ground truth for tests.
- "torch":     `wkv7_torch`, the fast differentiable CPU path (chunked, memory-lean backward).
- "host":      the CUDA kernel's own per-head arithmetic compiled for the CPU (for tests on CPU CI).
- "cuda":      the fused CUDA kernel (bf16 in, fp32 state), JIT-built on first use.
- "auto":      "cuda" for CUDA tensors when the kernel can be built, was compiled for the head size, passed
               its self-check (ops/selfcheck.py) and w is in the kernel's range (below); otherwise "torch".

The kernels ("cuda", "host") rebuild earlier states in the backward by dividing by the decay, so their
gradients are accurate only for w <= W_MAX_KERNEL = -0.5 (decay >= 0.545; measured with the host build
against fp64: 1e-4 RMS-relative at w = -0.5, 7e-2 at 0, NaN by 2). The model's soft clamp keeps w below it.
With check_w=True (the default) wkv7() checks that (one reduction and a device sync per call): "auto"
then reroutes such inputs to "torch", an explicit "cuda"/"host" refuses them with a ConfigError.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rwkvslice.errors import ConfigError

BACKENDS = ("auto", "reference", "torch", "host", "cuda")
# The backstepping kernels' backward is accurate for w <= this (decay = exp(-exp(w)) >= 0.545).
W_MAX_KERNEL = -0.5
_KERNEL_BACKENDS = ("host", "cuda")


def _check_inputs(r, w, k, v, a, b, state, resets=None, reset_state=None):
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
    if resets is not None:
        _check_resets(resets, reset_state, r)
    elif reset_state is not None:
        raise ConfigError("wkv7: reset_state given without resets (it is only used where resets is True)")


def _check_resets(resets, reset_state, r) -> None:
    B, T, H, N = r.shape
    if not isinstance(resets, torch.Tensor) or resets.dtype != torch.bool:
        what = resets.dtype if isinstance(resets, torch.Tensor) else type(resets).__name__
        raise ConfigError(f"wkv7: resets must be a bool tensor (B, T), got {what}")
    if tuple(resets.shape) != (B, T):
        raise ConfigError(f"wkv7: resets has shape {tuple(resets.shape)}, expected {(B, T)}")
    if resets.device != r.device:
        raise ConfigError(f"wkv7: resets is on {resets.device}, the inputs on {r.device}")
    if reset_state is not None:
        if not isinstance(reset_state, torch.Tensor) or not reset_state.is_floating_point():
            what = reset_state.dtype if isinstance(reset_state, torch.Tensor) else type(reset_state).__name__
            raise ConfigError(f"wkv7: reset_state must be a float tensor (B, H, N, N), got {what}")
        if tuple(reset_state.shape) != (B, H, N, N):
            raise ConfigError(f"wkv7: reset_state has shape {tuple(reset_state.shape)}, expected {(B, H, N, N)}")
        if reset_state.device != r.device:
            raise ConfigError(f"wkv7: reset_state is on {reset_state.device}, the inputs on {r.device}")


def _w_in_kernel_range(w: torch.Tensor | None, check_w: bool) -> bool:
    """False when checking and some w > W_MAX_KERNEL (one reduction and a device sync)."""
    return w is None or not check_w or not bool((w > W_MAX_KERNEL).any())


def _resolve(backend: str, r: torch.Tensor, w: torch.Tensor | None = None, *, check_w: bool = True) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"wkv7: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        if backend in _KERNEL_BACKENDS and not _w_in_kernel_range(w, check_w):
            assert w is not None
            raise ConfigError(
                f"wkv7 backend={backend!r}: w has values above {W_MAX_KERNEL} (max {w.max().item():.3g}); "
                f"the kernel's backward is accurate only for w <= {W_MAX_KERNEL}: use backend='torch'"
            )
        return backend
    if r.is_cuda:
        from rwkvslice.ops import selfcheck
        from rwkvslice.ops.wkv7_cuda import CUDA_HEAD_SIZES, cuda_backend_available

        # A head size the kernel was not compiled for runs on "torch" (wkv7_cuda would refuse it).
        if (
            r.shape[-1] in CUDA_HEAD_SIZES
            and cuda_backend_available()
            and _w_in_kernel_range(w, check_w)
            and selfcheck.wkv7_kernel_trusted(r)
        ):
            return "cuda"
    return "torch"


def wkv7(
    r, w, k, v, a, b, state=None, *, resets=None, reset_state=None, backend: str = "auto", check_w: bool = True
):
    """WKV-7 over a sequence.

    Args:
        r, w, k, v, a, b: (B, T, H, N). `w` is the raw official decay parameter: decay = exp(-exp(w)).
            In the model a = -kk and b = kk * a (kk the L2-normalised key).
        state: optional initial state (B, H, N, N), fp32, official [value][key] layout.
        resets: optional (B, T) bool on the inputs' device. Where True, the state before step t is replaced
            by `reset_state`, so a sample that starts at t sees a fresh state whatever `state` or the
            earlier steps carried (exact packing). None (the default) costs nothing.
        reset_state: optional (B, H, N, N) float, the state a reset starts from (zeros when None); state
            tuning passes its tuned initial state here. Gets a gradient summed over every reset.
        backend: one of BACKENDS.
        check_w: check w <= W_MAX_KERNEL before a kernel backend runs ("auto" reroutes to "torch",
            "cuda"/"host" raise ConfigError). Callers that bound w themselves (the model) pass False.

    Returns:
        y (B, T, H, N) in the input dtype, and the final state (B, H, N, N) in fp32.
    """
    _check_inputs(r, w, k, v, a, b, state, resets, reset_state)
    name = _resolve(backend, r, w, check_w=check_w)
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    if name == "reference":
        from rwkvslice.ops.wkv7_reference import wkv7_reference as fn
    elif name == "torch":
        from rwkvslice.ops.wkv7_torch import wkv7_torch as fn
    elif name == "host":
        from rwkvslice.ops.wkv7_cuda import wkv7_host as fn
    else:
        from rwkvslice.ops.wkv7_cuda import wkv7_cuda as fn
    if resets is None:  # the hot path, exactly as before
        return fn(r, w, k, v, a, b, state)
    return fn(r, w, k, v, a, b, state, resets=resets, reset_state=reset_state)
