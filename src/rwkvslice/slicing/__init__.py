"""Physical slicing: the LM head and the loss only at positions whose target is kept.

select_kept gathers the kept rows of the hidden states; linear_cross_entropy projects and scores them
(by default chunked, never holding N x V logits); sliced_cross_entropy chains the two and normalises.
"""

from rwkvslice.slicing.chunked import ChunkedLinearCrossEntropy, choose_chunk_size
from rwkvslice.slicing.errors import SlicingError
from rwkvslice.slicing.loss import (
    IMPLS,
    compute_dtype,
    linear_cross_entropy,
    resolve_impl,
    sliced_cross_entropy,
    torch_chunked_available,
)
from rwkvslice.slicing.select import IGNORE_INDEX, select_kept

__all__ = [
    "IGNORE_INDEX",
    "IMPLS",
    "ChunkedLinearCrossEntropy",
    "SlicingError",
    "choose_chunk_size",
    "compute_dtype",
    "linear_cross_entropy",
    "resolve_impl",
    "select_kept",
    "sliced_cross_entropy",
    "torch_chunked_available",
]
