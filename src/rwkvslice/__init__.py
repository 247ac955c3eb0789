"""rwkvslice: RWKV-7 (x070) training and inference with physical slicing.

The LM head and the loss run only at positions whose target is kept, in chunks, so full B x T x V
logits never exist. See README.md.
"""

from rwkvslice.errors import CheckpointError, ConfigError, DataError, RWKVSliceError
from rwkvslice.model import PRESETS, RWKV7, RWKV7Config, RWKV7State

__version__ = "0.1.0"

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
