"""The RWKV-7 model: config, the module itself (GPT and RNN mode) and checkpoint interop."""

from rwkvslice.model.config import PRESETS, RWKV7Config
from rwkvslice.model.rwkv7 import RWKV7, RWKV7State

__all__ = ["PRESETS", "RWKV7", "RWKV7Config", "RWKV7State"]
