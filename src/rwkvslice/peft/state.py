"""State tuning: train only each layer's initial WKV state, (L, H, N, N) fp32, starting at zero.

The state lives on the model as `model.initial_state` (see RWKV7.__init__): GPT mode (`model(idx)`,
`hidden_states`, `loss`) starts every sequence from it when no state is passed, through the WKV
operator's `state=` argument (so its gradient comes from the operator's backward), and
`model.init_state(B)` returns it for RNN mode. The token-shift states start at zero as usual.

File layout (RWKV-PEFT's, which RWKV-Runner and the `rwkv` package users load): a `.pth` with one fp32
tensor per layer, `blocks.{i}.att.time_state`, shape (H, N, N), in the official [value][key] layout of
the `rwkv` package's WKV state entries (`state[3 * i + 1]`), as is: no transpose
(tests/integration/test_peft_interop.py proves the direction against the package's logits).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rwkvslice.errors import CheckpointError

STATE_KEY = "blocks.{}.att.time_state"
_STATE_KEY_RE = re.compile(r"^blocks\.(\d+)\.att\.time_state$")
OWN_KEY = "initial_state"  # our checkpoints' name: the whole (L, H, N, N) tensor


def state_shape(model: Any) -> tuple[int, int, int, int]:
    cfg = model.config  # type: ignore[attr-defined]
    return (cfg.n_layer, cfg.n_head, cfg.head_size, cfg.head_size)


def enable_state_tuning(model: Any) -> nn.Parameter:
    """Give the model a trainable zero initial WKV state (fp32, on the model's device); returns it."""
    p = nn.Parameter(torch.zeros(state_shape(model), dtype=torch.float32, device=model.emb.weight.device))
    model.initial_state = p
    return p


def set_initial_state(model: Any, state: torch.Tensor | None) -> None:
    """Use `state` (L, H, N, N) as the model's initial WKV state (frozen), or None for zeros."""
    if state is None:
        model.initial_state = None
        return
    if tuple(state.shape) != state_shape(model):
        raise CheckpointError(f"initial state has shape {tuple(state.shape)}, the model needs {state_shape(model)}")
    dev = model.emb.weight.device
    model.initial_state = nn.Parameter(state.detach().to(dev, torch.float32).clone(), requires_grad=False)


def save_state_file(state: torch.Tensor, path: str | Path) -> None:
    """Write (L, H, N, N) as RWKV-PEFT's `blocks.{i}.att.time_state` (H, N, N) fp32 .pth, atomically."""
    from rwkvslice.peft.files import atomic_save

    sd = {STATE_KEY.format(i): s.detach().to("cpu", torch.float32).contiguous().clone()
          for i, s in enumerate(state)}
    atomic_save(Path(path), lambda tmp: torch.save(sd, tmp))


def load_state_file(path: str | Path, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Read a state file (RWKV-PEFT's per-layer .pth, or a .pth/.safetensors with our `initial_state`)
    into an (L, H, N, N) fp32 tensor; a one-line CheckpointError on a wrong layer count or shape."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--state {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a corrupt file
        raise CheckpointError(f"--state {path}: cannot read it ({type(exc).__name__})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"--state {path}: expected a dict of tensors")
    L, H, N, _ = shape
    if OWN_KEY in sd:
        t = sd[OWN_KEY]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"--state {path}: '{OWN_KEY}' has shape {tuple(t.shape)}, the model needs {shape}")
        return t.to(torch.float32)
    layers = {}
    for key, t in sd.items():
        m = _STATE_KEY_RE.match(str(key))
        if m is None:
            raise CheckpointError(f"--state {path}: unexpected key {key!r} (a state file holds only "
                                  f"blocks.{{i}}.att.time_state)")
        layers[int(m.group(1))] = t
    if sorted(layers) != list(range(L)):
        raise CheckpointError(f"--state {path}: has {len(layers)} layer state(s) (indices "
                              f"{sorted(layers)[:3]}...), the model has {L} layers")
    for i in range(L):
        if tuple(layers[i].shape) != (H, N, N):
            raise CheckpointError(f"--state {path}: '{STATE_KEY.format(i)}' has shape {tuple(layers[i].shape)}, "
                                  f"the model needs {(H, N, N)}")
    return torch.stack([layers[i].to(torch.float32) for i in range(L)])
