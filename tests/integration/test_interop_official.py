"""Interop with the official `rwkv` pip package (ChatRWKV), the independent reference for x070.

Random checkpoints are built here from the documented official key table (not from our model), saved as
official `.pth` files, then run by the `rwkv` package (strategy "cpu fp32") and by rwkvslice:
full-sequence logits, token-by-token RNN logits and final states must agree, and a file written by
our `save_official` must load and agree there too.

Tolerance: RMS-relative error < 1e-5 (fp32 both sides; the package computes the decay as
exp(-0.606531 * sigmoid(z)), which differs from exp(-exp(-softplus(-z) - 0.5)) by ~1e-7 relative).
"""

from __future__ import annotations

import os

import pytest
import torch

from rwkvslice import RWKV7

pytestmark = pytest.mark.interop

TOL = 1e-5


def rms_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


@pytest.fixture(scope="module")
def RWKV():
    os.environ["RWKV_V7_ON"] = "1"  # must be set before rwkv.model is imported
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    model_mod = pytest.importorskip("rwkv.model", reason="the official `rwkv` package is not installed")
    return model_mod.RWKV


def official_state_dict(V, C, L, N, ranks, *, layer0_v, dtype=torch.float32, seed=0):
    """A random checkpoint in the official x070 layout, from the documented key/shape table."""
    g = torch.Generator().manual_seed(seed)
    H = C // N
    d_w, d_a, d_v, d_g = ranks

    def rnd(*shape, scale=0.3, offset=0.0):
        return (torch.randn(*shape, generator=g) * scale + offset).to(dtype)

    sd = {"emb.weight": rnd(V, C, scale=1.0)}
    sd["blocks.0.ln0.weight"], sd["blocks.0.ln0.bias"] = rnd(C, offset=1.0, scale=0.1), rnd(C, scale=0.1)
    for i in range(L):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = rnd(C, offset=1.0, scale=0.1), rnd(C, scale=0.1)
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[p + "att." + name] = rnd(1, 1, C, scale=0.2, offset=0.5)
        sd[p + "att.w0"] = rnd(1, 1, C, scale=1.0, offset=-2.0)
        sd[p + "att.a0"] = rnd(1, 1, C, scale=0.5)
        sd[p + "att.k_k"] = rnd(1, 1, C, scale=0.1, offset=0.7)
        sd[p + "att.k_a"] = rnd(1, 1, C, scale=0.1, offset=1.0)
        sd[p + "att.r_k"] = rnd(H, N, scale=0.3)
        lora = [("w", d_w), ("a", d_a), ("g", d_g)]
        if i > 0 or layer0_v:
            lora.append(("v", d_v))
            sd[p + "att.v0"] = rnd(1, 1, C, scale=0.5)
        for name, d in lora:
            sd[p + f"att.{name}1"] = rnd(C, d, scale=C**-0.5)
            sd[p + f"att.{name}2"] = rnd(d, C, scale=d**-0.5)
        for lin in ("receptance", "key", "value", "output"):
            sd[p + f"att.{lin}.weight"] = rnd(C, C, scale=C**-0.5)
        sd[p + "att.ln_x.weight"], sd[p + "att.ln_x.bias"] = rnd(C, offset=1.0, scale=0.1), rnd(C, scale=0.1)
        sd[p + "ffn.x_k"] = rnd(1, 1, C, scale=0.2, offset=0.5)
        sd[p + "ffn.key.weight"] = rnd(4 * C, C, scale=C**-0.5)
        sd[p + "ffn.value.weight"] = rnd(C, 4 * C, scale=(4 * C) ** -0.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = rnd(C, offset=1.0, scale=0.1), rnd(C, scale=0.1)
    sd["head.weight"] = rnd(V, C, scale=C**-0.5)
    return sd


CASES = [
    # (V, C, L, N, (d_decay, d_aaa, d_mv, d_gate), layer-0 v0/v1/v2 present, file dtype)
    pytest.param(320, 128, 2, 64, (32, 32, 32, 64), True, torch.float32, id="ranks-a-with-v0-fp32"),
    pytest.param(257, 128, 3, 32, (64, 48, 16, 96), False, torch.float32, id="ranks-b-no-v0-fp32"),
    pytest.param(300, 128, 2, 64, (32, 64, 32, 32), False, torch.bfloat16, id="ranks-c-no-v0-bf16"),
]


@pytest.mark.parametrize("V,C,L,N,ranks,layer0_v,dtype", CASES)
def test_official_checkpoint_matches_rwkv_package(RWKV, tmp_path, V, C, L, N, ranks, layer0_v, dtype):
    sd = official_state_dict(V, C, L, N, ranks, layer0_v=layer0_v, dtype=dtype)
    torch.save(sd, tmp_path / "official.pth")
    ref = RWKV(str(tmp_path / "official"), strategy="cpu fp32")  # the package appends ".pth"

    ours = RWKV7.from_official(tmp_path / "official.pth")
    cfg = ours.config
    assert (cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.head_size) == (V, C, L, N)
    assert (cfg.d_decay, cfg.d_aaa, cfg.d_mv, cfg.d_gate) == ranks
    assert all(p.requires_grad for p in ours.parameters())

    tokens = torch.randint(0, V, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref_logits, _ = ref.forward(tokens, None, full_output=True)
        gpt = ours(torch.tensor([tokens]), backend="reference")[0]
        assert rms_rel(gpt, ref_logits) < TOL
        gpt_torch = ours(torch.tensor([tokens]), backend="torch")[0]
        assert rms_rel(gpt_torch, ref_logits) < TOL

        # token by token: logits at every step and the final states
        ref_state, state = None, ours.init_state(1)
        for t in tokens:
            ref_out, ref_state = ref.forward([t], ref_state)
            out, state = ours.step(torch.tensor([t]), state)
            assert rms_rel(out[0], ref_out) < TOL
        for i in range(L):
            assert rms_rel(state.att_shift[i, 0], ref_state[3 * i]) < TOL
            assert rms_rel(state.wkv[i, 0], ref_state[3 * i + 1]) < TOL  # same [value][key] layout
            assert rms_rel(state.ffn_shift[i, 0], ref_state[3 * i + 2]) < TOL


def test_save_official_loads_and_matches_in_rwkv_package(RWKV, tmp_path):
    sd = official_state_dict(288, 128, 2, 64, (32, 32, 32, 64), layer0_v=False, seed=3)
    torch.save(sd, tmp_path / "src.pth")
    ours = RWKV7.from_official(tmp_path / "src.pth")
    with torch.no_grad():  # move away from the loaded values so the test sees what *we* wrote
        for p in ours.parameters():
            p.mul_(1.05)
    ours.save_official(tmp_path / "ours.pth")
    ref = RWKV(str(tmp_path / "ours"), strategy="cpu fp32")
    tokens = list(range(1, 30))
    with torch.no_grad():
        ref_logits, _ = ref.forward(tokens, None, full_output=True)
        gpt = ours(torch.tensor([tokens]))[0]
    assert rms_rel(gpt, ref_logits) < TOL
    # and it round-trips through our own loader bit for bit
    again = RWKV7.from_official(tmp_path / "ours.pth")
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
