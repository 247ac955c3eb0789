"""backend="cuda": the fused kernel on a GPU, and its behaviour on machines without one.

GPU layer (marker `gpu`; skipped with "no CUDA device" when torch.cuda.is_available() is False):
- bf16 kernel vs an fp64 reference on the same bf16-rounded inputs: y, final state and the gradients of the
  six inputs and the initial state, RMS-relative error < 5e-3, T in {1, 15, 16, 17, 512, 4096}, B in {1, 8},
  H in {1, 16}. fp32 kernel: < 1e-4. Outputs are allocated from a NaN-poisoned cache, so an element the
  kernel never writes shows up as NaN.
- compute-sanitizer memcheck / racecheck / synccheck / initcheck clean on a small shape (subprocess).
- a bf16 model training step on the GPU against the fp32 CPU path.
CPU layer: no CUDA -> cuda_backend_available() is False without raising, "auto" falls back to "torch",
backend="cuda" fails in one line; a device whose kernel fails to build makes auto warn once and fall back; a
host library of another chunk length is refused; the torch binding (wkv7_op.cpp) passes a syntax check against torch's
headers (marker `nvcc`: needs the CUDA toolkit headers).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from compile_check_cache import run_compile
from rwkvslice.cuda import build
from rwkvslice.errors import ConfigError
from rwkvslice.ops import wkv7
from rwkvslice.ops import wkv7_cuda as wkv7_cuda_module
from rwkvslice.ops.wkv7_reference import wkv7_reference

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (torch.cuda.is_available() is False)")
NAMES = ("y", "final_state", "dr", "dw", "dk", "dv", "da", "db", "dstate")
RMS_REL = {torch.bfloat16: 5e-3, torch.float32: 1e-4}


def rms_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """RMS(got - want) / RMS(want), the fla / official-benchmark metric."""
    want = want.double()
    return ((got.double() - want).square().mean().sqrt() / want.square().mean().sqrt()).item()


def make_inputs(B, T, H, N, dtype, device, seed=0):
    """Model-like inputs (decay in (0.545, 1), a = -kk, b = kk * iclr) rounded to `dtype`; fp32 state."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    w = -F.softplus(-randn(B, T, H, N)) - 0.5
    kk = F.normalize(randn(B, T, H, N), dim=-1)
    a, b = -kk, kk * torch.sigmoid(randn(B, T, H, N))
    xs = [x.to(device=device, dtype=dtype) for x in (r, w, k, v, a, b)]
    state = randn(B, H, N, N).to(device)
    upstream = (randn(B, T, H, N).to(device=device, dtype=dtype), randn(B, H, N, N).to(device))
    return xs + [state], upstream


def reference_fp64(inputs, upstream, segment=256):
    """fp64 y, final state and gradients. Long sequences run in checkpointed segments, so T=4096 fits."""
    xd = [x.detach().double().requires_grad_(True) for x in inputs]
    r, w, k, v, a, b, state = xd
    ys = []
    for t0 in range(0, max(r.shape[1], 1), segment):
        part = [x[:, t0 : t0 + segment] for x in (r, w, k, v, a, b)]
        y, state = checkpoint(
            lambda *p: wkv7_reference(*p, compute_dtype=torch.float64), *part, state, use_reentrant=False
        )
        ys.append(y)
    y = torch.cat(ys, dim=1)
    gy, gs = upstream
    grads = torch.autograd.grad((y * gy.double()).sum() + (state * gs.double()).sum(), xd)
    return [y.detach(), state.detach(), *grads]


def poison_cuda_cache():
    """Fill blocks of the caching allocator with NaN and free them: outputs allocated next with
    torch.empty reuse this memory, so an element a kernel forgets to write reads back as NaN."""
    for n in (1 << 26, *(1 << 18 for _ in range(16))):  # a large-pool block, then small-pool blocks
        torch.full((n,), float("nan"), device="cuda")


