"""Optimizer parameter groups and the learning-rate schedule, following the official RWKV-7 trainer.

Parameter groups (BlinkDL/RWKV-LM train_temp):
- "decay":    2-D (or more) parameters whose name contains ".weight" (the embedding, the head and the
              linear layers). Only these get weight decay; the official README calls this "VERY IMPORTANT".
- "w0":       every `att.w0` (the decay bias) at twice the learning rate, no weight decay.
- "no_decay": everything else (token-shift mixes, LoRA factors, LayerNorms, k_k, k_a, r_k, ...).

Adam epsilon: the official demo passes eps=1e-18 to its DeepSpeed Adam. We default to 1e-8:
our master weights and Adam moments are fp32, and the update is lr * m / (sqrt(v) + eps). With eps=1e-18
every gradient larger than ~1e-17 -- far below fp32 rounding noise of the loss, e.g. a cancellation
residue -- gets an almost full learning-rate step in its sign's direction (g = 1e-17 moves the weight by
0.9 * lr), and once v underflows (|g| < ~1e-19) the ratio is undefined noise. With eps=1e-8 such
gradients move weights by ~lr * |g| / 1e-8, i.e. nothing, while any gradient of a meaningful size
(>= 1e-6 here) sees sqrt(v) >> eps and gets the same update as with 1e-18. Measured on the demo
(500 steps, lr 1e-3): eps 1e-8 and 1e-18 both reach exact match 1.0; mean loss over steps 101-200 is
0.875 vs 0.931. `--adam-eps 1e-18` restores the official value.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rwkvslice.errors import ConfigError

DEFAULT_BETAS = (0.9, 0.99)
DEFAULT_EPS = 1e-8


def is_w0(name: str) -> bool:
    return name.endswith("att.w0")


def wants_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Official rule: at least 2 non-trivial dims and ".weight" in the name."""
    # (dims of size != 1 counted from the shape: squeeze() is not defined on an FSDP-sharded DTensor)
    return sum(d != 1 for d in param.shape) >= 2 and ".weight" in name


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Split trainable parameters into the decay / w0 (2x LR) / no_decay groups.

    Each group carries `base_lr` (its peak learning rate) and `name`, used by the schedule and for logs.
    Empty groups are dropped (torch refuses them in some versions).
    """
    decay, w0, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_w0(name):
            w0.append(p)
        elif wants_weight_decay(name, p):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "base_lr": lr},
        {"name": "w0", "params": w0, "weight_decay": 0.0, "base_lr": 2.0 * lr},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "base_lr": lr},
    ]
    for g in groups:
        g["lr"] = g["base_lr"]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = DEFAULT_BETAS,
    eps: float = DEFAULT_EPS,
) -> torch.optim.AdamW:
    """AdamW (decoupled decay, as DeepSpeed's adam_w_mode) over the official parameter groups.

    `foreach=False` keeps the CPU arithmetic a plain per-tensor loop whose result does not depend on how
    tensors are grouped, so a resumed run reproduces an uninterrupted one bit for bit.
    """
    if lr <= 0 or not math.isfinite(lr):
        raise ConfigError(f"--lr must be a positive number, got {lr}")
    if weight_decay < 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {weight_decay}")
    if not eps > 0:
        raise ConfigError(f"--adam-eps must be > 0, got {eps}")
    return torch.optim.AdamW(param_groups(model, lr, weight_decay), lr=lr, betas=betas, eps=eps, foreach=False)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak LR used at optimizer step `step` (1-based).

    Linear warmup over the first `warmup_steps` steps (step 1 uses 1/warmup_steps of the peak), then a
    cosine from 1 down to `min_ratio`, reached exactly at `total_steps`.
    """
    if step <= warmup_steps:
        return step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets each group's LR to base_lr * lr_factor(step) before optimizer step `step`.

    Stateless apart from the last step applied, so resuming only needs `load_state_dict` (or simply
    calling `apply(step)` with the resumed step).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, min_lr_ratio: float):
        if total_steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {total_steps}")
        if warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr must be between 0 and --lr, got ratio {min_lr_ratio}")
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.last_step = 0

    def factor(self, step: int) -> float:
        return lr_factor(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                         min_ratio=self.min_lr_ratio)

    def apply(self, step: int) -> float:
        """Set the LRs for optimizer step `step`; returns the peak-group LR (the `--lr` scale)."""
        f = self.factor(step)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        self.last_step = step
        return f

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "min_lr_ratio": self.min_lr_ratio}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
