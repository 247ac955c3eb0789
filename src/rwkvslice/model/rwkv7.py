"""RWKV-7 ("Goose", x070), as the official RWKV-LM code defines it. Read it top to bottom.

Parameter names and shapes are the official state-dict layout, so `state_dict()` *is* an official
checkpoint (see model/official.py for loading and saving `.pth` files).

Two ways to run the same weights:
- GPT mode, `model(idx)`: the whole sequence at once (training, prefill);
- RNN mode, `model.step(tokens, state)`: one token at a time, O(1) per token (generation).
Both carry an `RWKV7State` (token-shift vectors and the WKV state) and give the same logits.

Packing: `resets` (B, T) bool marks where a new sample starts inside a row. There every recurrent
quantity starts afresh, as at a sequence start: both token shifts read zeros and the WKV state is replaced
by the reset state (zeros, or a tuned state through the `initial_wkv_state` hook). Everything else
(v_first, the norms, the bonus) is per position, so a packed row computes exactly what its samples compute
one at a time.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rwkvslice.errors import ConfigError
from rwkvslice.model.config import RWKV7Config
from rwkvslice.ops import rnn_step_cpu, wkv7

LN_X_EPS = 64e-5  # the official GroupNorm eps ("!!! notice eps value !!!"), fixed for every head size


@dataclasses.dataclass
class RWKV7State:
    """Recurrent state of the whole model for a batch of B sequences.

    att_shift: (L, B, C) last input of each TimeMix (for its token shift)
    wkv:       (L, B, H, N, N) fp32 WKV state, official [value][key] layout
    ffn_shift: (L, B, C) last input of each ChannelMix
    """

    att_shift: torch.Tensor
    wkv: torch.Tensor
    ffn_shift: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.wkv.shape[1]

    def clone(self) -> RWKV7State:
        return RWKV7State(self.att_shift.clone(), self.wkv.clone(), self.ffn_shift.clone())

    def to(self, device) -> RWKV7State:
        return RWKV7State(self.att_shift.to(device), self.wkv.to(device), self.ffn_shift.to(device))

    def index_select(self, batch_indices: torch.Tensor) -> RWKV7State:
        i = batch_indices.to(self.wkv.device)
        return RWKV7State(self.att_shift[:, i], self.wkv[:, i], self.ffn_shift[:, i])


def _token_shift(x: torch.Tensor, last: torch.Tensor | None, resets: torch.Tensor | None = None) -> torch.Tensor:
    """x_prev - x, where x_prev[t] = x[t-1] and x_prev[0] is the carried `last` (zeros at the start);
    x_prev[t] is zero where resets[:, t] (a sample starts there)."""
    if x.shape[1] == 1 and last is not None and resets is None:  # RNN step: no concatenation needed
        return last[:, None].to(x.dtype) - x
    first = torch.zeros_like(x[:, :1]) if last is None else last[:, None].to(x.dtype)
    prev = torch.cat([first, x[:, :-1]], dim=1)
    if resets is not None:
        prev = prev.masked_fill(resets[..., None], 0.0)
    return prev - x


def _wkv_single_step(r, w, k, v, a, b, S):
    """One step of the WKV-7 recurrence for (B, 1, H, N) inputs; RNN mode's O(1) path (fp32 state)."""
    if r.dtype != torch.float32:
        r, w, k, v, a, b = (t.float() for t in (r, w, k, v, a, b))
    # (B, 1, H, N) -> column and row vectors per head: (B, H, N, 1) and (B, H, 1, N)
    col = lambda t: t.transpose(1, 2).transpose(2, 3)  # noqa: E731
    row = lambda t: t.transpose(1, 2)  # noqa: E731
    decay = torch.exp(-torch.exp(w))
    S = S * row(decay) + (S @ col(a)) @ row(b) + col(v) @ row(k)
    return (S @ col(r)).permute(0, 3, 1, 2), S  # y: (B, H, N, 1) -> (B, 1, H, N)