def run_cuda(inputs, upstream):
    xs = [x.clone().requires_grad_(True) for x in inputs]
    poison_cuda_cache()
    y, s = wkv7(*xs[:6], xs[6], backend="cuda")
    gy, gs = upstream
    grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), xs)
    return [y, s, *grads]


def assert_matches(got, want, tol):
    errors = {}
    for name, g, w in zip(NAMES, got, want, strict=True):
        assert torch.isfinite(g).all(), f"{name}: non-finite values (unwritten output or overflow)"
        errors[name] = rms_rel(g, w)
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e < tol}
    assert not bad, f"RMS-relative errors above {tol}: {bad}"


# ---- GPU layer --------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("H", [1, 16])
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 512, 4096])
def test_bf16_kernel_matches_fp64_reference(T, B, H):
    inputs, upstream = make_inputs(B, T, H, 64, torch.bfloat16, "cuda", seed=T + 7 * B + 31 * H)
    got = run_cuda(inputs, upstream)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert [g.dtype for g in got[2:]] == [torch.bfloat16] * 6 + [torch.float32]
    assert_matches(got, reference_fp64(inputs, upstream), RMS_REL[torch.bfloat16])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("N", [16, 32, 64])
@pytest.mark.parametrize("T", [17, 100])
def test_fp32_kernel_matches_fp64_reference(T, N):
    inputs, upstream = make_inputs(3, T, 4, N, torch.float32, "cuda", seed=N + T)
    assert_matches(run_cuda(inputs, upstream), reference_fp64(inputs, upstream), RMS_REL[torch.float32])


@pytest.mark.gpu
@needs_cuda
def test_kernel_agrees_with_host_build():
    """Same arithmetic on both sides (fp32 in): the GPU and the host build differ only by __expf and
    operation order, far below the reference tolerance."""
    inputs, upstream = make_inputs(2, 40, 3, 64, torch.float32, "cuda", seed=11)
    got = run_cuda(inputs, upstream)
    host_inputs = [x.cpu() for x in inputs]
    xs = [x.clone().requires_grad_(True) for x in host_inputs]
    y, s = wkv7(*xs[:6], xs[6], backend="host")
    gy, gs = (u.cpu() for u in upstream)
    host = [y, s, *torch.autograd.grad((y * gy).sum() + (s * gs).sum(), xs)]
    for name, g, h in zip(NAMES, got, host, strict=True):
        assert rms_rel(g.cpu(), h) < 2e-5, name


@pytest.mark.gpu
@needs_cuda
def test_auto_picks_cuda_and_unsupported_head_size_is_one_line():
    assert wkv7_cuda_module.cuda_backend_available() is True
    inputs, _ = make_inputs(1, 5, 1, 64, torch.bfloat16, "cuda")
    y_auto, s_auto = wkv7(*inputs)
    y_cuda, s_cuda = wkv7(*inputs, backend="cuda")
    torch.testing.assert_close(y_auto, y_cuda, rtol=0, atol=0)
    torch.testing.assert_close(s_auto, s_cuda, rtol=0, atol=0)
    bad, _ = make_inputs(1, 5, 1, 128, torch.bfloat16, "cuda")
    with pytest.raises(ConfigError, match="head size 128") as e:
        wkv7(*bad, backend="cuda")
    assert "\n" not in str(e.value)


def _sanitizer() -> str:
    candidates = [shutil.which("compute-sanitizer")]
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        candidates += [
            os.path.join(CUDA_HOME, "bin", "compute-sanitizer"),
            os.path.join(CUDA_HOME, "compute-sanitizer", "compute-sanitizer"),
        ]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    pytest.skip("compute-sanitizer not found (part of the CUDA toolkit)")


