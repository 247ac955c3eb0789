"""backend="host": the CUDA kernel's own arithmetic (cuda/wkv7_core.cuh built by the C++ compiler) against
the fp64 reference loop, for y, the final state and the gradients of r, w, k, v, a, b and the initial state.

Tolerance: relative norm error < 1e-5 (fp32 arithmetic; the backstepping backward measures ~3e-6 on the
gradients of r, w and a with the model's decay range, ~2e-7 elsewhere). With resets (packed sequences), against
an fp64 loop written from the definition, all 8 gradients including reset_state's: worst measured 1.9e-6 (dw).
The drivers' phase order: every pair of adjacent phases merged (a missing __syncthreads on the GPU) fails these
checks. Also no-grad forwards skip the backward's buffers, and the build cache: built once, reused, safe under
concurrent builds, and one-line errors when the compiler is missing or fails.
"""

from __future__ import annotations

import ctypes
import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rwkvslice.cuda import build
from rwkvslice.errors import ConfigError, RWKVSliceError
from rwkvslice.ops import wkv7
from rwkvslice.ops import wkv7_cuda as wkv7_cuda_module
from rwkvslice.ops.wkv7_cuda import CHUNK_LEN, wkv7_host
from rwkvslice.ops.wkv7_reference import wkv7_reference

