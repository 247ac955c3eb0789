"""Next-token sampling: temperature, top-k and top-p (nucleus), or greedy.

Order (the common HF convention): logits / temperature -> top-k -> top-p on the tempered distribution
-> renormalise -> sample. temperature == 0 means greedy (argmax). top-p keeps the smallest set of most
likely tokens whose total probability reaches `top_p` (the token that crosses the threshold is kept;
tokens tied with it are kept too, so the result does not depend on sort order).
"""

from __future__ import annotations

import math

import torch

from rwkvslice.errors import ConfigError


def check_sampling_args(temperature: float, top_p: float, top_k: int) -> None:
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ConfigError(f"--temperature must be a finite number >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0 = off), got {top_k}")


def sampling_probs(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                   top_k: int = 0) -> torch.Tensor:
    """The distribution the sampler draws from, (B, V) fp32. Requires temperature > 0."""
    if temperature <= 0:
        raise ConfigError("sampling_probs needs temperature > 0 (temperature 0 is greedy decoding)")
    x = logits.float() / temperature
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        # index of the first token whose cumulative probability reaches top_p (clamped for rounding)
        cut_idx = torch.searchsorted(cum, torch.full_like(cum[..., :1], top_p)).clamp(max=cum.shape[-1] - 1)
        cutoff = torch.gather(sorted_probs, -1, cut_idx)
        probs = probs.masked_fill(probs < cutoff, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `logits` (B, V) -> (B,) int64."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature=temperature, top_p=top_p, top_k=top_k)
    if generator is not None and generator.device != probs.device:
        # a CPU generator with CUDA logits: draw on the CPU (multinomial needs them on one device)
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