_SANITIZED_RUN = """
import torch
from rwkvslice.ops import wkv7
from rwkvslice.ops.wkv7_cuda import wkv7_cuda
torch.manual_seed(0)
for dtype, N, T, with_state in ((torch.bfloat16, 64, 37, True), (torch.float32, 16, 16, False)):
    xs = [torch.randn(2, T, 2, N, device="cuda").to(dtype).requires_grad_() for _ in range(6)]
    state = torch.randn(2, 2, N, N, device="cuda", requires_grad=True) if with_state else None
    y, s = wkv7(*xs, state, backend="cuda", check_w=False)  # memory/race checks need no accurate w range
    (y.float().square().sum() + s.square().sum()).backward()
# resets inside and at the edges of snapshot chunks: the backward's replay path
xs = [torch.randn(2, 40, 2, 16, device="cuda").requires_grad_() for _ in range(6)]
resets = torch.zeros(2, 40, dtype=torch.bool, device="cuda")
resets[0, [0, 5, 16, 39]] = True
resets[1, [15, 17, 20]] = True
reset_state = torch.randn(2, 2, 16, 16, device="cuda", requires_grad=True)
y, s = wkv7_cuda(*xs, None, resets=resets, reset_state=reset_state)
(y.square().sum() + s.square().sum()).backward()
torch.cuda.synchronize()
print("ran")
"""


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck", "initcheck"])
def test_compute_sanitizer_clean(tool, tmp_path):
    """Out-of-bounds accesses, shared-memory races, barrier misuse and reads of unwritten device memory
    in our kernels (the filter limits the check to kernels named wkv7*)."""
    sanitizer = _sanitizer()
    wkv7_cuda_module._cuda_ops()  # build once here, so the sanitized child only loads the cached extension
    script = tmp_path / "run.py"
    script.write_text(_SANITIZED_RUN)
    proc = subprocess.run(
        [sanitizer, "--tool", tool, "--error-exitcode", "3", "--kernel-name", "kns=wkv7",
         sys.executable, str(script)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0 and "ran" in proc.stdout, (proc.stdout + proc.stderr)[-6000:]
    assert "ERROR SUMMARY: 0 errors" in proc.stdout + proc.stderr


@pytest.mark.gpu
@needs_cuda
def test_bf16_model_training_step_matches_fp32_cpu():
    """One loss + backward of a small model: bf16 weights on the GPU (wkv7 through the kernel) against fp32
    on the CPU (the "torch" backend). The bound is bf16 rounding through 2 layers: loss within 1e-2
    relative, every parameter's gradient within 5e-2 RMS-relative, and no worse than twice the error of
    the same bf16 GPU model run with the "torch" backend (so the kernel adds no error of its own)."""
    from rwkvslice import RWKV7, RWKV7Config

    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(vocab_size=256, n_embd=128, n_layer=2, head_size=64))
    idx = torch.randint(0, 256, (4, 96))
    targets = torch.roll(idx, -1, dims=1)

    def step(m, device, backend):
        m.zero_grad(set_to_none=True)
        logits = m(idx.to(device), backend=backend)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten())
        loss.backward()
        return loss.item(), {n: p.grad.detach().double().cpu() for n, p in m.named_parameters()}

    loss_ref, grads_ref = step(model, "cpu", "torch")
    gpu = RWKV7(model.config)
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.to(device="cuda", dtype=torch.bfloat16)
    loss_cuda, grads_cuda = step(gpu, "cuda", "cuda")
    loss_torch, grads_torch = step(gpu, "cuda", "torch")

    assert abs(loss_cuda - loss_ref) / loss_ref < 1e-2
    for name, g_ref in grads_ref.items():
        if g_ref.abs().max() == 0:
            continue
        err_cuda = rms_rel(grads_cuda[name], g_ref)
        err_torch = rms_rel(grads_torch[name], g_ref)
        assert err_cuda < 5e-2, (name, err_cuda)
        assert err_cuda <= 2 * err_torch + 1e-3, (name, err_cuda, err_torch)


