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
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

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