NAMES = ("r", "w", "k", "v", "a", "b", "state")
FP32_REL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The fp64 reference loop runs thousands of tiny ops; with intra-op threads on a busy CPU each op pays
    thread wake-ups (measured 100x slower at 2 threads under load). One thread keeps this file fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_inputs(B, T, H, N, *, seed=0, w_value=None):
    """Model-like inputs: decay = exp(-exp(w)) in (0.545, 1), a = -kk, b = kk * iclr, kk unit-norm."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    w = -F.softplus(-randn(B, T, H, N)) - 0.5 if w_value is None else torch.full((B, T, H, N), w_value)
    kk = F.normalize(randn(B, T, H, N), dim=-1)
    iclr = torch.sigmoid(randn(B, T, H, N))
    state = randn(B, H, N, N)
    return [r, w, k, v, -kk, kk * iclr, state], (randn(B, T, H, N), randn(B, H, N, N))


def rel_err(got, want):
    """Relative norm error; against an all-zero reference (a gradient a reset cuts off), the absolute norm."""
    diff = (got.double() - want).norm()
    return (diff / want.norm() if want.any() else diff).item()


def run_both(inputs, upstream, *, with_state=True):
    """(y, final state, grads) from backend="host" and from the fp64 reference, same inputs and upstream."""
    gy, gs = upstream
    xs = [x.clone().requires_grad_(True) for x in inputs]
    xd = [x.detach().double().requires_grad_(True) for x in inputs]
    if not with_state:
        xs, xd = xs[:6], xd[:6]
    y, s = wkv7(*xs[:6], xs[6] if with_state else None, backend="host")
    grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), xs)
    yr, sr = wkv7_reference(*xd[:6], xd[6] if with_state else None, compute_dtype=torch.float64)
    grads_ref = torch.autograd.grad((yr * gy.double()).sum() + (sr * gs.double()).sum(), xd)
    return (y, s, grads), (yr, sr, grads_ref)


def assert_all_close(got, want, tol):
    (y, s, grads), (yr, sr, grads_ref) = got, want
    errors = {"y": rel_err(y, yr), "final_state": rel_err(s, sr)}
    names = NAMES[: len(grads)]
    errors |= {f"d{n}": rel_err(g, gr) for n, g, gr in zip(names, grads, grads_ref, strict=True)}
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad}"


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 100])
def test_matches_fp64_reference(B, T):
    inputs, upstream = make_inputs(B, T, 2, 64, seed=T * 10 + B)
    got, want = run_both(inputs, upstream)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_all_close(got, want, FP32_REL)


def test_zero_initial_state_and_other_head_sizes():
    for N in (4, 16, 32):
        inputs, upstream = make_inputs(2, 37, 3, N, seed=N)
        got, want = run_both(inputs, upstream, with_state=False)
        assert len(got[2]) == 6
        assert_all_close(got, want, FP32_REL)


def test_gradient_from_state_only_and_from_y_only():
    """One output unused: autograd passes None for its gradient, which the wrapper must treat as zero."""
    inputs, _ = make_inputs(2, 20, 2, 16, seed=5)
    for use_y in (True, False):
        xs = [x.clone().requires_grad_(True) for x in inputs]
        xd = [x.detach().double().requires_grad_(True) for x in inputs]
        y, s = wkv7(*xs, backend="host")
        yr, sr = wkv7_reference(*xd, compute_dtype=torch.float64)
        out, out_ref = (y, yr) if use_y else (s, sr)
        grads = torch.autograd.grad(out.square().sum(), xs)
        grads_ref = torch.autograd.grad(out_ref.square().sum(), xd, allow_unused=True)
        for n, g, gr in zip(NAMES, grads, grads_ref, strict=True):
            if gr is None:  # r does not reach the final state: its gradient must be exactly zero
                assert not use_y and n == "r" and not g.any()
            else:
                assert rel_err(g, gr) < FP32_REL, (use_y, n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_compute_in_fp32(dtype):
    """y and the input gradients come back in the input dtype; the state stays fp32."""
    inputs, upstream = make_inputs(1, 19, 2, 16, seed=7)
    inputs = [x.to(dtype) for x in inputs[:6]] + [inputs[6]]
    got, want = run_both(inputs, upstream)
    y, s, grads = got
    assert y.dtype == dtype and s.dtype == torch.float32
    assert [g.dtype for g in grads] == [dtype] * 6 + [torch.float32]
    # fp32 arithmetic on the same (rounded) inputs; then y and the gradients are rounded to `dtype`.
    tol = FP32_REL if dtype == torch.float64 else 2**-8
    assert_all_close(got, want, tol)


def test_decay_at_the_model_floor():
    """The documented limit of backstepping: decay = 0.545 (w = -0.5, the model's clamp) at every step
    is the worst case inside the model's range; the gradients still hold to 1e-3 (measured ~2e-4)."""
    inputs, upstream = make_inputs(2, 64, 2, 64, seed=3, w_value=-0.5)
    assert math.isclose(math.exp(-math.exp(-0.5)), 0.5452, rel_tol=1e-4)
    assert_all_close(*run_both(inputs, upstream), 1e-3)


def test_empty_sequence_passes_the_state_through():
    inputs, _ = make_inputs(2, 0, 2, 16)
    xs = [x.clone().requires_grad_(True) for x in inputs]
    y, s = wkv7(*xs, backend="host")
    assert y.shape == (2, 0, 2, 16)
    torch.testing.assert_close(s, inputs[6], rtol=0, atol=0)
    gs = torch.randn_like(s)
    (g_state,) = torch.autograd.grad((s * gs).sum(), xs[6])
    torch.testing.assert_close(g_state, gs, rtol=0, atol=0)


def test_forward_without_grad_skips_the_backward_buffers(monkeypatch):
    """Under no_grad / inference_mode, or when no input requires grad, the forward allocates neither the state
    snapshots nor sa (null pointers: the kernel skips those writes), and y and the final state are bit-identical
    to those of a forward that keeps them for the backward."""
    from rwkvslice.ops.wkv7_cuda import HostOps, num_chunks

    buffers = []
    real = HostOps.wkv7_forward

    def spy(*args):
        out = real(*args)
        buffers.append((out[2].numel(), out[3].numel()))
        return out

    monkeypatch.setattr(HostOps, "wkv7_forward", staticmethod(spy))
    B, T, H, N = 2, 37, 2, 16
    inputs, _ = make_inputs(B, T, H, N, seed=11)
    xs = [x.clone().requires_grad_(True) for x in inputs]
    y, s = wkv7(*xs, backend="host")
    full = (B * H * num_chunks(T) * N * N, B * T * H * N)
    assert buffers == [full]
    y.sum().backward()  # the kept buffers serve a backward
    assert all(x.grad is not None for x in xs)
    runs = {}
    with torch.no_grad():
        runs["no_grad"] = wkv7(*xs, backend="host")
    with torch.inference_mode():
        runs["inference_mode"] = wkv7(*xs, backend="host")
    runs["no input requires grad"] = wkv7(*inputs, backend="host")
    assert buffers[1:] == [(0, 0)] * 3
    for name, (y2, s2) in runs.items():
        assert torch.equal(y2, y.detach()) and torch.equal(s2, s.detach()), name
        assert not y2.requires_grad, name


def test_empty_sequence_with_resets():
    """T = 0: nothing is reset, the state passes through, and reset_state's gradient is zero (written, not
    left uninitialised: the kernel zeroes it even when no step runs)."""
    inputs, _ = make_inputs(2, 0, 2, 16)
    xs = [x.clone().requires_grad_(True) for x in (*inputs, torch.randn(2, 2, 16, 16))]
    for _ in range(3):  # reuse freed memory, so an unwritten gradient would likely not be all zeros
        y, s = wkv7_host(*xs[:7], resets=torch.zeros(2, 0, dtype=torch.bool), reset_state=xs[7])
        gs = torch.randn_like(s)
        g_state, g_reset = torch.autograd.grad((s * gs).sum(), xs[6:])
        assert torch.equal(g_state, gs) and torch.equal(g_reset, torch.zeros_like(g_reset))


def test_unsupported_head_size_is_a_one_line_error():
    inputs, _ = make_inputs(1, 3, 1, 24)
    with pytest.raises(ConfigError, match="head size 24") as e:
        wkv7(*inputs, backend="host")
    assert "\n" not in str(e.value)


def test_cuda_backend_rejects_cpu_tensors_in_one_line():
    inputs, _ = make_inputs(1, 3, 1, 16)
    with pytest.raises(ConfigError, match="needs CUDA tensors") as e:
        wkv7(*inputs, backend="cuda")
    assert "\n" not in str(e.value)


# ---- resets (packed sequences) ---------------------------------------------------------------------------

RESET_NAMES = (*NAMES, "reset_state")


def reference_with_resets(r, w, k, v, a, b, state, resets, reset_state):
    """fp64 loop written from the definition: where resets[b, t], the state before step t is reset_state[b]."""
    decay = torch.exp(-torch.exp(w))
    S, ys = state, []
    for t in range(r.shape[1]):
        S = torch.where(resets[:, t, None, None, None], reset_state, S)
        sa = S @ a[:, t, :, :, None]  # (B, H, N, 1)
        S = S * decay[:, t, :, None, :] + sa * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append((S @ r[:, t, :, :, None]).squeeze(-1))
    return torch.stack(ys, dim=1), S


def make_resets(B, T, *, seed, forced=()):
    """Random resets (p = 0.1) plus, for batch row i, the steps forced[i] (those below T)."""
    g = torch.Generator().manual_seed(seed)
    resets = torch.rand(B, T, generator=g) < 0.1
    for i, steps in enumerate(forced[:B]):
        for t in steps:
            if t < T:
                resets[i, t] = True
    return resets


def run_with_resets(inputs, upstream, resets, reset_state):
    """(y, final state, 8 gradients) from backend="host" and from the fp64 loop: r..b, state, reset_state."""
    gy, gs = upstream
    xs = [x.clone().requires_grad_(True) for x in (*inputs, reset_state)]
    xd = [x.detach().double().requires_grad_(True) for x in (*inputs, reset_state)]
    y, s = wkv7_host(*xs[:7], resets=resets, reset_state=xs[7])
    grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), xs)
    yr, sr = reference_with_resets(*xd[:7], resets, xd[7])
    grads_ref = torch.autograd.grad((yr * gy.double()).sum() + (sr * gs.double()).sum(), xd)
    return (y, s, grads), (yr, sr, grads_ref)