def reference_with_resets_fp64(inputs, resets, reset_state, upstream):
    """fp64 loop from the definition (where resets[b, t], the state before step t is reset_state[b]): y, final
    state and the gradients of r, w, k, v, a, b, the carried state and reset_state."""
    xd = [x.detach().cpu().double().requires_grad_(True) for x in (*inputs, reset_state)]
    r, w, k, v, a, b, S, rs = xd
    resets = resets.cpu()
    decay = torch.exp(-torch.exp(w))
    ys = []
    for t in range(r.shape[1]):
        S = torch.where(resets[:, t, None, None, None], rs, S)
        sa = S @ a[:, t, :, :, None]
        S = S * decay[:, t, :, None, :] + sa * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append((S @ r[:, t, :, :, None]).squeeze(-1))
    y = torch.stack(ys, dim=1)
    gy, gs = (u.cpu().double() for u in upstream)
    grads = torch.autograd.grad((y * gy).sum() + (S * gs).sum(), xd)
    return [y.detach(), S.detach(), *grads]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T", [1, 16, 17, 100])
def test_kernel_with_resets_matches_fp64_reference(T, dtype):
    """Resets at the first step, at chunk edges (15, 16, 17), mid-chunk twice and at the last step: y, final
    state and all 8 gradients (reset_state's included) against the fp64 loop; same tolerances as without."""
    B, H, N = 3, 2, 64
    inputs, upstream = make_inputs(B, T, H, N, dtype, "cuda", seed=T + 3)
    resets = torch.zeros(B, T, dtype=torch.bool)
    for row, steps in enumerate(((0, 15, 16), (5, 9, 17), (31, 47, T - 1))):
        resets[row, [t for t in steps if t < T]] = True
    resets = resets.cuda()
    reset_state = torch.randn(B, H, N, N, device="cuda")
    xs = [x.clone().requires_grad_(True) for x in (*inputs, reset_state)]
    poison_cuda_cache()
    y, s = wkv7_cuda_module.wkv7_cuda(*xs[:7], resets=resets, reset_state=xs[7])
    gy, gs = upstream
    got = [y, s, *torch.autograd.grad((y * gy).sum() + (s * gs).sum(), xs)]
    want = reference_with_resets_fp64(inputs, resets, reset_state, upstream)
    errors = {}
    for name, g, w in zip((*NAMES, "dreset_state"), got, want, strict=True):
        assert torch.isfinite(g).all(), name
        errors[name] = rms_rel(g.cpu(), w) if w.any() else g.abs().max().item()
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e < RMS_REL[dtype]}
    assert not bad, f"errors above {RMS_REL[dtype]}: {bad}"


@pytest.mark.gpu
@needs_cuda
def test_no_grad_forward_allocates_no_snapshots_on_the_gpu():
    """Under no_grad the forward's peak allocation is y + the final state (+ the casts), not the backward's
    snapshots and sa (at N = 64 those would be ~5x y in fp32 for bf16 inputs)."""
    B, T, H, N = 4, 2048, 4, 64
    inputs, _ = make_inputs(B, T, H, N, torch.bfloat16, "cuda")
    xs = [x.requires_grad_(True) for x in inputs[:6]]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        y, s = wkv7(*xs, inputs[6], backend="cuda")
    peak = torch.cuda.max_memory_allocated() - before
    y_bytes = y.numel() * y.element_size()
    snapshot_bytes = B * H * wkv7_cuda_module.num_chunks(T) * N * N * 4 + B * T * H * N * 4
    assert peak < y_bytes + 2 * s.numel() * 4 + snapshot_bytes // 4, (peak, y_bytes, snapshot_bytes)


# ---- CPU layer: no CUDA device ---------------------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA, reason="checks the fallback on machines without CUDA")
def test_without_cuda_auto_falls_back_and_cuda_fails_in_one_line():
    assert wkv7_cuda_module.cuda_backend_available() is False
    assert wkv7_cuda_module.cuda_backend_available() is False  # cached, still no exception
    inputs, _ = make_inputs(1, 5, 1, 16, torch.float32, "cpu")
    y, s = wkv7(*inputs)  # auto -> torch on CPU tensors
    y_ref, s_ref = wkv7_reference(*inputs)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="needs CUDA tensors") as e:
        wkv7(*inputs, backend="cuda")
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the error on a CPU-only torch build")
def test_cuda_extension_on_cpu_torch_is_a_one_line_error():
    with pytest.raises(build.KernelBuildError, match="needs a CUDA build of torch") as e:
        build.load_cuda_extension.__wrapped__()
    assert "\n" not in str(e.value)


