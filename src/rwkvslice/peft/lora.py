"""LoRA and PiSSA adapters on RWKV-7's linear layers.

`add_lora(model, r, alpha, targets)` replaces each targeted `nn.Linear` of every block by a `LoRALinear`
holding the frozen weight W under the same name (`blocks.i.att.key.weight` stays an official key) plus
two trainable factors: y = x W^T + (alpha / r) * (x A^T) B^T, A (r, in), B (out, r).

- LoRA init: A as nn.Linear initialises its weight (Kaiming-uniform), B = 0, so the adapted model starts
  as the base model (bit for bit: the adapter adds exact zeros).
- PiSSA init: A, B from the top-r singular triplets of W (an exact fp64 SVD: a randomised one with
  RWKV-PEFT's 4 power iterations measured 3 % off the top singular values on a flat spectrum; the exact
  one costs ~1 s per 4096 x 1024 matrix, once per run), and the frozen weight becomes the residual
  W - (alpha / r) B A, so the model again starts as the base (up to fp32 rounding of the residual) but
  trains the principal directions.

`merge_lora(model)` folds every adapter back: W' = W + (alpha / r) B A (W is the PiSSA residual for
PiSSA), leaving plain `nn.Linear` modules and an official state dict.

Memory: plain autograd through `x W^T + s (x A^T) B^T` keeps, per adapter, its own input x (for dA) and
creates several (tokens x out) temporaries. `_LoRALinearFn` computes the same maths as one autograd
node that keeps only the tensors the input is made of and recomputes the input and x A^T in backward.
The model passes those parts through its `linear_of` hook (model/rwkv7.py): att.receptance/key/value
share one (x, xx) pair (their inputs are x + xx * mu), att.output keeps (y, g) for y * g, which the
frozen model keeps anyway, and ffn.value keeps relu(k) for relu(k)^2, which relu already keeps. The
adapter's output and input-gradient terms are accumulated in place (addmm_) into the frozen ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkvslice.errors import ConfigError

# The block-relative names of RWKV-7's linear layers (TimeMix: att.*, ChannelMix: ffn.*).
LORA_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
DEFAULT_TARGETS = LORA_TARGETS
LORA_INITS = ("lora", "pissa")


def _autocast_of(t: torch.Tensor) -> tuple[str, bool, torch.dtype]:
    dev = t.device.type
    return dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)


class _LoRALinearFn(torch.autograd.Function):
    """y = u W^T + s (u A^T) B^T with u = fn(*parts) (u = parts[0] when fn is None).

    Keeps for backward only W, A, B (parameters) and `parts`; u and h = u A^T are recomputed there (u
    is one elementwise op; h is rank-wide), under the forward's autocast state, so that bf16 autocast
    computes in backward what it computed in forward.
    """

    @staticmethod
    def forward(ctx, fn, scaling, weight, A, B, *parts):  # type: ignore[override]
        ctx.fn, ctx.scaling, ctx.amp = fn, scaling, _autocast_of(parts[0])
        ctx.save_for_backward(weight, A, B, *parts)
        u = parts[0] if fn is None else fn(*parts)
        y = F.linear(u, weight)
        h = F.linear(u, A)
        # y += s h B^T in place (at init B = 0 adds exact zeros: the base model's output bit for bit)
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]).to(y.dtype), B.t().to(y.dtype), alpha=scaling)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        weight, A, B, *parts = ctx.saved_tensors
        need_w, need_a, need_b = ctx.needs_input_grad[2:5]
        need_parts = ctx.needs_input_grad[5:]
        s = ctx.scaling
        dev, amp_on, amp_dtype = ctx.amp
        with torch.autocast(dev, dtype=amp_dtype, enabled=amp_on):
            leaves = [p.detach().requires_grad_(need) for p, need in zip(parts, need_parts, strict=True)]
            with torch.enable_grad():  # the input's own small graph (e.g. x + xx * mu), rebuilt here
                u = leaves[0] if ctx.fn is None else ctx.fn(*leaves)
            u2 = u.detach().reshape(-1, u.shape[-1])  # (tokens, in)
            dy2 = dy.reshape(-1, dy.shape[-1])  # (tokens, out)
            g = dy2 @ B  # (tokens, r)
            dW = (dy2.t() @ u2).to(weight.dtype) if need_w else None
            dA = (g.t() @ u2 * s).to(A.dtype) if need_a else None
            dB = (dy2.t() @ (u2 @ A.t()) * s).to(B.dtype) if need_b else None
            grads: list[torch.Tensor | None] = [None] * len(parts)
            if any(need_parts):
                du = dy2 @ weight  # the frozen path's input gradient ...
                du.addmm_(g.to(du.dtype), A.to(du.dtype), alpha=s)  # ... plus s (dy B) A, in place
                du = du.view(u.shape).to(u.dtype)
                if ctx.fn is None:
                    grads[0] = du
                else:
                    wanted = [leaf for leaf, need in zip(leaves, need_parts, strict=True) if need]
                    got = iter(torch.autograd.grad(u, wanted, du))
                    grads = [next(got) if need else None for need in need_parts]
        return (None, None, dW, dA, dB, *grads)


class LoRALinear(nn.Module):
    """A bias-free linear layer with a frozen weight and a trainable low-rank update (alpha / r) B A."""

    def __init__(self, weight: torch.Tensor, r: int, alpha: float):
        super().__init__()
        out_features, in_features = weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha = r, float(alpha)
        self.scaling = self.alpha / r
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.lora_A = nn.Parameter(weight.new_empty(r, in_features))
        self.lora_B = nn.Parameter(weight.new_zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear does to a (r, in) weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_of(None, x)

    def forward_of(self, fn, *parts: torch.Tensor) -> torch.Tensor:
        """self(fn(*parts)), keeping only `parts` for backward (the model's `linear_of` hook calls this)."""
        return _LoRALinearFn.apply(fn, self.scaling, self.weight, self.lora_A, self.lora_B, *parts)

    @torch.no_grad()
    def init_pissa(self, factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Make (A, B) the top-r singular directions of the weight and the weight the residual.

        `factors` (A, B) replays a previous PiSSA init exactly (resume, loading a checkpoint): the
        residual is a pure function of the base weight and those factors. Returns the (A, B) used.
        """
        W = self.weight.double()
        if factors is None:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U, S, Vh = U[:, : self.r], S[: self.r], Vh[: self.r]
            root = S.sqrt() / math.sqrt(self.scaling)
            A = (root[:, None] * Vh).to(self.weight.dtype)
            B = (U * root[None, :]).to(self.weight.dtype)
        else:
            A, B = (f.to(self.weight.device, self.weight.dtype) for f in factors)
        # residual from the factors as stored (fp32), so residual + (alpha / r) B A is W up to one rounding
        self.weight.copy_(W - self.scaling * (B.double() @ A.double()))
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        return A.clone(), B.clone()

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A, computed in fp64 and rounded once."""
        delta = self.scaling * (self.lora_B.double() @ self.lora_A.double())
        return (self.weight.double() + delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha:g}"


def parse_targets(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'att.key,ffn.value' -> ('att.key', 'ffn.value'); unknown names are a one-line ConfigError."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names:
        raise ConfigError(f"--lora-targets is empty; choose from {','.join(LORA_TARGETS)}")
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown:
        raise ConfigError(f"--lora-targets: unknown module {unknown[0]!r}; RWKV-7 blocks have "
                          f"{','.join(LORA_TARGETS)}")
    return tuple(dict.fromkeys(names))


def check_rank(model: Any, r: int, targets: tuple[str, ...]) -> None:
    """r must be >= 1 and at most min(in, out) of every targeted layer (a larger rank is not low rank)."""
    if r < 1:
        raise ConfigError(f"--lora-r must be >= 1, got {r}")
    block = model.blocks[0]  # type: ignore[index]
    for name in targets:
        lin = block.get_submodule(name)
        limit = min(lin.in_features, lin.out_features)
        if r > limit:
            raise ConfigError(f"--lora-r {r} is larger than {name} allows ({lin.out_features} x "
                              f"{lin.in_features}: at most {limit})")


def add_lora(model: Any, r: int = 16, alpha: float = 32.0, targets=DEFAULT_TARGETS, init: str = "lora",
             pissa_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict:
    """Replace the targeted linear layers of every block by LoRALinear (in place).

    Freezes nothing else: `rwkvslice.peft.prepare` decides what trains. Returns, for PiSSA, the initial
    factors {module name: (A, B)} (store them to rebuild the residual exactly), else {}.
    """
    targets = parse_targets(targets)
    if init not in LORA_INITS:
        raise ConfigError(f"--lora-init must be one of {', '.join(LORA_INITS)}, got {init!r}")
    check_rank(model, r, targets)
    used = {}
    for i, block in enumerate(model.blocks):  # type: ignore[attr-defined]
        for name in targets:
            parent_name, attr = name.rsplit(".", 1)
            parent = block.get_submodule(parent_name)
            lin = getattr(parent, attr)
            if isinstance(lin, LoRALinear):
                raise ConfigError(f"blocks.{i}.{name} already has a LoRA adapter")
            lora = LoRALinear(lin.weight, r, alpha)
            full = f"blocks.{i}.{name}"
            if init == "pissa":
                used[full] = lora.init_pissa(None if pissa_factors is None else pissa_factors[full])
            setattr(parent, attr, lora)
    model.step_via_forward = True  # Block.step reads .weight directly: run RNN mode through forward()
    return used


def lora_modules(model: Any) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: Any) -> nn.Module:
    """Fold every adapter into its weight and put plain nn.Linear modules back (in place); returns model."""
    for name, lora in lora_modules(model).items():
        parent_name, attr = name.rsplit(".", 1)
        lin = nn.Linear(lora.in_features, lora.out_features, bias=False, device=lora.weight.device,
                        dtype=lora.weight.dtype)
        lin.weight.copy_(lora.merged_weight())
        lin.weight.requires_grad_(lora.weight.requires_grad)
        setattr(model.get_submodule(parent_name), attr, lin)
    model.step_via_forward = False
    return model