def assert_reset_run_close(got, want, tol):
    (y, s, grads), (yr, sr, grads_ref) = got, want
    errors = {"y": rel_err(y, yr), "final_state": rel_err(s, sr)}
    errors |= {f"d{n}": rel_err(g, gr) for n, g, gr in zip(RESET_NAMES, grads, grads_ref, strict=True)}
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad}"


# Per batch row: resets at the first step, at both edges of the first chunk boundary, mid-chunk twice in one
# chunk, and at the last step (T - 1 is added per test).
FORCED = ((0, 15, 16), (1, 5, 9, 17), (31, 32, 47))


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 100])
def test_resets_match_fp64_reference(B, T):
    inputs, upstream = make_inputs(B, T, 2, 64, seed=T * 10 + B + 1)
    forced = tuple((*steps, T - 1) if i == B - 1 else steps for i, steps in enumerate(FORCED))
    resets = make_resets(B, T, seed=T + B, forced=forced)
    reset_state = torch.randn(B, 2, 64, 64, generator=torch.Generator().manual_seed(T))
    got, want = run_with_resets(inputs, upstream, resets, reset_state)
    assert_reset_run_close(got, want, FP32_REL)


def test_a_reset_at_every_position_of_three_chunks():
    """Batch row i resets at step i only (rows 0..T-1: every step, chunk starts, ends and middles); the rows
    after that reset twice in one chunk. Small heads, so the loop covers every position in one call."""
    T = 40
    resets = torch.zeros(T + 8, T, dtype=torch.bool)
    resets[torch.arange(T), torch.arange(T)] = True
    for row, (t1, t2) in enumerate(
        [(2, 9), (16, 31), (17, 18), (30, 33), (0, 39), (14, 15), (20, 21), (33, 38)]
    ):
        resets[T + row, [t1, t2]] = True
    inputs, upstream = make_inputs(T + 8, T, 1, 8, seed=21)
    reset_state = torch.randn(T + 8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    assert_reset_run_close(*run_with_resets(inputs, upstream, resets, reset_state), FP32_REL)


def test_resets_all_false_equal_no_resets_bit_for_bit():
    inputs, upstream = make_inputs(3, 37, 2, 16, seed=4)
    gy, gs = upstream
    reset_state = torch.randn(3, 2, 16, 16)
    outs = []
    for resets in (None, torch.zeros(3, 37, dtype=torch.bool)):
        xs = [x.clone().requires_grad_(True) for x in (*inputs, reset_state)]
        y, s = wkv7_host(*xs[:7], resets=resets, reset_state=xs[7])
        wanted = xs if resets is not None else xs[:7]  # without resets reset_state is not used at all
        grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), wanted)
        outs.append((y, s, *grads))
    assert not outs[1][-1].any()  # no reset happens: reset_state's gradient is zero
    for name, x, x_none in zip(("y", "final_state", *NAMES), outs[1][:-1], outs[0], strict=True):
        assert torch.equal(x, x_none), name


