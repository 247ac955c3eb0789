"""Pick the hidden states whose target carries loss (physical slicing, step 1)."""

from __future__ import annotations

import torch

from rwkvslice.slicing.errors import check

IGNORE_INDEX = -100


def select_kept(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x (N, C), t (N,)): the rows of `hidden` whose target is not -100, and those targets.

    `targets` is already aligned with `hidden`: targets[b, t] is the token that should follow the
    input at position t, so hidden[b, t] is scored against targets[b, t]. No shift happens here (a
    second shift would train next-next-token prediction).

    The rows are gathered with index_select, so the backward pass is a scatter into zeros of
    hidden's shape: ignored positions get an exact 0 gradient. When every target is kept the rows
    are a reshape of `hidden` (no copy). Finding N needs one device->host sync (nonzero).
    """
    check(hidden.dim() == 3, f"hidden must be (B, T, C), got shape {tuple(hidden.shape)}")
    check(
        tuple(targets.shape) == tuple(hidden.shape[:2]),
        f"targets {tuple(targets.shape)} must have hidden's (B, T) = {tuple(hidden.shape[:2])}",
    )
    check(
        not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool,
        f"targets must hold integer token ids, got dtype {targets.dtype}",
    )
    channels = hidden.shape[-1]
    flat_targets = targets.reshape(-1).to(device=hidden.device, dtype=torch.long)
    flat_hidden = hidden.reshape(-1, channels)
    kept = torch.nonzero(flat_targets != IGNORE_INDEX).squeeze(1)
    if kept.numel() == flat_targets.numel():
        return flat_hidden, flat_targets
    return flat_hidden.index_select(0, kept), flat_targets.index_select(0, kept)
