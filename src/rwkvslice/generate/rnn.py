"""Batch generation in RNN mode: a GPT-mode prefill of each prompt, then one `model.step` per token.

Prompts of different lengths are prefilled in groups of equal length (no padding ever enters the
recurrent state), their states are concatenated into one batch, and decoding runs on the whole batch.
A sequence that emits `eod_id` stops; finished sequences are dropped from the batch so the remaining
ones keep running at their own cost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from rwkvslice.errors import ConfigError
from rwkvslice.generate.sampling import check_sampling_args, sample_next


def cat_states(states: Sequence):
    """Concatenate RWKV7State objects along the batch axis (dim 1 of every field: (L, B, ...))."""
    first = states[0]
    return dataclasses.replace(first, **{
        f.name: torch.cat([getattr(s, f.name) for s in states], dim=1) for f in dataclasses.fields(first)
    })


@torch.no_grad()
def prefill(model, prompts: Sequence[Sequence[int]], *, device=None, backend: str = "auto"):
    """Run every prompt in GPT mode. Returns (last-position logits (B, V) fp32, state for the batch)."""
    device = device or next(model.parameters()).device
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    order, logits_parts, state_parts = [], [], []
    for _, members in sorted(by_len.items()):
        idx = torch.tensor([list(prompts[i]) for i in members], dtype=torch.long, device=device)
        logits, state = model(idx, positions="last", return_state=True, backend=backend)
        order.extend(members)
        logits_parts.append(logits[:, 0].float())
        state_parts.append(state)
    logits = torch.cat(logits_parts)
    state = cat_states(state_parts) if len(state_parts) > 1 else state_parts[0]
    # back to the caller's order
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return logits[inverse.to(logits.device)], state.index_select(inverse)


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eod_id: int | None = 0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[int, int], None] | None = None,
    backend: str = "auto",
) -> list[list[int]]:
    """Generate up to `max_new_tokens` tokens after each prompt (list of token-id lists).

    temperature 0 is greedy decoding. A sequence stops after emitting `eod_id` (not included in its
    output). `on_token(seq_index, token_id)` is called for every generated token as soon as it exists
    (streaming). `seed` (or an explicit `generator`) makes sampling reproducible.
    Returns the generated token ids of each prompt, in the prompts' order.
    """
    check_sampling_args(temperature, top_p, top_k)
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not prompts:
        return []
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ConfigError(f"prompt {i} is empty; start it with the document separator (token {eod_id})")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    outputs: list[list[int]] = [[] for _ in prompts]
    try:
        if max_new_tokens == 0:
            return outputs
        logits, state = prefill(model, prompts, device=device, backend=backend)
        active = torch.arange(len(prompts))  # original index of each row still running
        for i in range(max_new_tokens):
            tokens = sample_next(logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
            keep = []
            for row, (seq, tok) in enumerate(zip(active.tolist(), tokens.tolist(), strict=True)):
                if eod_id is not None and tok == eod_id:
                    continue
                outputs[seq].append(tok)
                if on_token is not None:
                    on_token(seq, tok)
                keep.append(row)
            if not keep or i == max_new_tokens - 1:
                break
            if len(keep) < len(active):
                keep_t = torch.tensor(keep, dtype=torch.long)
                active, tokens, state = active[keep_t], tokens[keep_t.to(tokens.device)], state.index_select(keep_t)
            logits, state = model.step(tokens, state)
            logits = logits.float()
        return outputs
    finally:
        model.train(was_training)
