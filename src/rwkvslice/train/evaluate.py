"""Held-out loss: the mean cross-entropy over the kept tokens of a data file, sliced and under no_grad.

One function serves both `rwkvslice train --eval-data` (every N steps) and `rwkvslice eval --data`, so
the two report the same number for the same checkpoint. The windows of the file are cut into batches of
`batch_size` in file order; `max_batches` keeps the first K of them. Under DDP batch i is evaluated by
rank i % world_size and the (CE sum, kept count) pairs are all-reduced, so every rank gets the same
number and the batches are exactly those of a single process (the sums differ only in addition order).
Under FSDP every forward is a collective (each unit all-gathers its weights inside it), so there every
rank runs the same number of forwards: a rank with no batch left in the last round (or a batch without
kept targets) still runs one, whose result it drops.

It always runs in fp32 without autocast, whatever the training precision, so a bf16 run's held-out loss
is comparable with an fp32 run's and with `rwkvslice eval` (except under `--shard fsdp --precision bf16`,
where FSDP's mixed-precision policy gathers the weights in bf16 for every forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rwkvslice.train.distributed import DistEnv, all_reduce_sum

IGNORE_INDEX = -100


@dataclass
class EvalResult:
    loss: float  # mean CE over the kept tokens (nan when there are none)
    tokens: int  # kept tokens scored
    windows: int  # windows scored
    batches: int  # batches scored (all ranks)

    @property
    def ppl(self) -> float | None:
        return math.exp(self.loss) if self.tokens and self.loss < 700 else None  # exp overflows past ~709


def batch_ranges(n_windows: int, batch_size: int, max_batches: int | None = None) -> list[range]:
    """Window index ranges of each batch, in file order: [0, B), [B, 2B), ...; the first K if given."""
    ranges = [range(s, min(s + batch_size, n_windows)) for s in range(0, n_windows, batch_size)]
    return ranges if max_batches is None else ranges[:max_batches]


def evaluate_loss(model, dataset, *, batch_size: int, max_batches: int | None = None,
                  env: DistEnv | None = None) -> EvalResult:
    """Mean CE over the kept targets of `dataset` (a WindowDataset), the unwrapped model, no_grad, fp32.

    The model is put in eval mode for the call and its previous mode restored.
    """
    from rwkvslice.data.loader import collate

    device = next(model.parameters()).device
    rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
    ranges = batch_ranges(len(dataset), batch_size, max_batches)
    ce_sum = torch.zeros((), dtype=torch.float64)
    kept = windows = 0
    lockstep = world > 1 and _is_sharded(model)
    stop = -(-len(ranges) // world) * world if lockstep else len(ranges)  # lockstep: whole rounds
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(rank, stop, world):
                idx, targets = collate([dataset[j] for j in ranges[min(i, len(ranges) - 1)]])
                n = int((targets != IGNORE_INDEX).sum()) if i < len(ranges) else 0
                windows += len(ranges[i]) if i < len(ranges) else 0
                if n == 0:
                    if lockstep:  # the other ranks' forwards need this rank's part of every all-gather
                        model.loss(idx.to(device), targets.to(device))
                    continue
                # the batch's mean CE times its kept count: the CE sum (accumulated in fp64 across batches)
                ce_sum += model.loss(idx.to(device), targets.to(device)).double().cpu() * n
                kept += n
    finally:
        model.train(was_training)
    if env is not None and env.distributed:
        totals = torch.tensor([ce_sum.item(), kept, windows], dtype=torch.float64, device=env.device)
        all_reduce_sum(totals, env)
        ce_sum, kept, windows = totals[0].cpu(), int(totals[1].item()), int(totals[2].item())
    loss = ce_sum.item() / kept if kept else float("nan")
    return EvalResult(loss=loss, tokens=kept, windows=windows, batches=len(ranges))


def _is_sharded(model) -> bool:
    from rwkvslice.train.sharding import is_sharded

    return is_sharded(model)


class HeldOutEval:
    """--eval-data during training: when to evaluate, and the best eval_loss so far (saved in checkpoints).

    Due every `every` optimizer steps and at the last step. The schedule is a function of the step number
    alone, so a resumed run evaluates at the same steps as one never interrupted.
    """

    def __init__(self, dataset, *, every: int, batch_size: int, max_batches: int | None, last_step: int):
        self.dataset = dataset
        self.every = every
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.last_step = last_step
        self.best_loss: float | None = None
        self.best_step: int | None = None

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last_step

    def run(self, step: int, model, env: DistEnv) -> tuple[EvalResult, bool]:
        """Evaluate now; returns the result and whether it is a new best (lowest finite loss so far)."""
        result = evaluate_loss(model, self.dataset, batch_size=self.batch_size, max_batches=self.max_batches,
                               env=env)
        better = math.isfinite(result.loss) and (self.best_loss is None or result.loss < self.best_loss)
        if better:
            self.best_loss, self.best_step = result.loss, step
        return result, better

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_step = state.get("best_loss"), state.get("best_step")


def metrics_of(result: EvalResult) -> dict:
    """The metrics.jsonl fields of one evaluation."""
    finite = math.isfinite(result.loss)
    return {"eval_loss": result.loss if finite else None, "eval_ppl": result.ppl if finite else None,
            "eval_tokens": result.tokens}


def write_best(out, held_out: HeldOutEval, checkpoint) -> None:
    """OUT/best.json: the checkpoint with the lowest eval_loss (--keep-best), written atomically."""
    import json
    from pathlib import Path

    from rwkvslice.train.checkpoint import atomic_write_text

    info = {"step": held_out.best_step, "checkpoint": str(Path(checkpoint).relative_to(out)),
            "eval_loss": held_out.best_loss}
    atomic_write_text(Path(out) / "best.json", json.dumps(info, indent=2) + "\n")
