"""The fused CPU generation kernels (ops/rnn_step_cpu.py, cuda/rnn_step_host.cpp), op by op against fp64
references written here from the formulas, and model.step through them against the eager step.

Tolerances: each kernel against fp64, max abs error / max |reference| < 2e-6 (fp32 arithmetic on O(1)
values; measured ~3e-7). Fused model.step against the eager step over 40 tokens: relative 1e-5 on logits
and states (measured ~1e-6; the two round differently, e.g. kk / norm vs kk * (1 / norm)).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.cuda import build
from rwkvslice.ops import rnn_step_cpu

pytestmark = pytest.mark.component("Generation")

KERNEL_REL = 2e-6
STEP_REL = 1e-5


@pytest.fixture(scope="module")
def lib():
    lib = rnn_step_cpu.kernels()
    assert lib is not None, "the fused kernels must build here (a C++ compiler is part of the CI image)"
    return lib


def rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def ln64(x, w, b, eps):
    x, w, b = x.double(), w.double(), b.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


@pytest.mark.parametrize("with_dx", [False, True])
def test_att_in_matches_fp64(lib, with_dx):
    g = torch.Generator().manual_seed(0)
    B, C = 3, 96
    x, dx, prev = (torch.randn(B, C, generator=g) for _ in range(3))
    w, b = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    mixes = [torch.rand(1, 1, C, generator=g) for _ in range(6)]
    x_out, shift, xs = torch.empty(B, C), torch.empty(B, C), torch.empty(6, B, C)
    rnn_step_cpu.att_in(lib, x, dx if with_dx else None, x_out, w, b, 1e-5, prev, mixes, shift, xs)

    x_ref = x.double() + (dx.double() if with_dx else 0)
    h = ln64(x_ref, w, b, 1e-5)
    assert rel(x_out, x_ref) < KERNEL_REL and rel(shift, h) < KERNEL_REL
    for j, m in enumerate(mixes):
        assert rel(xs[j], h + (prev.double() - h) * m.view(C).double()) < KERNEL_REL, j


def wkv_reference(r, z, k, v, v_first, vz, az, g, k_k, k_a, r_k, lnx_w, lnx_b, eps, S):
    """The time mix's WKV part in fp64, straight from the x070 formulas, one (row, head) at a time."""
    r, z, k, v, v_first, az, g = (t.double() for t in (r, z, k, v, v_first, az, g))
    B, H, N, _ = S.shape
    S = S.double().clone()
    out = torch.empty(B, H * N, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            sl = slice(h * N, (h + 1) * N)
            a = torch.sigmoid(az[b, sl])
            vv = v[b, sl] if vz is None else v[b, sl] + torch.sigmoid(vz[b, sl].double()) * (v_first[b, sl] - v[b, sl])
            kk = k[b, sl] * k_k.view(-1)[sl].double()
            kk = kk / kk.norm().clamp_min(1e-12)
            kx = k[b, sl] * (1 + (a - 1) * k_a.view(-1)[sl].double())
            w = -torch.nn.functional.softplus(-z[b, sl]) - 0.5  # the model's decay parameter
            decay = torch.exp(-torch.exp(w))
            Sb = S[b, h]
            Sb = Sb * decay[None, :] - torch.outer(Sb @ kk, kk * a) + torch.outer(vv, kx)
            S[b, h] = Sb
            y = Sb @ r[b, sl]
            yn = (y - y.mean()) / torch.sqrt(y.var(unbiased=False) + eps) * lnx_w[sl].double() + lnx_b[sl].double()
            bonus = (r[b, sl] * kx * r_k.view(-1)[sl].double()).sum()
            out[b, sl] = (yn + bonus * vv) * g[b, sl]
    return out, S


@pytest.mark.parametrize("B, H, N, layer0", [(1, 2, 16, True), (2, 3, 64, False), (2, 1, 8, False)])
def test_att_wkv_matches_fp64(lib, B, H, N, layer0):
    g = torch.Generator().manual_seed(1)
    C = H * N
    r, z, k, v, v_first, vz, az, gate = (torch.randn(B, C, generator=g) for _ in range(8))
    k_k, k_a = torch.rand(1, 1, C, generator=g) + 0.5, torch.rand(1, 1, C, generator=g)
    r_k, lnx_w, lnx_b = torch.randn(H, N, generator=g), torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    S = torch.randn(B, H, N, N, generator=g)
    S_before = S.clone()
    S_out, out = torch.empty_like(S), torch.empty(B, C)
    vz_arg = None if layer0 else vz
    rnn_step_cpu.att_wkv(lib, r, z, k, v, v if layer0 else v_first, vz_arg, az, gate, k_k, k_a, r_k, lnx_w, lnx_b,
                         64e-5, S, S_out, out)
    ref_out, ref_S = wkv_reference(r, z, k, v, v if layer0 else v_first, vz_arg, az, gate, k_k, k_a, r_k,
                                   lnx_w, lnx_b, 64e-5, S)
    assert rel(S_out, ref_S) < KERNEL_REL and rel(out, ref_out) < KERNEL_REL
    assert torch.equal(S, S_before)  # reads S_in, writes only S_out


def test_ffn_in_and_relu_square_match_fp64(lib):
    g = torch.Generator().manual_seed(2)
    B, C = 2, 80
    x, dx, prev = (torch.randn(B, C, generator=g) for _ in range(3))
    w, b, x_k = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g), torch.rand(1, 1, C, generator=g)
    x_out, shift, xk = torch.empty(B, C), torch.empty(B, C), torch.empty(B, C)
    rnn_step_cpu.ffn_in(lib, x, dx, x_out, w, b, 1e-5, prev, x_k, shift, xk)
    h = ln64(x.double() + dx.double(), w, b, 1e-5)
    assert rel(x_out, x.double() + dx.double()) < KERNEL_REL and rel(shift, h) < KERNEL_REL
    assert rel(xk, h + (prev.double() - h) * x_k.view(C).double()) < KERNEL_REL

    t = torch.randn(5, 33, generator=g)
    expected = torch.relu(t.double()) ** 2
    assert rnn_step_cpu.relu_square_(lib, t) is t and rel(t, expected) < KERNEL_REL


