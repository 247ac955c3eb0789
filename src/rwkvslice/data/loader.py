"""ResumableLoader: endless, deterministic, resumable, DDP-sharded batches of (idx, targets), or
(idx, targets, resets) for packed data (resets (B, T) bool: where a packed sample starts; windows.py).

Order: epoch e visits the dataset in the permutation numpy.random.default_rng([seed, e]).permutation(N)
(PCG64: the same on every platform and numpy version that keeps its stream stable). Each optimizer step
takes the next `batch_size * world_size` indices of that permutation: rank r gets the r-th slice of
`batch_size`. So ranks see disjoint windows and the same number of batches, and the concatenation of
all ranks' batches (in rank order) is exactly the batch a single process with batch_size * world_size
would see: 2 ranks x batch b train on the same data as 1 rank x batch 2b.

drop_last=True: the incomplete tail of each epoch's permutation is skipped (a different tail each
epoch). drop_last=False: the last step is filled up by wrapping around to the start of the same
permutation, so every batch is full and every rank gets the same count (a few windows appear twice).

Position: `state_dict()` is {"epoch", "index" (steps taken in this epoch), and the settings that must
match on resume}. It counts batches handed to the caller, not batches prefetched by workers, so saving it
after training on a batch and loading it into a fresh loader continues with the very next batch. The
state is the same on every rank: rank 0 can save it for all.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from rwkvslice.errors import ConfigError

_CHECKED_KEYS = ("seed", "batch_size", "world_size", "num_windows", "drop_last")


def collate(items) -> tuple[torch.Tensor, ...]:
    """Stack (idx, targets) items, or (idx, targets, resets) items of packed data, into one batch."""
    idx = torch.stack([item[0] for item in items]).to(torch.int64)
    targets = torch.stack([item[1] for item in items]).to(torch.int64)
    if len(items[0]) == 2:
        return idx, targets
    return idx, targets, torch.stack([item[2] for item in items]).to(torch.bool)


class _StepSampler(Sampler):
    """Yields this rank's index lists for steps (epoch, index), (epoch, index + 1), ... forever."""

    def __init__(self, loader: ResumableLoader, epoch: int, index: int):
        self.loader, self.epoch, self.index = loader, epoch, index

    def __iter__(self):
        epoch, index = self.epoch, self.index
        while True:
            steps = self.loader.epoch_steps(epoch)
            for step in range(index, len(steps)):
                yield steps[step]
            epoch, index = epoch + 1, 0


class ResumableLoader:
    def __init__(self, dataset, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, drop_last: bool = True):
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                                 ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        n = len(dataset)
        if n == 0:
            raise ConfigError("the dataset has no windows")
        if drop_last and n < batch_size * world_size:
            raise ConfigError(f"the dataset has {n} windows, fewer than one step needs (batch_size "
                              f"{batch_size} x world_size {world_size}); lower the batch size or use "
                              f"drop_last=False")
        self.dataset = dataset
        self.batch_size, self.seed = batch_size, int(seed)
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.drop_last = num_workers, drop_last
        self.epoch, self.index = 0, 0

    def __len__(self) -> int:
        """Steps (batches per rank) in one epoch."""
        n, step = len(self.dataset), self.batch_size * self.world_size
        return n // step if self.drop_last else -(-n // step)

    def epoch_steps(self, epoch: int) -> list[list[int]]:
        """This rank's index list for every step of `epoch`."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        step = self.batch_size * self.world_size
        order = np.resize(order, len(self) * step)  # drops the tail, or wraps around to fill it
        lo = self.rank * self.batch_size
        return [order[s + lo : s + lo + self.batch_size].tolist() for s in range(0, len(order), step)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches from the current position on, forever. Use one iterator at a time."""
        sampler = _StepSampler(self, self.epoch, self.index)
        batches: Iterator[tuple[torch.Tensor, ...]]
        if self.num_workers == 0:
            batches = (collate([self.dataset[i] for i in step]) for step in sampler)
        else:
            batches = iter(DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                      collate_fn=collate))
        steps_per_epoch = len(self)
        for batch in batches:
            self.index += 1
            if self.index == steps_per_epoch:
                self.epoch, self.index = self.epoch + 1, 0
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "num_windows": len(self.dataset),
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        for key in _CHECKED_KEYS:
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ConfigError(f"cannot resume the data position: {key} was {state[key]!r}, now {mine!r} "
                                  f"(resume with the same data and settings)")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < len(self):
            raise ConfigError(f"cannot resume the data position: index {index} is outside an epoch of "
                              f"{len(self)} steps")
        self.epoch, self.index = epoch, index
