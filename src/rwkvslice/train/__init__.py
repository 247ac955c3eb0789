"""Training: the loop (trainer), one optimizer step (step), AdamW groups and the LR schedule (optim),
atomic checkpoints (checkpoint), RNG capture (rng), metrics (metrics), DDP setup (distributed) and the
built-in demo (demo)."""

from rwkvslice.train.checkpoint import latest_checkpoint, resolve_weights_dir, save_checkpoint
from rwkvslice.train.optim import WarmupCosine, build_optimizer, lr_factor, param_groups
from rwkvslice.train.step import LossModule, train_step
from rwkvslice.train.trainer import NonFiniteError, TrainConfig, TrainResult, train

__all__ = [
    "LossModule",
    "NonFiniteError",
    "TrainConfig",
    "TrainResult",
    "WarmupCosine",
    "build_optimizer",
    "latest_checkpoint",
    "lr_factor",
    "param_groups",
    "resolve_weights_dir",
    "save_checkpoint",
    "train",
    "train_step",
]