def test_converted_inputs_and_bad_outputs(lib):
    """A non-contiguous or non-fp32 input is converted (and kept alive across the call); an output the
    kernel cannot write in place is refused; a head size over 256 is refused before the C call."""
    g = torch.Generator().manual_seed(3)
    B, C = 2, 32
    x = torch.randn(C, B, generator=g).t()  # non-contiguous
    prev = torch.randn(B, C, generator=g).double()  # fp64
    w, b = torch.ones(C), torch.zeros(C)
    mixes = [torch.full((1, 1, C), 0.25)] * 6
    x_out, shift, xs = torch.empty(B, C), torch.empty(B, C), torch.empty(6, B, C)
    rnn_step_cpu.att_in(lib, x, None, x_out, w, b, 1e-5, prev, mixes, shift, xs)
    h = ln64(x, w, b, 1e-5)
    assert rel(shift, h) < KERNEL_REL and rel(xs[0], h + (prev - h) * 0.25) < KERNEL_REL
    with pytest.raises(ValueError, match="outputs must be contiguous fp32"):
        rnn_step_cpu.att_in(lib, x, None, x_out, w, b, 1e-5, prev, mixes, torch.empty(C, B).t(), xs)
    S = torch.zeros(1, 1, 257, 257)
    v = torch.zeros(1, 257)
    with pytest.raises(ValueError, match="head size 257 > 256"):
        rnn_step_cpu.att_wkv(lib, *(v,) * 8, *(v,) * 5, 64e-5, S, S.clone(), v.clone())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = RWKV7(RWKV7Config(vocab_size=97, n_embd=128, n_layer=3, head_size=32)).eval()
    with torch.no_grad():  # the official init zeroes output projections; make every layer matter
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def _random_state(model, B, seed):
    g = torch.Generator().manual_seed(seed)
    state = model.init_state(B)
    for t in (state.att_shift, state.wkv, state.ffn_shift):
        t.copy_(torch.randn(t.shape, generator=g))
    return state