def _mix(x: torch.Tensor, xx: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    return x + xx * mu


def linear_of(linear: nn.Module, fn, *parts: torch.Tensor) -> torch.Tensor:
    """linear(fn(*parts)). A LoRA adapter (rwkvslice.peft.lora) takes the parts instead of the input, so
    that backward keeps them (shared between adapters, or kept by the model anyway) rather than a copy
    of each adapter's input."""
    forward_of = getattr(linear, "forward_of", None)
    return forward_of(fn, *parts) if forward_of is not None else linear(fn(*parts))


def _check_resets(resets, idx: torch.Tensor) -> None:
    if not isinstance(resets, torch.Tensor) or resets.dtype != torch.bool:
        what = resets.dtype if isinstance(resets, torch.Tensor) else type(resets).__name__
        raise ConfigError(f"resets must be a bool tensor (B, T) like idx, got {what}")
    if resets.shape != idx.shape:
        raise ConfigError(f"resets has shape {tuple(resets.shape)}, expected {tuple(idx.shape)} like idx")
    if resets.device != idx.device:
        raise ConfigError(f"resets is on {resets.device}, idx on {idx.device}")


class TimeMix(nn.Module):
    """RWKV_Tmix_x070: token shift, six mixes, LoRAs for decay / in-context rate / value residual / gate,
    the WKV-7 recurrence, GroupNorm, the bonus term and the gated output."""

    def __init__(self, config: RWKV7Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, H, N = config.n_embd, config.n_head, config.head_size
        d_decay, d_aaa, d_mv, d_gate = config.lora_ranks
        self.n_head, self.head_size = H, N
        self.x_r = nn.Parameter(torch.empty(1, 1, C))
        self.x_w = nn.Parameter(torch.empty(1, 1, C))
        self.x_k = nn.Parameter(torch.empty(1, 1, C))
        self.x_v = nn.Parameter(torch.empty(1, 1, C))
        self.x_a = nn.Parameter(torch.empty(1, 1, C))
        self.x_g = nn.Parameter(torch.empty(1, 1, C))
        self.w0 = nn.Parameter(torch.empty(1, 1, C))
        self.w1 = nn.Parameter(torch.empty(C, d_decay))
        self.w2 = nn.Parameter(torch.empty(d_decay, C))
        self.a0 = nn.Parameter(torch.empty(1, 1, C))
        self.a1 = nn.Parameter(torch.empty(C, d_aaa))
        self.a2 = nn.Parameter(torch.empty(d_aaa, C))
        if layer_id > 0:  # layer 0 *defines* v_first, so it has no value-residual LoRA
            self.v0 = nn.Parameter(torch.empty(1, 1, C))
            self.v1 = nn.Parameter(torch.empty(C, d_mv))
            self.v2 = nn.Parameter(torch.empty(d_mv, C))
        self.g1 = nn.Parameter(torch.empty(C, d_gate))
        self.g2 = nn.Parameter(torch.empty(d_gate, C))
        self.k_k = nn.Parameter(torch.empty(1, 1, C))
        self.k_a = nn.Parameter(torch.empty(1, 1, C))
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)

    def forward(self, x, v_first, shift=None, wkv_state=None, backend="auto", resets=None, reset_state=None):
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = _token_shift(x, shift, resets)
        xw, xv, xa, xg = x + xx * self.x_w, x + xx * self.x_v, x + xx * self.x_a, x + xx * self.x_g

        r = linear_of(self.receptance, _mix, x, xx, self.x_r)  # receptance(x + xx * x_r)
        w = -F.softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)) - 0.5  # soft clamp: decay > 0.545
        k = linear_of(self.key, _mix, x, xx, self.x_k)
        v = linear_of(self.value, _mix, x, xx, self.x_v)  # value(xv)
        if self.layer_id == 0:
            v_first = v
        else:  # value residual: mix in the first layer's values
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)

        def heads(t):
            return t.view(B, T, H, N)

        args = (heads(r), heads(w), heads(k), heads(v), heads(-kk), heads(kk * a))
        if T == 1 and wkv_state is not None and resets is None:
            y, wkv_state = _wkv_single_step(*args, wkv_state)
            y = y.to(r.dtype)
        else:
            # w <= -0.5 by the clamp above, so wkv7 need not check it (a device sync per call)
            y, wkv_state = wkv7(
                *args, state=wkv_state, resets=resets, reset_state=reset_state, backend=backend, check_w=False
            )

        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)
        y = y + bonus.view(B, T, C)
        # the shift state is a copy of the last token (B x C), not a view: a view would keep all of x
        # (B x T x C) alive as long as the state, and a prefill's state outlives its activations
        return linear_of(self.output, torch.mul, y, g), v_first, x[:, -1].clone(), wkv_state  # output(y * g)

    def step(self, x, v_first, shift, wkv_in, wkv_out):
        """RNN mode for one token per row: x, shift (B, C); WKV state (B, H, N, N) fp32. Under no_grad.

        The same maths as forward() on (B, C) rows in fewer kernels, because generation pays a fixed
        cost per op: the six mixes are one addcmul, the LoRA biases ride in addmm, and the decay
        exp(-exp(w)) with w = -softplus(-z) - 0.5 is exp(-e^-0.5 * sigmoid(z)). Parameters are read
        from `_parameters` directly (nn.Module.__getattr__ costs more than the small ops here). The
        next WKV state is written straight into `wkv_out`. Returns (output, v_first).
        """
        B, C = x.shape
        H, N = self.n_head, self.head_size
        p = self._parameters
        mixes = torch.cat([p["x_r"], p["x_w"], p["x_k"], p["x_v"], p["x_a"], p["x_g"]]).view(6, 1, C)
        xr, xw, xk, xv, xa, xg = torch.addcmul(x, shift - x, mixes)

        r = F.linear(xr, self.receptance.weight)
        z = torch.addmm(p["w0"].view(1, C), torch.tanh(xw @ p["w1"]), p["w2"])
        k = F.linear(xk, self.key.weight)
        v = F.linear(xv, self.value.weight)
        if self.layer_id == 0:
            v_first = v
        else:
            v = torch.lerp(v, v_first, torch.sigmoid(torch.addmm(p["v0"].view(1, C), xv @ p["v1"], p["v2"])))
        a = torch.sigmoid(torch.addmm(p["a0"].view(1, C), xa @ p["a1"], p["a2"]))
        g = torch.sigmoid(xg @ p["g1"]) @ p["g2"]
        kk = (k * p["k_k"].view(C)).view(B, H, N)
        kk = (kk / torch.linalg.vector_norm(kk, dim=-1, keepdim=True).clamp_min(1e-12)).view(B, C)
        k = torch.addcmul(k, k * (a - 1), p["k_a"].view(C))  # k * (1 + (a - 1) * k_a)

        # S' = S diag(decay) - (S kk)(kk a)^T + v k^T per head, S in [value][key] layout, fp32. The decay
        # is computed in fp32 too: near 1, bf16 (spacing 2^-8) would round 0.999 to 1 and stop the decay.
        if x.dtype != torch.float32:
            r32, k32, v32, kk32, a32, z = (t.float() for t in (r, k, v, kk, a, z))
        else:
            r32, k32, v32, kk32, a32 = r, k, v, kk, a
        decay = torch.exp(torch.sigmoid(z) * -math.exp(-0.5))
        S, S_new = wkv_in.view(B * H, N, N), wkv_out.view(B * H, N, N)
        s_kk = torch.bmm(S, kk32.view(B * H, N, 1))
        torch.mul(S, decay.view(B * H, 1, N), out=S_new)
        S_new.addcmul_(s_kk, (kk32 * a32).view(B * H, 1, N), value=-1.0)
        S_new.addcmul_(v32.view(B * H, N, 1), k32.view(B * H, 1, N))
        y = torch.bmm(S_new, r32.view(B * H, N, 1)).view(B, C).to(x.dtype)

        y = torch.group_norm(y, H, self.ln_x.weight, self.ln_x.bias, LN_X_EPS)
        bonus = (r * k * p["r_k"].view(C)).view(B, H, N).sum(-1, keepdim=True) * v.view(B, H, N)
        return F.linear((y + bonus.view(B, C)) * g, self.output.weight), v_first


