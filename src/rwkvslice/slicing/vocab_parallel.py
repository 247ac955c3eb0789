"""Vocabulary-parallel linear + cross-entropy: the head weight stays sharded by rows over the ranks.

Under FSDP the head (V x C) is a DTensor sharded on dim 0: rank r owns the rows [off_r, off_r + V_r).
Gathering it for the loss costs a whole V x C copy per rank (and one more for the gradient's
reduce-scatter), when every activation of the step is still alive. Instead every rank scores *all
ranks'* kept rows against *its own* rows of W:

1. all-gather the kept hidden states and targets (N_total x C, small next to V x C) and each rank's
   loss divisor (num_items);
2. per chunk of the gathered rows: the local logits (n x V_r); each rank's row max, its sum of
   exp(z - max) over its non-target columns, and the target's logit (from the rank that owns the
   target's row of W) are all-gathered (n x 3 per rank) and combined into the global max, rest and
   target logit, in the same order on every rank, so every rank computes the same loss for every row;
3. the gradients come in forward as in slicing.chunked: grad W_r (the complete gradient of this rank's
   rows, every rank's tokens in it: nothing to reduce afterwards) and each rank's partial grad_x for
   every row, all-reduced once at the end, of which a rank keeps its own rows.

Each rank's loss is the sum over its own rows / its divisor, exactly what the unsharded path returns.
The weight gradient is that of the mean of the ranks' losses, as DDP and FSDP average data-parallel
gradients: grad W = 1/world * sum_s g_s * d(loss_s)/dW, for g_s rank s's upstream gradient. The
divisors are folded into the rows in forward; the upstream gradients are only known in backward, where
they are all-gathered (world scalars) and must be equal (the trainer's `(loss * world).backward()` on
every rank is): ranks scaling their losses differently raise instead of getting a wrong gradient.

Every rank of the weight's group must make each call (forward and backward), with the same rows chunking
(it depends only on N_total): collectives run per chunk. The reference is slicing.linear_cross_entropy on
the whole weight (tests/integration/test_slicing_vocab_parallel.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rwkvslice.slicing.chunked import (
    choose_chunk_size,
    fold_chunk_gradients,
    grad_gemm_plan,
    stable_ce,
)
from rwkvslice.slicing.errors import check


def is_row_sharded(weight: torch.Tensor) -> bool:
    """Is `weight` a DTensor (FSDP2's sharded parameter)? Only those go the vocabulary-parallel way."""
    return callable(getattr(weight, "to_local", None)) and hasattr(weight, "placements")


def shard_layout(weight: torch.Tensor) -> tuple[torch.Tensor, int, dist.ProcessGroup]:
    """(this rank's rows of W, their first row's index in W, the process group) of a DTensor sharded on
    dim 0 over a 1-D mesh, as torch.chunk splits it (FSDP2's layout: ceil(V / world) rows per rank, the
    last ranks fewer or none)."""
    mesh = weight.device_mesh  # type: ignore[attr-defined]
    placements = weight.placements  # type: ignore[attr-defined]
    check(mesh.ndim == 1 and len(placements) == 1 and getattr(placements[0], "dim", None) == 0
          and placements[0].is_shard(),
          f"a sharded head weight must be sharded on dim 0 over a 1-D mesh, got {placements} over {mesh.ndim} dims")
    group = mesh.get_group()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local = weight.to_local()  # type: ignore[attr-defined]
    vocab = weight.shape[0]
    per = -(-vocab // world)
    offset = min(rank * per, vocab)
    check(local.shape[0] == min(per, vocab - offset),
          f"rank {rank} holds {local.shape[0]} rows of the {vocab}-row head, expected {min(per, vocab - offset)} "
          f"(torch.chunk's split over {world} ranks)")
    return local, offset, group


def vocab_parallel_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                                 divisor: float | torch.Tensor = 1.0, compute_dtype: torch.dtype,
                                 chunk_size: int | None = None) -> torch.Tensor:
    """sum over this rank's rows of CE(x @ W^T, target) / divisor, for W a row-sharded DTensor (V x C).

    x (N_r, C) and target (N_r,) are this rank's kept rows (valid ids only: the caller drops -100 rows;
    N_r may be 0 on some ranks). A collective over W's group: every rank calls it, and calls backward.
    With no row on any rank the result is an exact 0 connected to x and W (zero gradients)."""
    local, offset, group = shard_layout(weight)
    grad_on = torch.is_grad_enabled()
    need_grad_x = grad_on and x.requires_grad
    need_grad_w = grad_on and local.requires_grad
    divisor_t = torch.as_tensor(divisor, dtype=torch.float64).reshape(())
    return VocabParallelLinearCrossEntropy.apply(x, local, target, divisor_t, offset, weight.shape[0], group,
                                                 chunk_size, compute_dtype, need_grad_x, need_grad_w)


class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """See the module docstring. Backward may run once (no retain_graph), on every rank."""

    @staticmethod
    def forward(ctx, x, local, target, divisor, offset, vocab, group, chunk_size, compute_dtype,
                need_grad_x, need_grad_w):
        with torch.autocast(device_type=x.device.type, enabled=False):
            loss, grad_x, grad_w = _forward(x, local, target, divisor, offset, vocab, group, chunk_size,
                                            compute_dtype, need_grad_x, need_grad_w)
        ctx.grads, ctx.group = (grad_x, grad_w), group
        ctx.mark_non_differentiable(target)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("vocab-parallel linear_cross_entropy: backward ran twice; its gradients are "
                               "computed in forward and handed over once (retain_graph is not supported)")
        grad_x, grad_w = ctx.grads
        ctx.grads = None
        g = grad_output.detach().to(torch.float64).reshape(1)
        if grad_x is not None and g.item() != 1.0:
            grad_x.mul_(g.to(grad_x.dtype))
        if grad_w is not None:
            every = torch.empty(dist.get_world_size(ctx.group), dtype=torch.float64, device=g.device)
            _all_gather_into(every, g, ctx.group)
            # a non-finite one (a rank's non-finite loss) makes the gradient non-finite on every rank, for
            # the trainer's non-finite check to skip the step everywhere, as a reduced gradient would
            if bool(torch.isfinite(every).all()) and not bool((every == every[0]).all()):
                raise RuntimeError(f"vocab-parallel linear_cross_entropy: the ranks' losses were scaled "
                                   f"differently before backward ({every.tolist()}); the sharded head's "
                                   f"gradient needs the same upstream gradient on every rank")
            scale = every.sum().item() / every.numel() ** 2  # g / world (a non-finite g anywhere carries over)
            if scale != 1.0:
                grad_w.mul_(scale)
        return grad_x, grad_w, None, None, None, None, None, None, None, None, None


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """(world, *t.shape): every rank's t (same shape on every rank)."""
    world = dist.get_world_size(group)
    out = torch.empty((world * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)  # (gloo's layout)
    _all_gather_into(out, t.contiguous(), group)
    return out.view(world, *t.shape)


def _all_gather_into(out: torch.Tensor, t: torch.Tensor, group) -> None:
    # torch 2.13 deprecates all_gather_into_tensor for all_gather_single (same semantics); older ones lack it
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=group)


def _forward(x, local, target, divisor, offset, vocab, group, chunk_size, compute_dtype, need_grad_x,
             need_grad_w):
    device = x.device
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    channels = x.shape[1]

    # 1. every rank's row count and divisor, then its rows (padded to the longest) and targets
    meta = _all_gather(torch.tensor([float(x.shape[0]), divisor.item()], dtype=torch.float64, device=device), group)
    counts = [int(c) for c in meta[:, 0].tolist()]
    starts = [sum(counts[:s]) for s in range(world)]
    total_rows, longest = sum(counts), max(counts)
    own = slice(starts[rank], starts[rank] + counts[rank])
    if total_rows == 0:  # nothing to score anywhere: the same exact 0 (zero gradients) on every rank
        return (torch.zeros((), dtype=acc_dtype, device=device), torch.zeros_like(x) if need_grad_x else None,
                torch.zeros_like(local) if need_grad_w else None)
    x_c = x.to(compute_dtype)
    padded_x = x_c.new_zeros((longest, channels))
    padded_x[: counts[rank]] = x_c
    padded_t = target.new_zeros((longest,))
    padded_t[: counts[rank]] = target
    xs_all, ts_all = _all_gather(padded_x, group), _all_gather(padded_t, group)
    x_all = torch.cat([xs_all[s, : counts[s]] for s in range(world)])
    t_all = torch.cat([ts_all[s, : counts[s]] for s in range(world)])
    del xs_all, ts_all, padded_x
    # each row's weight in the loss: 1 / its rank's divisor
    row_weight = torch.cat([torch.full((counts[s], 1), 1.0 / meta[s, 1].item() if counts[s] else 0.0,
                                       dtype=acc_dtype, device=device) for s in range(world)])

    # which rank owns each target's row of W (torch.chunk's split), and the target's index in its shard
    per = -(-vocab // world)
    owner = torch.div(t_all, per, rounding_mode="floor")
    mine = owner == rank
    local_t = torch.where(mine, t_all - offset, torch.zeros_like(t_all))

    grad_gemm_low, fp32_out_addmm = grad_gemm_plan(device, compute_dtype, need_grad_x, need_grad_w)
    w_c = local.to(compute_dtype)
    w_acc = local.to(acc_dtype) if need_grad_x and not grad_gemm_low else None
    # the partial grad_x of every row (summed over the ranks at the end), in the accumulation dtype
    grad_x_all = torch.zeros((total_rows, channels), dtype=acc_dtype, device=device) if need_grad_x else None
    grad_w = torch.zeros(local.shape, dtype=acc_dtype, device=device) if need_grad_w else None
    loss = torch.zeros((), dtype=acc_dtype, device=device)
    rows = chunk_size or choose_chunk_size(total_rows, vocab, channels, compute_dtype)

    for start in range(0, total_rows, rows):  # the same chunks on every rank (they depend on total_rows only)
        stop = min(start + rows, total_rows)
        n = stop - start
        xs, ts, mine_s = x_all[start:stop], local_t[start:stop].unsqueeze(1), mine[start:stop].unsqueeze(1)
        logits = torch.mm(xs, w_c.t())
        z = logits if logits.dtype == acc_dtype else logits.to(acc_dtype)
        # 2. this rank's part of each row: its max, its target-free exp-sum, the target's logit if it owns it
        stats = torch.zeros((n, 3), dtype=acc_dtype, device=device)
        if z.shape[1] > 0:
            z_target = torch.where(mine_s, z.gather(1, ts), torch.zeros((), dtype=acc_dtype, device=device))
            local_max = z.amax(dim=1, keepdim=True)
            z.sub_(local_max).exp_()
            owned = torch.nonzero(mine_s.squeeze(1)).squeeze(1)  # the chunk's rows whose target is here
            owned_cols = ts.squeeze(1)[owned]
            z.index_put_((owned, owned_cols), torch.zeros((), dtype=acc_dtype, device=device))
            stats[:, 0:1], stats[:, 1:2], stats[:, 2:3] = local_max, z.sum(dim=1, keepdim=True), z_target
        else:  # a rank with no rows of W (V < world * ceil(V / world)): it adds nothing to any row
            stats[:, 0] = -torch.inf
        every = _all_gather(stats, group)  # (world, n, 3)
        row_max = every[:, :, 0].amax(dim=0).unsqueeze(1)  # (n, 1), the global max over all V columns
        rescale = torch.exp(every[:, :, 0:1] - row_max)  # each rank's local max relative to the global one
        rest = (every[:, :, 1:2] * rescale).sum(dim=0)  # sum over j != y of exp(z_j - m), all ranks
        z_y = every[:, :, 2:3].sum(dim=0)  # only the owner contributed a nonzero value
        row_loss, inv_total = stable_ce(z_y - row_max, rest)
        lo, hi = max(start, own.start), min(stop, own.stop)
        if lo < hi:
            loss += (row_loss[lo - start: hi - start] * row_weight[lo:hi]).sum()

        if (need_grad_x or need_grad_w) and z.shape[1] > 0:
            # 3. dlogits of this rank's columns: exp(z - m) off target, -rest / total at an owned target
            z.mul_(rescale[rank])
            z.index_put_((owned, owned_cols), -rest[owned, 0])
            fold_chunk_gradients(z, logits, xs, w_c, w_acc, inv_total * row_weight[start:stop],
                                 grad_x_all[start:stop] if need_grad_x else None, grad_w,
                                 grad_gemm_low, fp32_out_addmm)
        del logits, z

    grad_x = None
    if need_grad_x:
        dist.all_reduce(grad_x_all, group=group)  # every rank's columns' part of every row
        grad_x = grad_x_all[own].to(x.dtype)
    if grad_w is not None and grad_w.dtype != local.dtype:
        grad_w = grad_w.to(local.dtype)
    return loss.to(acc_dtype), grad_x, grad_w
