"""Linear + cross-entropy over kept rows, and the sliced loss the model calls.

Dtypes: the compute dtype is the autocast dtype when autocast is on for x's device (what F.linear
would use), else the promotion of x's and W's dtypes (an fp32 master W with bf16 x computes in
fp32). Every implementation casts x and W to it itself, with autocast switched off inside, so all
three impls see the same GEMM dtype and autograd returns the gradients in the original dtypes (fp32
for an fp32 master weight). Log-sum-exp and the loss are fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from rwkvslice.slicing.chunked import ChunkedLinearCrossEntropy, choose_chunk_size
from rwkvslice.slicing.errors import SlicingError, check
from rwkvslice.slicing.select import IGNORE_INDEX, select_kept
from rwkvslice.slicing.vocab_parallel import is_row_sharded, vocab_parallel_cross_entropy

IMPLS = ("auto", "chunked", "torch", "full")


def torch_chunked_available() -> bool:
    """torch >= 2.13 ships F.linear_cross_entropy with a chunked path (LinearCrossEntropyOptions)."""
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def resolve_impl(impl: str) -> str:
    """The implementation "auto" stands for.

    "auto" -> "chunked" (ours) everywhere. Rule from reports/bench-loss.md (CPU, torch 2.13, fp32,
    V=65536, C=512, B x T=4096, fresh process per configuration): ours was both leaner and faster than
    torch's chunked F.linear_cross_entropy at every kept density measured. Head + loss only, peak
    memory ours/torch 0.74 / 0.76 / 0.70 and CPU time 0.41 / 0.14 / 0.06 at 100 / 25 / 5 % kept (torch's
    CPU fp32 default chunks 16 rows at N=4096 and 1-4 rows below, so its GEMMs turn memory-bound);
    whole 2-layer model step, memory 0.95 / 0.97 / 0.97 and CPU time 0.51 / 0.35 / 0.41. So torch's path
    is never picked here, and older torch lacks it. CUDA is not measured yet (no GPU in this project's
    runs); ours stays the default there until a measurement says otherwise.
    """
    check(impl in IMPLS, f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "auto":
        return "chunked"
    if impl == "torch":
        check(
            torch_chunked_available(),
            f"impl='torch' needs F.linear_cross_entropy with LinearCrossEntropyOptions "
            f"(torch >= 2.13); this is torch {torch.__version__}",
        )
    return impl


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The GEMM dtype: the autocast dtype if autocast is on for x's device, else promote(x, W)."""
    promoted = torch.promote_types(x.dtype, weight.dtype)
    autocast = _autocast_dtype(x.device.type)
    if autocast is not None and promoted != torch.float64:  # autocast leaves fp64 alone
        return autocast
    return promoted


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Sum over rows of cross_entropy(x @ weight^T, target) as an fp32 scalar (fp64 for fp64 inputs).

    x (N, C), weight (V, C), target (N,) int ids; rows whose target is -100 are skipped. A target
    outside [0, V) other than -100 raises SlicingError. impl: "chunked" (ours, never holds N x V
    logits), "torch" (torch's chunked F.linear_cross_entropy, torch >= 2.13), "full" (plain logits
    then F.cross_entropy in fp32), "auto" (see resolve_impl). chunk_size overrides the rows per chunk
    of "chunked" / "torch". With no row left the result is an exact 0 that still depends on x and
    weight (zero gradients), so data-parallel gradient hooks fire on every rank.

    A weight that is a DTensor sharded on dim 0 (FSDP's head) is never gathered: the call is then a
    collective over its ranks, which score each other's rows against their own rows of W
    (slicing.vocab_parallel; impl "auto" / "chunked" only), and W's gradient is that of the mean of the
    ranks' losses, as data-parallel training averages gradients.
    """
    check(x.dim() == 2, f"x must be (N, C), got shape {tuple(x.shape)}")
    check(weight.dim() == 2, f"weight must be (V, C), got shape {tuple(weight.shape)}")
    check(
        x.shape[1] == weight.shape[1],
        f"x has {x.shape[1]} channels but weight (V, C) has C = {weight.shape[1]}",
    )
    check(
        tuple(target.shape) == (x.shape[0],),
        f"target must be ({x.shape[0]},) to match x, got shape {tuple(target.shape)}",
    )
    check(
        not target.is_floating_point() and target.dtype != torch.bool,
        f"target must hold integer token ids, got dtype {target.dtype}",
    )
    check(
        chunk_size is None or (isinstance(chunk_size, int) and chunk_size > 0),
        f"chunk_size must be a positive int or None, got {chunk_size!r}",
    )
    impl = resolve_impl(impl)
    target = target.to(device=x.device, dtype=torch.long)
    vocab_size = weight.shape[0]
    _check_target_range(target, vocab_size)

    kept = target != IGNORE_INDEX
    if not bool(kept.all()):
        rows = torch.nonzero(kept).squeeze(1)
        x, target = x.index_select(0, rows), target.index_select(0, rows)
    if is_row_sharded(weight):
        return _vocab_parallel(x, weight, target, chunk_size, impl, divisor=1.0)
    if x.shape[0] == 0:
        return _connected_zero(x, weight)

    dtype = compute_dtype(x, weight)
    if impl == "chunked":
        return _chunked(x, weight, target, chunk_size, dtype)
    if impl == "torch":
        return _torch_chunked(x, weight, target, chunk_size, dtype)
    return _full(x, weight, target, dtype)


def sliced_cross_entropy(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    num_items: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Mean next-token cross-entropy over kept positions, computed on those positions only.

    hidden (B, T, C) after ln_out, head_weight (V, C), targets (B, T) aligned with hidden (targets[b,t]
    follows the input at t; -100 = no loss). Returns the fp32 sum of CE over the N kept positions
    divided by num_items if given (the global kept count over gradient-accumulation micro-batches and
    ranks, int or tensor) else by N. With N = 0 the loss is an exact 0.0 connected to hidden and
    head_weight, whose gradients are then exact zeros. A row-sharded (DTensor) head_weight: see
    linear_cross_entropy.
    """
    x, t = select_kept(hidden, targets)
    _check_target_range(targets, head_weight.shape[0], name="targets")  # names the (b, t) position
    kept = x.shape[0]
    check(
        num_items is None or isinstance(num_items, torch.Tensor)
        or (isinstance(num_items, numbers.Integral) and num_items >= kept),
        f"num_items must be an int >= the {kept} kept targets of this batch (or a tensor), got {num_items!r}",
    )
    if is_row_sharded(head_weight):  # FSDP's head: the divisor goes into the rows (slicing.vocab_parallel)
        divisor = num_items if num_items is not None else max(kept, 1)
        return _vocab_parallel(x, head_weight, t, chunk_size, resolve_impl(impl), divisor=divisor)
    total = linear_cross_entropy(x, head_weight, t, chunk_size=chunk_size, impl=impl)
    if kept == 0:
        return total  # already the connected 0; dividing could make 0/0 when num_items == 0
    if num_items is None:
        return total / kept
    if isinstance(num_items, torch.Tensor):
        return total / num_items.to(device=total.device, dtype=total.dtype)
    return total / num_items


# --------------------------------------------------------------------------------------------------


def _chunked(x, weight, target, chunk_size, dtype):
    grad_on = torch.is_grad_enabled()
    need_grad_x = grad_on and x.requires_grad
    need_grad_w = grad_on and weight.requires_grad
    rows = chunk_size or choose_chunk_size(x.shape[0], weight.shape[0], weight.shape[1], dtype)
    return ChunkedLinearCrossEntropy.apply(x, weight, target, rows, dtype, need_grad_x, need_grad_w)


def _vocab_parallel(x, weight, target, chunk_size, impl, *, divisor):
    """A row-sharded (DTensor) weight: every rank scores every rank's rows against its own rows of W."""
    check(impl == "chunked", f"impl={impl!r} needs the whole weight; a row-sharded (FSDP) head weight runs "
          "the vocabulary-parallel chunked loss only (impl='auto' or 'chunked')")
    local = weight.to_local()
    return vocab_parallel_cross_entropy(x, weight, target, divisor=divisor, compute_dtype=compute_dtype(x, local),
                                        chunk_size=chunk_size)


def _torch_chunked(x, weight, target, chunk_size, dtype):
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk_size)
    with torch.autocast(device_type=x.device.type, enabled=False):
        loss = F.linear_cross_entropy(
            x.to(dtype), weight.to(dtype), target, reduction="sum", ignore_index=IGNORE_INDEX, options=options
        )
    return loss.to(_loss_dtype(dtype))


def _full(x, weight, target, dtype):
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = F.linear(x.to(dtype), weight.to(dtype))
        return F.cross_entropy(logits.to(_loss_dtype(dtype)), target, reduction="sum")


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _connected_zero(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """0.0 that depends on x and weight: backward gives them exact zero gradients."""
    dtype = _loss_dtype(torch.promote_types(x.dtype, weight.dtype))
    return x.to(dtype).sum() * 0.0 + weight[:1, :1].to(dtype).sum() * 0.0


def _check_target_range(target: torch.Tensor, vocab_size: int, name: str = "target") -> None:
    bad = (target >= vocab_size) | ((target < 0) & (target != IGNORE_INDEX))
    if bool(bad.any()):
        position = tuple(int(i) for i in torch.nonzero(bad)[0])
        where = position[0] if len(position) == 1 else list(position)
        raise SlicingError(
            f"{name}[{where}] = {int(target[position])} is out of range for vocab_size {vocab_size} "
            f"(expected 0..{vocab_size - 1}, or -100 for no loss)"
        )


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The active autocast dtype for device_type, or None (the per-device-type API of torch >= 2.4;
    pyproject requires torch >= 2.5)."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)