def test_a_reset_at_step_0_equals_starting_from_reset_state():
    """The carried state is replaced before the first step: same outputs and gradients, bit for bit, as a run
    starting from reset_state, and the carried state gets a zero gradient."""
    inputs, upstream = make_inputs(2, 37, 2, 16, seed=6)
    gy, gs = upstream
    reset_state = torch.randn(2, 2, 16, 16)
    resets = torch.zeros(2, 37, dtype=torch.bool)
    resets[:, 0] = True
    xs = [x.clone().requires_grad_(True) for x in (*inputs, reset_state)]
    y, s = wkv7_host(*xs[:7], resets=resets, reset_state=xs[7])
    grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), xs)
    xs2 = [x.clone().requires_grad_(True) for x in (*inputs[:6], reset_state)]
    y2, s2 = wkv7_host(*xs2)
    grads2 = torch.autograd.grad((y2 * gy).sum() + (s2 * gs).sum(), xs2)
    assert torch.equal(y, y2) and torch.equal(s, s2)
    for name, g, g2 in zip(NAMES[:6], grads[:6], grads2[:6], strict=True):
        assert torch.equal(g, g2), name
    assert not grads[6].any()  # the carried state
    assert torch.equal(grads[7], grads2[6])  # reset_state's gradient is the initial state's


def test_resets_without_grad_and_with_a_zero_reset_state():
    """reset_state=None means zeros; under no_grad the same y and final state as with gradients enabled."""
    inputs, _ = make_inputs(2, 33, 1, 8, seed=8)
    resets = make_resets(2, 33, seed=1, forced=((3, 16), (20,)))
    y, s = wkv7_host(*inputs, resets=resets, reset_state=torch.zeros(2, 1, 8, 8))
    with torch.no_grad():
        y0, s0 = wkv7_host(*inputs, resets=resets)
    assert torch.equal(y, y0) and torch.equal(s, s0)
    yr, sr = reference_with_resets(*(x.double() for x in inputs), resets, torch.zeros(2, 1, 8, 8).double())
    assert rel_err(y0, yr) < FP32_REL and rel_err(s0, sr) < FP32_REL


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resets": torch.zeros(2, 4, dtype=torch.bool)}, r"resets has shape \(2, 4\), expected \(2, 5\)"),
        ({"resets": torch.zeros(2, 5, dtype=torch.int64)}, "resets must be torch.bool, got torch.int64"),
        ({"resets": torch.zeros(2, 5, dtype=torch.bool, device="meta")}, "resets is on meta, r on cpu"),
        ({"resets": [[False] * 5] * 2}, "resets must be a tensor, got list"),
        (
            {"reset_state": torch.zeros(2, 3, 8, 8)},
            r"reset_state has shape \(2, 3, 8, 8\), expected \(2, 1, 8, 8\)",
        ),
        ({"reset_state": torch.zeros(2, 1, 8, 8, dtype=torch.float64)}, "reset_state must be torch.float32"),
        ({"reset_state": torch.zeros(2, 1, 8, 8, device="meta")}, "reset_state is on meta, r on cpu"),
    ],
)
def test_bad_resets_are_one_line_errors(kwargs, message):
    inputs, _ = make_inputs(2, 5, 1, 8)
    kwargs = {"resets": torch.zeros(2, 5, dtype=torch.bool)} | kwargs
    with pytest.raises(ConfigError, match=message) as e:
        wkv7_host(*inputs, **kwargs)
    assert "\n" not in str(e.value) and str(e.value).startswith("wkv7 backend='host': ")