class ChannelMix(nn.Module):
    """RWKV_CMix_x070: token shift, then relu(key(x))**2 -> value. Hidden size 4C."""

    def __init__(self, config: RWKV7Config, layer_id: int):
        super().__init__()
        C = config.n_embd
        self.x_k = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, config.dim_ffn, bias=False)
        self.value = nn.Linear(config.dim_ffn, C, bias=False)

    def forward(self, x, shift=None, resets=None):
        xx = _token_shift(x, shift, resets)
        k = torch.relu(self.key(x + xx * self.x_k))
        return linear_of(self.value, torch.square, k), x[:, -1].clone()  # value(k ** 2); a copy: see TimeMix

    def step(self, x, shift):
        """RNN mode for one token per row: x, shift (B, C). Under no_grad."""
        k = F.linear(torch.addcmul(x, shift - x, self.x_k.view(-1)), self.key.weight)
        return F.linear(torch.relu(k).square(), self.value.weight)


class Block(nn.Module):
    def __init__(self, config: RWKV7Config, layer_id: int):
        super().__init__()
        C = config.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)  # applied to the embedding, in layer 0 only
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(config, layer_id)
        self.ffn = ChannelMix(config, layer_id)

    def forward(self, x, v_first, s_att=None, s_wkv=None, s_ffn=None, backend="auto", resets=None,
                reset_state=None):
        if hasattr(self, "ln0"):
            x = self.ln0(x)
        dx, v_first, s_att, s_wkv = self.att(self.ln1(x), v_first, s_att, s_wkv, backend, resets, reset_state)
        x = x + dx
        dx, s_ffn = self.ffn(self.ln2(x), s_ffn, resets)
        return x + dx, v_first, s_att, s_wkv, s_ffn

    def step(self, x, v_first, state_in, state_out):
        """RNN mode: x (B, C) through this layer. state_in/state_out are this layer's
        (att_shift, wkv, ffn_shift) views; the new ones are written into state_out. Under no_grad."""
        C = x.shape[-1]
        if hasattr(self, "ln0"):
            x = F.layer_norm(x, (C,), self.ln0.weight, self.ln0.bias, self.ln0.eps)
        h = F.layer_norm(x, (C,), self.ln1.weight, self.ln1.bias, self.ln1.eps)
        dx, v_first = self.att.step(h, v_first, state_in[0], state_in[1], state_out[1])
        state_out[0].copy_(h)
        x = x + dx
        h = F.layer_norm(x, (C,), self.ln2.weight, self.ln2.bias, self.ln2.eps)
        state_out[2].copy_(h)
        return x + self.ffn.step(h, state_in[2]), v_first