def _cuda_include_dir() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc")
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), CUDA_HOME, "/usr/local/cuda"]
    roots.append(str(Path(os.path.realpath(nvcc)).parents[1]) if nvcc else None)
    for root in roots:
        if root and (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return str(Path(root) / "include")
    reason = "CUDA toolkit headers not found (nvcc on PATH or CUDA_HOME)"
    if os.environ.get("RWKVSLICE_REQUIRE_NVCC") == "1":
        pytest.fail(reason + " and RWKVSLICE_REQUIRE_NVCC=1")
    pytest.skip(reason)


@pytest.mark.nvcc
def test_torch_binding_compiles_against_torch_headers():
    """wkv7_op.cpp is only ever compiled by the JIT build on a GPU machine; this catches API mistakes
    (wrong ATen calls, schema/registration macro misuse) here, with the flags cpp_extension uses.
    CPU-only torch wheels lack one generated CUDA header (c10/cuda/impl/cuda_cmake_macros.h); an empty
    stand-in is supplied for it then."""
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which(os.environ.get("CXX", "")) or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler on PATH")
    includes = [*include_paths(), _cuda_include_dir()]
    with tempfile.TemporaryDirectory() as stub:
        stub_needed = not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in include_paths())
        if stub_needed:
            (Path(stub) / "c10/cuda/impl").mkdir(parents=True)
            (Path(stub) / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n")
        std = (
            "-std=c++20"
            if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 8)
            else "-std=c++17"
        )
        cmd = [cxx, std, "-fsyntax-only", "-Wall", "-Werror", "-Wno-c++20-extensions"]
        cmd += [f"-I{p}" for p in [*includes, stub, str(build.SOURCE_DIR)]]
        # a success is replayed from tests/compile_check_cache.py while sources, flags, compiler and torch
        # stay the same (the stub directory's random name is not part of the key)
        proc, _ = run_compile(
            [*cmd, str(build.SOURCE_DIR / "wkv7_op.cpp")],
            source_dir=build.SOURCE_DIR,
            extra=f"torch {torch.__version__} {include_paths()} stub={stub_needed}",
            ignore=stub,
        )
    assert proc.returncode == 0, textwrap.shorten(proc.stderr, 4000)


def test_a_kernel_that_fails_to_build_falls_back_with_a_one_line_warning(monkeypatch):
    """A CUDA device is visible but the extension cannot be built: auto must not raise, it warns once with
    the build error's line and reports the CUDA backend unavailable (simulated device, real code path)."""

    def failing_build():
        raise build.KernelBuildError("the CUDA WKV-7 kernel needs nvcc: install the CUDA toolkit or set CUDA_HOME")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(wkv7_cuda_module, "_cuda_ops", failing_build)
    with pytest.warns(UserWarning) as record:
        assert wkv7_cuda_module.cuda_backend_available.__wrapped__() is False  # bypass the process cache
    assert [str(w.message) for w in record] == [
        "rwkvslice: CUDA WKV-7 kernel unavailable, using backend='torch': the CUDA WKV-7 kernel needs nvcc: "
        "install the CUDA toolkit or set CUDA_HOME"]


def test_a_host_library_with_another_chunk_length_is_refused(monkeypatch):
    chunk = wkv7_cuda_module.CHUNK_LEN

    class StaleLibrary:
        @staticmethod
        def rwkvslice_wkv7_chunk_len():
            return 2 * chunk

    monkeypatch.setattr(wkv7_cuda_module, "load_host_library", lambda: StaleLibrary())
    with pytest.raises(build.KernelBuildError) as e:
        wkv7_cuda_module.HostOps._lib()
    assert str(e.value) == f"host kernel chunk length {2 * chunk} != CHUNK_LEN {chunk}"


