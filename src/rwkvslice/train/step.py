"""One optimizer step over gradient-accumulation micro-batches, on one or more DDP ranks.

Normalisation: the loss of every micro-batch is sum(CE over its kept tokens) / N, where N is the number
of kept tokens across *all* micro-batches of the step and *all* ranks (one all-reduce before the first
forward). Summing those gradients gives exactly the gradient of the mean CE over one big batch. DDP
averages gradients over ranks (divides by world_size), so each rank back-propagates loss * world_size.

A micro-batch is (idx, targets) or, for packed data, (idx, targets, resets): the resets go to `model.loss`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rwkvslice.errors import ConfigError
from rwkvslice.train.distributed import DistEnv, all_reduce_sum

IGNORE_INDEX = -100
PRECISIONS = ("fp32", "bf16")


class LossModule(nn.Module):
    """Routes `model.loss` through `forward`, so a DDP wrapper sees the call and syncs gradients."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, num_items: int,
                resets: torch.Tensor | None = None) -> torch.Tensor:
        loss_fn: Callable[..., torch.Tensor] = self.model.loss  # type: ignore[assignment]
        if resets is None:
            return loss_fn(idx, targets, num_items=num_items)
        return loss_fn(idx, targets, resets=resets, num_items=num_items)


def check_precision(precision: str) -> None:
    if precision == "fp16":
        raise ConfigError("--precision fp16 is not supported (it needs loss scaling); use bf16, which has "
                          "fp32's range and trains without a GradScaler")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def autocast_context(precision: str, device: torch.device):
    """bf16: torch.autocast on the model's device type (CUDA or CPU); weights stay fp32 (master copy)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class StepStats:
    loss: float  # mean CE over the step's kept tokens, all ranks (nan if not finite)
    tokens: int  # input positions processed, all ranks and micro-batches
    kept_tokens: int  # positions with a target != -100, all ranks and micro-batches
    grad_norm: float  # total gradient norm before clipping (nan when not finite)
    nonfinite: str | None  # None, or what was not finite ("loss (micro-batch 2)", "gradient of emb.weight")
    applied: bool  # whether the optimizer update was applied


def first_nonfinite_grad(named_params) -> str | None:
    """The first parameter whose gradient (this rank's shard of it, under FSDP) is not finite."""
    for name, p in named_params:
        grad = p.grad
        if grad is not None:
            to_local = getattr(grad, "to_local", None)  # a DTensor: check the local shard, no collective
            if not torch.isfinite(to_local() if callable(to_local) else grad).all():
                return name
    return None


def train_step(
    loss_module: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, ...]],
    env: DistEnv,
    *,
    precision: str = "fp32",
    grad_clip: float = 0.0,
) -> StepStats:
    """Forward/backward every micro-batch, then one optimizer update (unless something is non-finite).

    `loss_module` is a LossModule, wrapped in DistributedDataParallel when env.distributed.
    A non-finite loss or gradient leaves the weights and the optimizer state untouched (`applied` False,
    `nonfinite` says what); the caller decides whether to stop or go on. Gradients are zeroed on return.
    """
    device = env.device
    plain = loss_module.module if isinstance(loss_module, nn.parallel.DistributedDataParallel) else loss_module
    inner: nn.Module = plain.model  # type: ignore[assignment]
    named = list(inner.named_parameters())

    kept_local = sum(int((batch[1] != IGNORE_INDEX).sum()) for batch in micro_batches)
    tokens_local = sum(batch[1].numel() for batch in micro_batches)
    counts = all_reduce_sum(torch.tensor([kept_local, tokens_local], dtype=torch.float64, device=device), env)
    kept, tokens = int(counts[0].item()), int(counts[1].item())
    # an all-ignored step: every loss is 0 and stays in the graph, so dividing by 1 is harmless
    num_items = max(kept, 1)

    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    nonfinite = None
    for i, batch in enumerate(micro_batches):
        idx, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        packed = tuple(x.to(device, non_blocking=True) for x in batch[2:])  # (resets,) for packed data
        last = i == len(micro_batches) - 1
        no_sync = (loss_module.no_sync() if env.distributed and not last  # type: ignore[operator]
                   else contextlib.nullcontext())
        with no_sync:
            with autocast_context(precision, device):
                loss = loss_module(idx, targets, num_items, *packed)
            loss = loss.float()
            if nonfinite is None and not torch.isfinite(loss).item():
                nonfinite = f"loss (micro-batch {i + 1})"
            # backward even when non-finite: every DDP rank must join the gradient all-reduce
            (loss * env.world_size).backward()
        loss_sum += loss.detach()

    loss_total = all_reduce_sum(loss_sum, env).item()
    if nonfinite is None:
        bad = first_nonfinite_grad(named)
        if bad is not None:
            nonfinite = f"gradient of {bad}"
    # ranks agree: after DDP's all-reduce every rank holds the same gradients (under FSDP each holds its
    # own shard of them), and a non-finite loss on one rank must stop all of them
    flag = all_reduce_sum(torch.tensor([0.0 if nonfinite is None else 1.0], device=device), env)
    if flag.item() > 0 and nonfinite is None:
        nonfinite = "loss or gradient on another rank"

    grad_norm = float("nan")
    applied = False
    if nonfinite is None:
        params = [p for _, p in named if p.grad is not None]
        if grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=False))
        else:
            norms = [g.norm() for _, p in named if (g := p.grad) is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack(norms)))
        optimizer.step()
        applied = True
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss=loss_total if math.isfinite(loss_total) else float("nan"), tokens=tokens,
                     kept_tokens=kept, grad_norm=grad_norm, nonfinite=nonfinite, applied=applied)