def _run(model, tokens, state):
    outs = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            logits, state = model.step(tokens[:, t], state)
            outs.append(logits)
    return torch.stack(outs, 1), state


def test_model_step_fused_equals_eager_step(model, monkeypatch):
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(4))
    start = _random_state(model, 2, seed=5)
    snapshot = [t.clone() for t in (start.att_shift, start.wkv, start.ffn_shift)]

    calls = []
    real = type(model.blocks[0]).step_fused
    monkeypatch.setattr(type(model.blocks[0]), "step_fused", lambda *a: calls.append(1) or real(*a))
    fused_logits, fused_state = _run(model, tokens, start)
    assert len(calls) == 40 * 3  # every layer of every token went through the kernels
    monkeypatch.setattr(rnn_step_cpu, "kernels", lambda: None)  # the eager step() path
    eager_logits, eager_state = _run(model, tokens, start)
    assert len(calls) == 120

    assert rel(fused_logits, eager_logits) < STEP_REL
    for name in ("att_shift", "wkv", "ffn_shift"):
        assert rel(getattr(fused_state, name), getattr(eager_state, name)) < STEP_REL, name
    for before, now in zip(snapshot, (start.att_shift, start.wkv, start.ffn_shift), strict=True):
        assert torch.equal(before, now)  # the caller's state is never modified


def test_bf16_models_skip_the_kernels_and_strided_states_are_fine(model, monkeypatch):
    used = []
    real = rnn_step_cpu.kernels
    monkeypatch.setattr(rnn_step_cpu, "kernels", lambda: used.append(1) or real())
    bf16 = RWKV7(model.config).to(torch.bfloat16).eval()
    with torch.no_grad():
        bf16.step(torch.tensor([1]), bf16.init_state(1))
    assert used == []  # a bf16 model runs the eager step
    # a strided batch slice of a state (e.g. rows 0 and 2 of three) works in both paths and equals its copy
    state = _random_state(model, 3, seed=6)
    odd = type(state)(state.att_shift[:, ::2], state.wkv[:, ::2], state.ffn_shift[:, ::2])
    dense = type(state)(*(t[:, ::2].contiguous() for t in (state.att_shift, state.wkv, state.ffn_shift)))
    with torch.no_grad():
        fused, _ = model.step(torch.tensor([1, 2]), odd)
        monkeypatch.setattr(rnn_step_cpu, "kernels", lambda: None)
        eager, _ = model.step(torch.tensor([1, 2]), odd)
        reference, _ = model.step(torch.tensor([1, 2]), dense)
    assert used == [1] and torch.equal(eager, reference) and rel(fused, eager) < STEP_REL


def test_build_failure_warns_once_and_falls_back(model, monkeypatch):
    def broken():
        raise build.KernelBuildError("cannot build the fused CPU generation kernels: no C++ compiler")

    monkeypatch.setattr(rnn_step_cpu, "load_rnn_step_library", broken)
    rnn_step_cpu.kernels.cache_clear()
    try:
        tokens = torch.tensor([[3, 4, 5]])
        with pytest.warns(UserWarning, match="fused CPU generation kernels unavailable, using eager ops") as w:
            logits, _ = _run(model, tokens, model.init_state(1))
        assert len(w) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            again, _ = _run(model, tokens, model.init_state(1))
        assert torch.equal(logits, again)
        monkeypatch.setenv(rnn_step_cpu.ENV_SWITCH, "0")
        rnn_step_cpu.kernels.cache_clear()
        assert rnn_step_cpu.kernels() is None
    finally:
        rnn_step_cpu.kernels.cache_clear()


def test_the_library_builds_into_the_cache_from_its_own_source(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKVSLICE_BUILD_DIR", str(tmp_path))
    build.load_rnn_step_library.cache_clear()
    try:
        lib = build.load_rnn_step_library()
        assert [p.name.split("-")[0] for p in tmp_path.glob("*.so")] == ["rnn_step_host"]
        assert lib.rwkvslice_step_relu_square(0, None) == 0
    finally:
        build.load_rnn_step_library.cache_clear()
