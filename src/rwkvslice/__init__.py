"""rwkvslice: RWKV-7 (x070) training and inference with physical slicing.

The LM head and the loss run only at positions whose target is kept, in chunks, so full B x T x V
logits never exist. See README.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rwkvslice.errors import CheckpointError, ConfigError, DataError, RWKVSliceError
from rwkvslice.model.config import PRESETS, RWKV7Config

if TYPE_CHECKING:
    from rwkvslice.model.rwkv7 import RWKV7, RWKV7State

__version__ = "0.1.0"


def __getattr__(name: str):
    # torch (~2 s to import) loads on first use of the model, so `rwkvslice --help` and the CLI's
    # argument errors answer at once
    if name in ("RWKV7", "RWKV7State"):
        from rwkvslice.model import rwkv7

        return getattr(rwkv7, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "RWKV7",
    "RWKV7Config",
    "RWKV7State",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "RWKVSliceError",
    "__version__",
]