class LooksCuda(torch.Tensor):
    """A CPU tensor that reports is_cuda, so dispatch takes its CUDA branch on a machine without a GPU."""

    @property
    def is_cuda(self):  # type: ignore[override]
        return True


@pytest.mark.parametrize("N, expected", [(64, "cuda"), (16, "cuda"), (128, "torch"), (8, "torch")])
def test_auto_falls_back_to_torch_for_head_sizes_the_kernel_lacks(monkeypatch, N, expected):
    """backend='auto' with CUDA tensors: the kernel's head sizes (CUDA_HEAD_SIZES) go to "cuda", others to
    "torch" (wkv7_cuda would refuse them, so a model with head size 128 could not train on a GPU)."""
    from rwkvslice.ops import selfcheck
    from rwkvslice.ops.wkv7 import _resolve

    monkeypatch.setattr(wkv7_cuda_module, "cuda_backend_available", lambda: True)
    monkeypatch.setattr(selfcheck, "wkv7_kernel_trusted", lambda r: True)
    inputs, _ = make_inputs(1, 3, 1, N, torch.float32, "cpu")
    r, w = (x.as_subclass(LooksCuda) for x in inputs[:2])
    assert r.is_cuda
    assert _resolve("auto", r, w) == expected


def _inputs_with_w(w_value, N=16):
    inputs, _ = make_inputs(1, 20, 2, N, torch.float32, "cpu", seed=4)
    inputs[1] = inputs[1].clone()
    inputs[1][0, 7, 1, 3] = w_value  # one element outside (or at the edge of) the kernel's range
    return inputs


def test_explicit_kernel_backends_refuse_w_above_the_kernel_range():
    """The backstepping backward divides by the decay: w > W_MAX_KERNEL is refused by "host" (and "cuda")
    with one line; w = W_MAX_KERNEL itself is accepted."""
    from rwkvslice.ops.wkv7 import W_MAX_KERNEL

    assert W_MAX_KERNEL == -0.5
    with pytest.raises(ConfigError) as e:
        wkv7(*_inputs_with_w(0.25), backend="host")
    assert str(e.value) == (
        "wkv7 backend='host': w has values above -0.5 (max 0.25); the kernel's backward is accurate only "
        "for w <= -0.5: use backend='torch'"
    )
    wkv7(*_inputs_with_w(-0.5), backend="host")  # the edge is in range
    wkv7(*_inputs_with_w(0.25), backend="host", check_w=False)  # the caller vouches for w (model)


def test_auto_reroutes_w_above_the_kernel_range_to_torch(monkeypatch):
    """With CUDA tensors and a working kernel, w outside the range goes to "torch"; check_w=False (what the
    model passes, since it clamps w) keeps it on the kernel."""
    from rwkvslice.ops import selfcheck
    from rwkvslice.ops.wkv7 import _resolve

    monkeypatch.setattr(wkv7_cuda_module, "cuda_backend_available", lambda: True)
    monkeypatch.setattr(selfcheck, "wkv7_kernel_trusted", lambda r: True)
    r, w = (x.as_subclass(LooksCuda) for x in _inputs_with_w(0.25)[:2])
    assert _resolve("auto", r, w) == "torch"
    assert _resolve("auto", r, w, check_w=False) == "cuda"
    r, w = (x.as_subclass(LooksCuda) for x in _inputs_with_w(-0.5)[:2])
    assert _resolve("auto", r, w) == "cuda"


