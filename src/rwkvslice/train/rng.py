"""Capture and restore every random number generator a training step may touch.

Stored as plain tensors/ints/lists so the checkpoint loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng_state() -> dict:
    """torch (CPU and every CUDA device), numpy and python `random` states."""
    np_state: tuple = np.random.get_state(legacy=True)  # type: ignore[assignment]
    state: dict = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        # python's state is (version, tuple of 625 ints, gauss_next)
        "python": _python_state_to_plain(random.getstate()),
        "torch_cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(_python_state_from_plain(state["python"]))
    cuda_states = state.get("torch_cuda") or []
    if cuda_states and torch.cuda.is_available():
        # a run resumed on fewer devices restores the ones it has
        n_dev = min(len(cuda_states), torch.cuda.device_count())
        torch.cuda.set_rng_state_all(cuda_states[:n_dev])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _python_state_to_plain(st) -> dict:
    version, internal, gauss_next = st
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next}


def _python_state_from_plain(d: dict):
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss_next"])