# ---- the drivers' phase order is what the CPU tests run ---------------------------------------------------

# Two adjacent phases in a driver of wkv7_core.cuh: deleting this text merges them into one phase, which on the
# GPU deletes the __syncthreads() between them.
PHASE_BOUNDARY = re.compile(r"\}\);\n\s*blk\.phase\(\[&\]\(int i\) \{")


def _build_variant(tmp_path, name, core_text):
    """The host library built from `core_text` as wkv7_core.cuh (and the real wkv7_host.cpp), -O0 for speed."""
    src = tmp_path / name
    src.mkdir()
    (src / "wkv7_core.cuh").write_text(core_text)
    (src / "wkv7_host.cpp").write_text((build.SOURCE_DIR / "wkv7_host.cpp").read_text())
    real = build.load_host_library()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "SOURCE_DIR", src)
        mp.setenv("RWKVSLICE_BUILD_DIR", str(tmp_path / "cache"))
        lib = ctypes.CDLL(str(build._host_library("wkv7_host", build.HOST_SOURCES, name, ("-O0",))))
    for fn in ("rwkvslice_wkv7_host_forward", "rwkvslice_wkv7_host_backward", "rwkvslice_wkv7_chunk_len"):
        getattr(lib, fn).argtypes = getattr(real, fn).argtypes
        getattr(lib, fn).restype = getattr(real, fn).restype
    return lib


@pytest.mark.slow  # five host builds: ~40 s on 2 busy cores
def test_every_barrier_of_the_drivers_is_needed_by_the_cpu_tests(tmp_path, monkeypatch):
    """Merge each pair of adjacent phases of the shared drivers (on the GPU: delete the __syncthreads() between
    them), build the host library from that variant, and run the resets check: every variant must fail it,
    while the unmodified source built the same way passes. So a missing barrier in the kernel's phase order
    cannot pass the CPU tests."""
    core = (build.SOURCE_DIR / "wkv7_core.cuh").read_text()
    drivers = core.index("WKV7_HD void wkv7_forward_block")
    boundaries = list(PHASE_BOUNDARY.finditer(core, drivers))
    # forward: load|step; backward: load|phase1, phase1|phase2, and the replay's load|replay
    assert len(boundaries) == 4, [core[m.start() - 60 : m.end() + 60] for m in boundaries]
    variants = {"unmodified": core}
    for m in boundaries:
        line = core.count("\n", 0, m.start()) + 1
        variants[f"merged_at_line_{line}"] = core[: m.start()] + core[m.end() :]
    # one at a time: each build points the module-global build.SOURCE_DIR at its variant (built from threads,
    # two patches interleave and the restore can leave SOURCE_DIR at a deleted variant for later tests)
    libs = {name: _build_variant(tmp_path, name, text) for name, text in variants.items()}

    B, T = 3, 40
    inputs, upstream = make_inputs(B, T, 1, 8, seed=12)
    resets = make_resets(B, T, seed=3, forced=((5, 20), (16, 33), ()))
    reset_state = torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    caught = {}
    for name, lib in libs.items():
        monkeypatch.setattr(wkv7_cuda_module, "load_host_library", lambda lib=lib: lib)
        got, want = run_with_resets(inputs, upstream, resets, reset_state)
        try:
            assert_reset_run_close(got, want, FP32_REL)
            caught[name] = False
        except AssertionError:
            caught[name] = True
    assert caught == {name: name != "unmodified" for name in variants}


# ---- the build cache ------------------------------------------------------------------------------------


def test_concurrent_fresh_builds_then_reuse(tmp_path, monkeypatch):
    """Two builders racing on one empty cache (threads: each runs the compiler as a subprocess) both return a
    complete library under the final name, no temporary file is left, and a later call reuses the file."""
    monkeypatch.setenv("RWKVSLICE_BUILD_DIR", str(tmp_path))
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: build.host_library_path(), range(2)))
    libs = sorted(tmp_path.iterdir())
    assert len(libs) == 1 and libs[0].suffix == ".so" and not libs[0].name.startswith(".")
    assert paths == [libs[0]] * 2
    mtime = libs[0].stat().st_mtime_ns
    assert build.host_library_path() == libs[0]
    assert libs[0].stat().st_mtime_ns == mtime
    lib = ctypes.CDLL(str(libs[0]))
    assert lib.rwkvslice_wkv7_chunk_len() == CHUNK_LEN


