"""The fused CPU generation kernel (ops/rnn_step_cpu.py, cuda/rnn_step_host.cpp): one layer against an fp64
reference written here from the x070 formulas, and model.step through it against the eager step.

Tolerances: the layer against fp64, max abs error / max |reference| < 1e-5 per output (fp32 GEMVs over up
to 4C = 512 terms; measured 7.9e-7 at worst). Fused model.step against the eager step over 40 tokens: relative 1e-5
on logits and states (measured ~1e-6; the two round differently, e.g. kk / norm vs kk * (1 / norm)).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.cuda import build
from rwkvslice.ops import rnn_step_cpu

pytestmark = pytest.mark.component("Generation")

KERNEL_REL = 1e-5
STEP_REL = 1e-5


@pytest.fixture(scope="module")
def lib():
    lib = rnn_step_cpu.kernels()
    # a C++ compiler is part of the CI image, and torch's x86 wheels export MKL's sgemm_
    assert lib is not None and rnn_step_cpu.torch_sgemm() is not None, "the fused kernels must run here"
    return lib


def rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def ln64(x, w, b, eps):
    x, w, b = x.double(), w.double(), b.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


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


def layer_reference(block, x, dx, v_first, att_prev, wkv_prev, ffn_prev):
    """One block in RNN mode, fp64, from the formulas (not from the model's code)."""
    att, ffn = block.att, block.ffn
    P = {n: t.detach().double() for n, t in att.named_parameters()}
    f64 = lambda t: t.detach().double()  # noqa: E731
    x = f64(x) + (0 if dx is None else f64(dx))
    h = ln64(x, block.ln1.weight, block.ln1.bias, block.ln1.eps)
    xr, xw, xk, xv, xa, xg = (h + (f64(att_prev) - h) * P[f"x_{c}"].view(-1) for c in "rwkvag")
    r, k, v = xr @ P["receptance.weight"].T, xk @ P["key.weight"].T, xv @ P["value.weight"].T
    z = P["w0"].view(-1) + torch.tanh(xw @ P["w1"]) @ P["w2"]
    az = P["a0"].view(-1) + (xa @ P["a1"]) @ P["a2"]
    g = torch.sigmoid(xg @ P["g1"]) @ P["g2"]
    if att.layer_id == 0:
        v_first, vz = v, None
    else:
        vz = P["v0"].view(-1) + (xv @ P["v1"]) @ P["v2"]
    gated, S = wkv_reference(r, z, k, v, v_first, vz, az, g, P["k_k"], P["k_a"], P["r_k"], P["ln_x.weight"],
                             P["ln_x.bias"], att.ln_x.eps, wkv_prev)
    x2 = x + gated @ P["output.weight"].T
    h2 = ln64(x2, block.ln2.weight, block.ln2.bias, block.ln2.eps)
    xk2 = h2 + (f64(ffn_prev) - h2) * f64(ffn.x_k).view(-1)
    dx2 = torch.relu(xk2 @ f64(ffn.key.weight).T) ** 2 @ f64(ffn.value.weight).T
    return {"x_out": x2, "dx_out": dx2, "att": h, "wkv": S, "ffn": h2, "v_first": v_first}


def _layer_case(B, H, N, layer, seed):
    torch.manual_seed(seed)
    m = RWKV7(RWKV7Config(vocab_size=16, n_embd=H * N, n_layer=2, head_size=N))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    g = torch.Generator().manual_seed(seed + 1)
    C = H * N
    x, dx, v_first, att_prev, ffn_prev = (torch.randn(B, C, generator=g) for _ in range(5))
    wkv_prev = torch.randn(B, H, N, N, generator=g)
    return m.blocks[layer], x, dx, v_first, att_prev, wkv_prev, ffn_prev


@pytest.mark.parametrize("B, H, N, layer, with_dx", [
    (1, 2, 16, 0, False), (2, 2, 64, 1, True), (3, 4, 8, 1, False), (1, 1, 32, 0, True),
])
def test_layer_matches_fp64(lib, B, H, N, layer, with_dx):
    block, x, dx, v_first, att_prev, wkv_prev, ffn_prev = _layer_case(B, H, N, layer, seed=10 * B + N)
    dx = dx if with_dx else None
    C = H * N
    outs = {name: torch.full((B, C), float("nan")) for name in ("x_out", "dx_out", "att", "ffn")}
    outs["wkv"] = torch.full((B, H, N, N), float("nan"))
    vf = v_first.clone()
    inputs = [t.clone() for t in (x, att_prev, wkv_prev, ffn_prev)]
    with torch.no_grad():
        rnn_step_cpu.step_layer(lib, block, x, dx, vf, (att_prev, wkv_prev, ffn_prev),
                                (outs["att"], outs["wkv"], outs["ffn"]), outs["x_out"], outs["dx_out"])
    ref = layer_reference(block, x, dx, v_first, att_prev, wkv_prev, ffn_prev)
    for name, got in outs.items():
        assert rel(got, ref[name]) < KERNEL_REL, name
    # layer 0 defines v_first (its own values); later layers only read it
    assert rel(vf, ref["v_first"]) < KERNEL_REL if layer == 0 else torch.equal(vf, v_first)
    for before, now in zip(inputs, (x, att_prev, wkv_prev, ffn_prev), strict=True):
        assert torch.equal(before, now)  # inputs are read, never written


def test_layer_refuses_what_it_cannot_run(lib):
    block, x, dx, v_first, att_prev, wkv_prev, ffn_prev = _layer_case(1, 2, 16, 1, seed=3)
    outs = [torch.empty(1, 32) for _ in range(2)]
    states_out = (torch.empty(1, 32), torch.empty(1, 2, 16, 16), torch.empty(1, 32))
    args = (x, dx, v_first, (att_prev, wkv_prev, ffn_prev), states_out, *outs)
    block.att.x_r.data = block.att.x_r.data.double()
    with pytest.raises(ValueError, match=r"parameters \[4\] of the layer are not contiguous fp32"):
        rnn_step_cpu.step_layer(lib, block, *args)
    block.att.x_r.data = block.att.x_r.data.float()
    lib.rwkvslice_step_set_sgemm(None)
    try:
        with pytest.raises(RuntimeError, match="no BLAS sgemm"):
            rnn_step_cpu.step_layer(lib, block, *args)
    finally:
        lib.rwkvslice_step_set_sgemm(rnn_step_cpu.torch_sgemm())
    big = RWKV7(RWKV7Config(vocab_size=16, n_embd=512, n_layer=1, head_size=512)).blocks[0]
    x5 = torch.zeros(1, 512)
    with pytest.raises(ValueError, match="head size 512 > 256"):
        rnn_step_cpu.step_layer(lib, big, x5, None, x5.clone(), (x5, torch.zeros(1, 1, 512, 512), x5),
                                (x5.clone(), torch.zeros(1, 1, 512, 512), x5.clone()), x5.clone(), x5.clone())


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
    real = rnn_step_cpu.step_layer
    monkeypatch.setattr(rnn_step_cpu, "step_layer", lambda *a: calls.append(1) or real(*a))
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


def test_a_blas_that_disagrees_with_torch_is_not_used(model, monkeypatch):
    """The loader probes the sgemm_ it found against torch: a wrong one (here: a random other function's
    address would crash, so the probe's result is faked) means eager generation with one warning."""
    monkeypatch.setattr(rnn_step_cpu, "_blas_agrees", lambda lib: False)
    rnn_step_cpu.kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match="disagrees with torch on a probe; using eager ops"):
            assert rnn_step_cpu.kernels() is None
    finally:
        rnn_step_cpu.kernels.cache_clear()
    monkeypatch.undo()
    assert rnn_step_cpu._blas_agrees(rnn_step_cpu.kernels())  # the real sgemm_ passes the probe


def test_without_a_blas_sgemm_generation_runs_eager(model, monkeypatch):
    monkeypatch.setattr(rnn_step_cpu, "torch_sgemm", lambda: None)
    rnn_step_cpu.kernels.cache_clear()
    try:
        assert rnn_step_cpu.kernels() is None
        logits, _ = _run(model, torch.tensor([[5, 6]]), model.init_state(1))
        assert logits.shape == (1, 2, 97) and torch.isfinite(logits).all()
    finally:
        rnn_step_cpu.kernels.cache_clear()


def test_the_library_builds_into_the_cache_from_its_own_source(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKVSLICE_BUILD_DIR", str(tmp_path))
    build.load_rnn_step_library.cache_clear()
    try:
        lib = build.load_rnn_step_library()
        assert [p.name.split("-")[0] for p in tmp_path.glob("*.so")] == ["rnn_step_host"]
        assert lib.rwkvslice_step_n_params() == rnn_step_cpu.N_PARAMS == 33
    finally:
        build.load_rnn_step_library.cache_clear()
