"""Physical slicing through the model: RWKV7.loss -> rwkvslice.slicing.sliced_cross_entropy.

The reference is the model's own full-logits forward (model(idx), every position through the head)
followed by masked F.cross_entropy(ignore_index=-100): what training without slicing computes.
Tolerances (fp32): loss relative error < 1e-6, every parameter gradient < 1e-5 (max-normalised).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rwkvslice import RWKV7, RWKV7Config

IGNORE = -100


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return (a - b).abs().max().item() / b.abs().max().item()


def tiny_model(vocab=50, seed=0):
    """A 2-layer model whose parameters are all perturbed: the official init zeroes several output
    projections, which would leave most parameters with an all-zero gradient and untested."""
    torch.manual_seed(seed)
    model = RWKV7(RWKV7Config(vocab_size=vocab, n_embd=32, n_layer=2, head_size=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def param_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def full_logits_loss(model, idx, targets, num_items=None):
    logits = model(idx)
    flat = logits.reshape(-1, logits.shape[-1])
    if num_items is None:
        return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE)
    return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum") / num_items


def sft_batch(B, T, vocab, g):
    idx = torch.randint(0, vocab, (B, T), generator=g)
    targets = torch.randint(0, vocab, (B, T), generator=g)
    starts = torch.randint(1, T - 1, (B, 1), generator=g)  # prompt: no loss
    ends = torch.randint(T - 1, T + 1, (B, 1), generator=g)  # right padding: no loss
    t = torch.arange(T)[None, :]
    return idx, torch.where((t >= starts) & (t < ends), targets, torch.full_like(targets, IGNORE))


def test_model_loss_equals_full_logits_masked_ce_for_every_parameter():
    """model.loss (sliced, chunked) = masked CE over the full logits, for the value and the gradient of
    every parameter (embedding, blocks, ln_out, head)."""
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    idx, targets = sft_batch(3, 12, 50, g)
    full_logits_loss(model, idx, targets).backward()
    ref = param_grads(model)
    ref_loss = full_logits_loss(model, idx, targets).item()
    model.zero_grad(set_to_none=True)
    loss = model.loss(idx, targets)
    loss.backward()
    assert abs(loss.item() - ref_loss) / ref_loss < 1e-6
    for name, p in model.named_parameters():
        assert ref[name].abs().max() > 0, name  # every parameter is really exercised
        assert rel(p.grad, ref[name]) < 1e-5, name


def test_model_loss_gradient_accumulation_with_num_items_equals_one_big_batch():
    """Uneven micro-batches (a row with 1 kept target, rows with many) normalised by the global kept count
    accumulate to the big batch's gradients for every parameter."""
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    idx, targets = sft_batch(4, 10, 50, g)
    targets[0] = IGNORE
    targets[0, 7] = 3  # micro-batch 1: one kept target
    num_items = int((targets != IGNORE).sum())
    model.loss(idx, targets).backward()
    big = param_grads(model)
    model.zero_grad(set_to_none=True)
    for rows in (slice(0, 1), slice(1, 4)):
        model.loss(idx[rows], targets[rows], num_items=num_items).backward()
    for name, p in model.named_parameters():
        assert rel(p.grad, big[name]) < 1e-5, name


def test_model_loss_all_ignored_batch_reaches_every_parameter_with_zero():
    """A micro-batch (or DDP rank) without kept targets: loss exactly 0.0 and every parameter still gets
    a gradient, exactly zero, so DDP's all-reduce hooks fire and nothing hangs."""
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 6))
    loss = model.loss(idx, torch.full((2, 6), IGNORE))
    assert loss.item() == 0.0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.equal(p.grad, torch.zeros_like(p)), name


def _train_mapping_task(targets_of, steps=12, vocab=16, seed=0):
    """Train on random tokens whose target is a fixed permutation of the *current* token; return the
    final loss, the model and the permutation."""
    model = RWKV7(RWKV7Config(vocab_size=vocab, n_embd=32, n_layer=1, head_size=16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g)
    for _ in range(steps):
        idx = torch.randint(0, vocab, (8, 8), generator=g)
        targets = targets_of(idx, perm)
        targets[:, :2] = IGNORE  # a prompt without loss
        loss = model.loss(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item(), model, perm, g


@pytest.mark.timeout(120)
def test_alignment_copy_task_only_learns_when_targets_pair_with_their_own_position():
    """targets[b, t] = perm(idx[b, t]): learnable only if model.loss scores hidden[b, t] against
    targets[b, t]. The loss falls near zero, and the model's own full logits at t predict perm(idx[t]),
    so a -1 pairing (learnable through token shift, but then logits[t] would predict perm(idx[t-1])) fails
    too. Control: the same task off by one (target = perm of the next, random, token) stays near log V."""
    vocab = 16

    def aligned(idx, perm):
        return perm[idx]

    def next_token(idx, perm):
        shifted = torch.full_like(idx, IGNORE)
        shifted[:, :-1] = perm[idx[:, 1:]]
        return shifted

    final, model, perm, g = _train_mapping_task(aligned, vocab=vocab)
    assert final < 0.1 * math.log(vocab)
    with torch.no_grad():
        idx = torch.randint(0, vocab, (4, 8), generator=g)
        accuracy = (model(idx).argmax(-1) == perm[idx]).float().mean().item()
    assert accuracy > 0.95

    control, _, _, _ = _train_mapping_task(next_token, vocab=vocab)
    assert control > 0.6 * math.log(vocab)