def test_missing_compiler_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKVSLICE_BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(build.KernelBuildError, match="install g\\+\\+ or set CXX") as e:
        build.host_library_path()
    assert isinstance(e.value, RWKVSliceError) and "\n" not in str(e.value)


def test_compile_error_is_a_one_line_error_with_a_log(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "wkv7_core.cuh").write_text((build.SOURCE_DIR / "wkv7_core.cuh").read_text())
    (src / "wkv7_host.cpp").write_text('#include "wkv7_core.cuh"\nint broken( { return undefined_name; }\n')
    monkeypatch.setattr(build, "SOURCE_DIR", src)
    monkeypatch.setenv("RWKVSLICE_BUILD_DIR", str(tmp_path / "cache"))
    with pytest.raises(build.KernelBuildError, match="failed") as e:
        build.host_library_path()
    message = str(e.value)
    assert "\n" not in message
    log = Path(message.rsplit("see ", 1)[1])
    assert "undefined_name" in log.read_text()
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".log"]  # no half-built library left


def test_build_key_changes_with_the_sources(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for name in build.HOST_SOURCES:
        (src / name).write_text((build.SOURCE_DIR / name).read_text())
    before = build.source_hash(build.HOST_SOURCES)
    monkeypatch.setattr(build, "SOURCE_DIR", src)
    assert build.source_hash(build.HOST_SOURCES) == before
    (src / "wkv7_core.cuh").write_text((src / "wkv7_core.cuh").read_text() + "\n// edited\n")
    assert build.source_hash(build.HOST_SOURCES) != before
    assert build.source_hash(build.HOST_SOURCES, "-O3") != build.source_hash(build.HOST_SOURCES, "-O2")


def test_compiler_that_cannot_run_is_a_one_line_error(tmp_path, monkeypatch):
    fake = tmp_path / "fake-c++"
    fake.write_bytes(b"\x00\x01 not a program")
    fake.chmod(0o755)  # executable bit set, so `which` finds it, but the kernel cannot exec it
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("RWKVSLICE_BUILD_DIR", str(tmp_path / "cache"))
    with pytest.raises(build.KernelBuildError) as e:
        build.host_library_path()
    assert str(e.value).startswith(f"cannot run the C++ compiler {fake}: ") and "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists()


def test_unusable_build_directory_is_a_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a file, not a directory")
    monkeypatch.setenv("RWKVSLICE_BUILD_DIR", str(tmp_path / "file" / "cache"))
    with pytest.raises(build.KernelBuildError) as e:
        build.host_library_path()
    message = str(e.value)
    assert message.startswith(f"cannot create the kernel build directory {tmp_path / 'file' / 'cache'}: ")
    assert "\n" not in message


def test_library_that_cannot_be_loaded_is_a_one_line_error(tmp_path, monkeypatch):
    bogus = tmp_path / "wkv7_host-0000.so"
    bogus.write_bytes(b"not an ELF file")
    monkeypatch.setattr(build, "host_library_path", lambda: bogus)
    with pytest.raises(build.KernelBuildError) as e:
        build.load_host_library.__wrapped__()  # bypass the per-process cache of the real library
    assert str(e.value).startswith(f"cannot load the WKV-7 host kernel {bogus}: ") and "\n" not in str(
        e.value
    )


def test_cuda_extension_name_embeds_the_source_hash(tmp_path, monkeypatch):
    name = build.cuda_extension_name()
    assert name == "rwkvslice_wkv7_" + build.source_hash(build.CUDA_SOURCES, *build.CUDA_FLAGS)
    assert len(name) == len("rwkvslice_wkv7_") + 16 and name.isidentifier()
    src = tmp_path / "src"
    src.mkdir()
    for n in build.CUDA_SOURCES:
        (src / n).write_text((build.SOURCE_DIR / n).read_text())
    monkeypatch.setattr(build, "SOURCE_DIR", src)
    assert build.cuda_extension_name() == name
    (src / "wkv7_cuda.cu").write_text((src / "wkv7_cuda.cu").read_text() + "\n// edited\n")
    assert build.cuda_extension_name() != name  # an edited kernel gets a new extension, not a stale one
