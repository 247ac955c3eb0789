"""The RWKV-7 model: config, the module itself (GPT and RNN mode) and checkpoint interop."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rwkvslice.model.config import PRESETS, RWKV7Config

if TYPE_CHECKING:
    from rwkvslice.model.rwkv7 import RWKV7, RWKV7State

__all__ = ["PRESETS", "RWKV7", "RWKV7Config", "RWKV7State"]


def __getattr__(name: str):
    # the module (and torch) load on first use: the config and presets alone need neither
    if name in ("RWKV7", "RWKV7State"):
        from rwkvslice.model import rwkv7

        return getattr(rwkv7, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