def test_the_kernel_backward_is_inaccurate_above_the_range():
    """Why the range exists (host build = the kernel's arithmetic, fp32, against the fp64 loop): dw error
    under 1e-3 with w <= -0.5 and above 1e-2 once w reaches 0 (the division by the decay amplifies)."""
    errors = {}
    for w_max in (-0.5, 0.0):
        inputs, upstream = make_inputs(2, 64, 2, 16, torch.float32, "cpu", seed=9)
        inputs[1] = torch.full_like(inputs[1], w_max)
        xs = [x.clone().requires_grad_(True) for x in inputs]
        y, s = wkv7(*xs[:6], xs[6], backend="host", check_w=False)
        dw = torch.autograd.grad((y * upstream[0]).sum() + (s * upstream[1]).sum(), xs[1])[0]
        errors[w_max] = rms_rel(dw, reference_fp64(inputs, upstream)[3])
    assert errors[-0.5] < 1e-3 and errors[0.0] > 1e-2, errors


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("N", [8, 128])
def test_auto_runs_head_sizes_the_kernel_lacks_on_the_torch_backend(N):
    """On CUDA, a head size outside CUDA_HEAD_SIZES trains through "auto" (the torch backend on the GPU)
    instead of failing: y and gradients match the fp64 reference (fp32, 1e-4 RMS-relative)."""
    inputs, upstream = make_inputs(2, 33, 2, N, torch.float32, "cuda", seed=N)
    xs = [x.clone().requires_grad_(True) for x in inputs]
    y, s = wkv7(*xs[:6], xs[6])
    gy, gs = upstream
    got = [y, s, *torch.autograd.grad((y * gy).sum() + (s * gs).sum(), xs)]
    assert_matches(got, reference_fp64(inputs, upstream), RMS_REL[torch.float32])


def _sliced_step_errors(device: str, monkeypatch):
    """One model.loss + backward as the trainer runs it (fp32 master weights, bf16 autocast on `device`)
    against the same step in fp32 on the CPU: (relative loss error, {parameter: gradient RMS-relative
    error}, the shapes the CUDA kernel was called with)."""
    import copy

    from rwkvslice import RWKV7, RWKV7Config

    calls = []
    kernel = wkv7_cuda_module.wkv7_cuda

    def counted(r, *args):
        calls.append(tuple(r.shape))
        return kernel(r, *args)

    monkeypatch.setattr(wkv7_cuda_module, "wkv7_cuda", counted)
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(vocab_size=1000, n_embd=128, n_layer=2, head_size=64))
    idx = torch.randint(0, 1000, (4, 96))
    targets = idx.roll(-1, 1)
    targets[:, :60] = -100  # SFT-like: the loss on the last 36 positions only

    def step(m, dev, autocast):
        m.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=autocast):
            loss = m.loss(idx.to(dev), targets.to(dev))
        loss.backward()
        return loss.item(), {n: p.grad.detach().double().cpu() for n, p in m.named_parameters()}

    loss_ref, grads_ref = step(model, "cpu", False)
    loss_got, grads_got = step(copy.deepcopy(model).to(device), device, True)
    errors = {n: rms_rel(grads_got[n], g) for n, g in grads_ref.items() if g.abs().max() > 0}
    return abs(loss_got - loss_ref) / loss_ref, errors, calls


@pytest.mark.gpu
@needs_cuda
def test_bf16_autocast_sliced_training_step_on_cuda_matches_fp32_cpu(monkeypatch):
    """The trainer's path on the GPU: autocast(bf16) over fp32 master weights, model.loss with "auto" (so the
    WKV-7 kernel, after its self-check, and the chunked loss's bf16 gradient GEMMs), against fp32 on the CPU.
    Bounds, bf16 rounding through 2 layers: loss within 1e-2 relative, every gradient within 5e-2
    RMS-relative (measured on CPU autocast: below 1e-2)."""
    from rwkvslice.slicing import chunked

    loss_err, errors, calls = _sliced_step_errors("cuda", monkeypatch)
    assert (4, 96, 2, 64) in calls, calls  # the model's layers ran through the kernel
    assert chunked.last_grad_w_path() in ("addmm_fp32_out", "upcast_fp32")  # the low-precision path ran
    assert loss_err < 1e-2
    bad = {n: f"{e:.1e}" for n, e in errors.items() if not e < 5e-2}
    assert not bad, bad
