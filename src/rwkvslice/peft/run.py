"""Tuned training runs: attach adapters / a state to the base model, identify the base, resume.

The trainer builds the base model as for a full run (an --init-from .pth, or a fresh model from the
seed), then calls `attach`. A checkpoint of a tuned run holds only the trainable tensors (see tuning.py),
so a resume rebuilds the same base, checks it is the same one (sha256 of the --init-from file, or of the
fresh model's weights) and loads the trainable tensors over it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rwkvslice.peft.files import sha256_file
from rwkvslice.peft.tuning import (
    TuneSpec,
    check_same_base,
    load_trainable,
    prepare,
    read_tuned,
    weights_sha256,
)

# State tuners train the initial state at LRs far above those of weights (a CUDA state tuner's example:
# 1.0 decaying to 0.01). Measured on tests/runtime/test_peft_state.py's fixed-format task (60 steps,
# AdamW, cosine to lr/100): final loss 4.34 at lr 1e-3, 4.11 at 1e-2, 4.02 at 0.1, 4.05 at 1.0 on a
# weakly perturbed base, and 2.47 at 0.1 vs 1.48 at 1.0 vs a base loss of 6.32 on a stronger one; 3.0
# was worse than 1.0. So --tune state defaults to --lr 1.0 and --min-lr 0.01.
STATE_LR = 1.0
STATE_MIN_LR = 0.01


def base_identity(model: Any, init_from: str | None, model_arg: str, seed: int) -> dict:
    """What the adapters were trained on: the --init-from file (path + sha256), or a fresh model
    (its preset/config argument and seed, with the sha256 of its weights)."""
    if init_from:
        return {"init_from": str(Path(init_from).resolve()), "sha256": sha256_file(init_from)}
    return {"init_from": None, "model": model_arg, "seed": seed, "config": model.config.to_dict(),
            "sha256": weights_sha256(model)}


def attach(model: Any, spec: TuneSpec, *, init_from: str | None, model_arg: str, seed: int,
           resume_from: str | Path | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Prepare `model` (the freshly built base) for a tuned run; on resume load the trainable tensors.

    Returns the base identity (also kept on the model as `model.peft_base` for the checkpoint writer).
    A resume against another base raises a one-line ConfigError before anything is written.
    """
    identity = base_identity(model, init_from, model_arg, seed)
    factors = None
    if resume_from is not None:
        saved_spec, saved_base, tensors, factors = read_tuned(resume_from)
        check_same_base(saved_base, identity, str(resume_from))
    prepare(model, spec, pissa_factors=factors or None)
    if resume_from is not None:
        load_trainable(model, tensors, str(resume_from))
    elif log is not None and not init_from:
        log(f"note: --tune {spec.kind} on a freshly initialised model (no --init-from) is allowed but pointless "
            "(random weights; the official init zeroes att.output, so a state gets no gradient at all)")
    model.peft_base = identity
    return identity