class Head(nn.Linear):
    """The output projection (V x C, bias-free). `loss` scores hidden states through it without ever
    forming the logits. Under FSDP the head is a unit of its own whose weight stays sharded for `loss`
    (vocabulary-parallel, slicing.vocab_parallel; train/sharding.py)."""

    def loss(self, h: torch.Tensor, targets: torch.Tensor, num_items=None) -> torch.Tensor:
        from rwkvslice.slicing import sliced_cross_entropy

        return sliced_cross_entropy(h, self.weight, targets, num_items=num_items)


class RWKV7(nn.Module):
    initial_state: nn.Parameter | None  # registered in __init__ (see there)

    def __init__(self, config: RWKV7Config):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd)
        self.head = Head(config.n_embd, config.vocab_size, bias=False)
        # Activation checkpointing for training (a training choice, so not part of the config or
        # checkpoints): keep only each block's inputs and recompute its forward during backward, per
        # block and, with grad_checkpoint_len = n, per segment of n tokens (peak activations of one
        # block on n tokens instead of T).
        self.grad_checkpointing = False
        self.grad_checkpoint_len: int | None = None
        # State tuning (rwkvslice.peft.state): an optional (L, H, N, N) fp32 initial WKV state, used by
        # hidden_states / forward / loss whenever no state is passed and returned by init_state. None
        # means the zero state. A Parameter when set, so it trains, syncs under DDP and shards like any.
        self.register_parameter("initial_state", None)
        # rwkvslice.peft sets this while unmerged LoRA adapters are attached: Block.step and the fused
        # CPU kernels read the Linear weights directly, so RNN mode then runs GPT mode on T = 1.
        self.step_via_forward = False
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------------
    # The official initialisation (RWKV-LM train_temp: the module inits, then generate_init_weight).

    @torch.no_grad()
    def reset_parameters(self):
        cfg = self.config
        C, N, L, V = cfg.n_embd, cfg.head_size, cfg.n_layer, cfg.vocab_size
        n = torch.arange(C, dtype=torch.float64)
        ddd = (n / C).view(1, 1, C)
        linear = n / (C - 1) - 0.5 if C > 1 else n * 0
        zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2) if N > 1 else n * 0
        zigzag = zigzag * zigzag.abs()

        def ortho(p: torch.Tensor, scale: float):  # the LoRA init (ortho_init in RWKV_Tmix_x070)
            rows, cols = p.shape
            gain = scale * math.sqrt(rows / cols) if rows > cols else scale
            nn.init.orthogonal_(p, gain=gain)

        for layer_id, block in enumerate(self.blocks):
            att, ffn = block.att, block.ffn
            ratio_0_to_1 = layer_id / (L - 1) if L > 1 else 0.0
            ratio_1_to_almost0 = 1.0 - layer_id / L
            for name, p in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
                getattr(att, name).copy_(1.0 - ddd.pow(p * ratio_1_to_almost0))
            www = -6 + 6 * (n / max(C - 1, 1)).pow(1 + ratio_0_to_1**0.3)
            att.w0.copy_((www + 0.5 + zigzag * 2.5).view(1, 1, C))
            att.a0.copy_((-0.19 + zigzag * 0.3 + linear * 0.4).view(1, 1, C))
            att.k_k.copy_((0.71 - linear * 0.1).view(1, 1, C))
            att.k_a.fill_(1.02)
            att.r_k.fill_(-0.04)
            lora_pairs = [(att.w1, att.w2), (att.a1, att.a2), (att.g1, att.g2)]
            if layer_id > 0:
                att.v0.copy_((0.73 - linear * 0.4).view(1, 1, C))
                lora_pairs.append((att.v1, att.v2))
            for down, up in lora_pairs:
                down.zero_()
                ortho(up, 0.1)
            # generate_init_weight: orthogonal 2-D weights; zero for the output projections
            for lin, gain in ((att.receptance, 1.0), (att.key, 0.1), (att.value, 1.0), (ffn.key, 1.0)):
                nn.init.orthogonal_(lin.weight, gain=gain)
            att.output.weight.zero_()
            ffn.value.weight.zero_()
            att.ln_x.weight.fill_(((layer_id + 1) / L) ** 0.7)
            att.ln_x.bias.zero_()
            ffn.x_k.copy_(1.0 - ddd.pow(ratio_1_to_almost0**4))
            for ln in (block.ln1, block.ln2, getattr(block, "ln0", None)):
                if ln is not None:
                    ln.reset_parameters()
        self.ln_out.reset_parameters()
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        nn.init.orthogonal_(self.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)

    # ----------------------------------------------------------------------------------------------
    # Running the model.

    def init_state(self, batch_size: int, device=None) -> RWKV7State:
        cfg = self.config
        device = device or self.emb.weight.device
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        dtype = self.emb.weight.dtype
        s0 = self.initial_state
        wkv = (torch.zeros(L, batch_size, H, N, N, device=device, dtype=torch.float32) if s0 is None else
               s0.detach().to(device, torch.float32)[:, None].expand(L, batch_size, H, N, N).clone())
        return RWKV7State(
            att_shift=torch.zeros(L, batch_size, C, device=device, dtype=dtype),
            wkv=wkv,
            ffn_shift=torch.zeros(L, batch_size, C, device=device, dtype=dtype),
        )

    def initial_wkv_state(self) -> torch.Tensor | None:
        """The (L, H, N, N) fp32 WKV state a packed sample starts from at each reset: the tuned initial
        state when state tuning set one (`initial_state`, rwkvslice.peft), else None for zeros. So every
        packed sample starts from the tuned state, as it would alone, and its gradient sums over them."""
        return None if self.initial_state is None else self.initial_state.float()

    def hidden_states(self, idx: torch.Tensor, *, state: RWKV7State | None = None,
                      resets: torch.Tensor | None = None, backend: str = "auto"):
        """Hidden states after ln_out, (B, T, C), and the state after the sequence.

        resets: optional (B, T) bool; True where a new sample starts (packing). See the module docstring.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be (B, T), got shape {tuple(idx.shape)}")
        reset_states: list = [None] * len(self.blocks)
        if resets is not None:
            _check_resets(resets, idx)
            tuned = self.initial_wkv_state()
            if tuned is not None:
                reset_states = [tuned[i].expand(idx.shape[0], -1, -1, -1) for i in range(len(self.blocks))]
        x = self.emb(idx)
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        # Time segments: the whole sequence, or grad_checkpoint_len tokens when checkpointing, so that
        # backward recomputes one block on one segment at a time. The recurrent state carries the
        # sequence across segments exactly, as in RNN mode.
        T = x.shape[1]
        seg = (self.grad_checkpoint_len or T) if checkpointed else T
        layer_states: list[tuple] = [
            (None, None, None) if state is None else (state.att_shift[i], state.wkv[i], state.ffn_shift[i])
            for i in range(len(self.blocks))
        ]
        if state is None and self.initial_state is not None:  # tuned initial WKV state (differentiable)
            s0 = self.initial_state.float()
            layer_states = [(None, s0[i].expand(x.shape[0], *s0.shape[1:]), None) for i in range(len(self.blocks))]
        outputs = []
        for t0 in range(0, T, seg):
            h, v_first = x[:, t0 : t0 + seg], None
            seg_resets = None if resets is None else resets[:, t0 : t0 + seg]
            for i, block in enumerate(self.blocks):
                args = (h, v_first, *layer_states[i], backend)
                if resets is not None:  # only then, so that the plain path is the call it always was
                    args = (*args, seg_resets, reset_states[i])
                if checkpointed:  # keep only this block's inputs; recompute its forward in backward
                    h, v_first, *s = checkpoint(block, *args, use_reentrant=False)
                else:
                    h, v_first, *s = block(*args)
                layer_states[i] = tuple(s)
            outputs.append(h)
        x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        new_state = RWKV7State(*(torch.stack(field) for field in zip(*layer_states, strict=True)))
        return self.ln_out(x), new_state

    def forward(self, idx, *, state=None, positions=None, return_state=False, backend="auto", resets=None):
        """Logits (B, T, V); with positions="last" (B, 1, V); with a (B, K) index tensor (B, K, V).

        Only the rows asked for go through the head (inference-side slicing). resets: see hidden_states.
        """
        h, new_state = self.hidden_states(idx, state=state, resets=resets, backend=backend)
        if positions is not None:
            if isinstance(positions, str):
                if positions != "last":
                    raise ValueError(f"positions must be None, 'last' or a (B, K) tensor, got {positions!r}")
                h = h[:, -1:]
            else:
                positions = positions.to(h.device)
                if positions.dim() != 2 or positions.shape[0] != h.shape[0]:
                    raise ValueError(f"positions must be (B, K), got shape {tuple(positions.shape)}")
                h = torch.gather(h, 1, positions[..., None].expand(-1, -1, h.shape[-1]))
        logits = self.head(h)
        return (logits, new_state) if return_state else logits

    def step(self, tokens: torch.Tensor, state: RWKV7State):
        """RNN mode: one token per sequence. tokens (B,) -> logits (B, V) and the next state.

        `state` is never modified. Under torch.no_grad / inference_mode (generation) each layer runs
        Block.step, the same maths on (B, C) rows in few ops; an fp32 CPU model runs each layer as one
        C++ call instead (ops/rnn_step_cpu.py, Block.step being its reference). With gradients enabled
        it runs GPT mode on T = 1, which is differentiable and gives the same values.
        """
        if torch.is_grad_enabled() or self.step_via_forward:
            h, state = self.hidden_states(tokens.view(-1, 1), state=state)
            return self.head(h[:, 0]), state
        x = self.emb(tokens.view(-1))
        parts = (state.att_shift, state.wkv, state.ffn_shift)
        if (state.att_shift.dtype != x.dtype or state.ffn_shift.dtype != x.dtype or state.wkv.dtype != torch.float32
                or not all(t.is_contiguous() for t in parts)):  # a state saved in fp32, a strided batch slice
            state = RWKV7State(state.att_shift.to(x.dtype).contiguous(), state.wkv.float().contiguous(),
                               state.ffn_shift.to(x.dtype).contiguous())
        new_state = RWKV7State(*(torch.empty_like(t) for t in (state.att_shift, state.wkv, state.ffn_shift)))
        layers_in = zip(state.att_shift.unbind(0), state.wkv.unbind(0), state.ffn_shift.unbind(0), strict=True)
        layers_out = zip(*(t.unbind(0) for t in (new_state.att_shift, new_state.wkv, new_state.ffn_shift)), strict=True)
        v_first = None
        lib = rnn_step_cpu.kernels() if self._fused_step_ok(x, state) else None
        if lib is not None:  # one fused C++ call per layer (ops/rnn_step_cpu.py); Block.step is its reference
            B, C = x.shape
            v_first, *pingpong = x.new_empty(5, B, C)  # layer i writes (x, dx) pair i % 2, unadded
            dx = None
            for i, (block, s_in, s_out) in enumerate(zip(self.blocks, layers_in, layers_out, strict=True)):
                if hasattr(block, "ln0"):
                    x = cast(Block, block).ln0(x)
                x_out, dx_out = pingpong[2 * (i % 2)], pingpong[2 * (i % 2) + 1]
                rnn_step_cpu.step_layer(lib, block, x, dx, v_first, s_in, s_out, x_out, dx_out)
                x, dx = x_out, dx_out
            x = x + dx
        else:
            for block, s_in, s_out in zip(self.blocks, layers_in, layers_out, strict=True):
                x, v_first = cast(Block, block).step(x, v_first, s_in, s_out)
        # Generation is bound by reading the head (V x C) once per token; a GEMM with the weight stored
        # (C, V) row-major reads it faster on CPU than F.linear's transposed (V, C) operand.
        return self.ln_out(x) @ self._head_transposed(), new_state

    def _fused_step_ok(self, x: torch.Tensor, state: RWKV7State) -> bool:
        """The fused CPU kernels take fp32 CPU models and states (contiguous) with head size <= 256."""
        w = self.head.weight
        return (
            x.device.type == "cpu"
            and x.dtype == w.dtype == torch.float32
            and self.config.head_size <= 256
            and rnn_step_cpu.usable(state.att_shift, state.wkv, state.ffn_shift)
        )

    def _head_transposed(self) -> torch.Tensor:
        """A cached (C, V) contiguous copy of the head weight, rebuilt whenever the weight changes."""
        w = self.head.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if getattr(self, "_head_t_key", None) != key:
            self._head_t = w.detach().t().contiguous()
            self._head_t_key = key
        return self._head_t

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, *, resets=None, num_items=None) -> torch.Tensor:
        """Cross-entropy where targets != -100, computed on those positions only (physical slicing).

        targets[b, t] is the token that should follow idx[b, t]. Returns sum / (num_items or N kept).
        resets: (B, T) bool, True where a packed sample starts (see hidden_states).
        """
        if targets.shape != idx.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must have the shape of idx {tuple(idx.shape)}")
        h, _ = self.hidden_states(idx, resets=resets)
        return self.head.loss(h, targets, num_items=num_items)

    # ----------------------------------------------------------------------------------------------
    # Checkpoints.

    @classmethod
    def from_official(cls, path: str | Path) -> RWKV7:
        """Load an official x070 `.pth` (RWKV-LM / the `rwkv` package layout). See model/official.py."""
        from rwkvslice.model.official import load_official

        return load_official(path, cls)

    def save_official(self, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        """Write a `.pth` the official `rwkv` package loads and runs."""
        from rwkvslice.model.official import save_official

        save_official(self, path, dtype=dtype)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `directory/rwkvslice_model.safetensors` and `directory/rwkvslice_config.json` (each atomically).
        Our own layout (official names); `save_hf` writes the Hugging Face one."""
        from rwkvslice.model.official import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location="cpu") -> RWKV7:
        """Load a `save_pretrained` directory (this or an earlier version's) or an HF-layout one."""
        from rwkvslice.model.official import load_pretrained

        return load_pretrained(directory, cls, map_location=map_location)

    def save_hf(self, directory: str | Path, dtype: torch.dtype = torch.float32, tokenizer: str | None = None) -> None:
        """Write the Hugging Face layout rwkv7-hf loads (config.json + model.safetensors), atomically;
        tokenizer="world" adds its tokenizer files. Head size 64 only. See model/hf.py."""
        from rwkvslice.model.hf import save_hf

        save_hf(self, directory, dtype=dtype, tokenizer=tokenizer)

    @classmethod
    def from_hf(cls, directory: str | Path, map_location="cpu") -> RWKV7:
        """Load an HF-layout directory (rwkv7-hf's converter, fla-hub, `save_hf`). See model/hf.py."""
        from rwkvslice.model.hf import load_hf

        return load_hf(directory, cls, map_location=map_location)
