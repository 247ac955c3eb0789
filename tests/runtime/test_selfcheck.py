"""selfcheck.py, ops/selfcheck.py, slicing/selfcheck.py: GPU-only paths verify themselves before "auto"
trusts them.

On CPU the device ops are stood in for: a tensor that reports is_cuda, the CUDA kernel replaced by the host
build (correct) or by a deliberately wrong or failing fake, the chunked loss's low-precision gradient path
enabled for the CPU with a wrong accumulation injected. References are the fp64 WKV-7 loop and full
logits in fp64, never the code under test. Tolerances: fp32 WKV-7 gradients 1e-4 RMS-relative of the
reference, chunked loss 1e-5 relative (fp32 path).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from rwkvslice import selfcheck
from rwkvslice.ops import selfcheck as wkv7_selfcheck
from rwkvslice.ops import wkv7
from rwkvslice.ops import wkv7_cuda as wkv7_cuda_module
from rwkvslice.ops.wkv7_reference import wkv7_reference
from rwkvslice.ops.wkv7_torch import wkv7_torch
from rwkvslice.slicing import chunked as chunked_module
from rwkvslice.slicing import linear_cross_entropy
from rwkvslice.slicing import selfcheck as loss_selfcheck

pytestmark = pytest.mark.component("CUDA Kernels")


class LooksCuda(torch.Tensor):
    """A CPU tensor that reports is_cuda, so dispatch takes its CUDA branch on a machine without a GPU."""

    @property
    def is_cuda(self):  # type: ignore[override]
        return True


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def correct_kernel(r, w, k, v, a, b, state=None):
    return wkv7_cuda_module.wkv7_host(r, w, k, v, a, b, state)


def wrong_dw_kernel(r, w, k, v, a, b, state=None):
    """Right forward, dw 30 % too large: what a broken backward would look like."""
    return wkv7_cuda_module.wkv7_host(r, _ScaleGrad.apply(w, 1.3), k, v, a, b, state)


@pytest.fixture(autouse=True)
def _fresh_verdicts(monkeypatch):
    monkeypatch.delenv(selfcheck.SKIP_ENV, raising=False)
    selfcheck.reset()
    yield
    selfcheck.reset()


@pytest.fixture
def fake_device(monkeypatch):
    """A "CUDA device" whose kernel builds; returns a counter of kernel calls and a setter for the kernel."""
    calls = []

    def install(kernel):
        def counted(*args):
            calls.append(args[0].shape)
            return kernel(*args)

        monkeypatch.setattr(wkv7_cuda_module, "wkv7_cuda", counted)

    monkeypatch.setattr(wkv7_cuda_module, "cuda_backend_available", lambda: True)
    return calls, install


def inputs_fp32(B=2, T=21, H=2, N=16, seed=3):
    xs, _ = wkv7_selfcheck.wkv7_problem(B, T, H, N, torch.float32, "cpu", seed=seed)
    return xs


def reference_grads(xs):
    leaves = [x.detach().double().requires_grad_(True) for x in xs]
    y, s = wkv7_reference(*leaves[:6], leaves[6], compute_dtype=torch.float64)
    loss = y.square().sum() + s.sum()
    return [y.detach(), *torch.autograd.grad(loss, leaves)]


def rms_rel(got, want):
    want = want.double()
    return ((got.double() - want).square().mean().sqrt() / want.square().mean().sqrt()).item()


# ---- the check itself ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_correct_kernel_passes_the_wkv7_check(dtype):
    assert wkv7_selfcheck.check_wkv7(correct_kernel, wkv7_torch, dtype, 16, "cpu") is None


def test_a_wrong_kernel_fails_the_wkv7_check_naming_what_differed():
    problem = wkv7_selfcheck.check_wkv7(wrong_dw_kernel, wkv7_torch, torch.float32, 16, "cpu")
    assert (
        problem is not None and problem.startswith("dw RMS-relative 3.0e-01") and "tolerance 1e-03" in problem
    )
    assert "dr" not in problem and "y " not in problem  # only dw is wrong


def test_non_finite_and_misshapen_outputs_are_named():
    ones = torch.ones(3)
    nan = torch.tensor([1.0, float("nan"), 1.0])
    assert selfcheck.compare({"y": (nan, ones)}, 1.0) == "y has non-finite values (tolerance 1e+00)"
    assert selfcheck.compare({"y": (ones[:2], ones)}, 1.0) == "y shape (2,) != (3,) (tolerance 1e+00)"
    assert selfcheck.compare({"y": (ones * 1.01, ones)}, 2e-2) is None
    assert selfcheck.compare({"y": (ones * 1.03, ones)}, 2e-2) == "y RMS-relative 3.0e-02 (tolerance 2e-02)"


# ---- wkv7(backend="auto") on a stand-in device -----------------------------------------------------------


def test_auto_refuses_a_wrong_kernel_once_and_the_fallback_gives_correct_gradients(fake_device):
    calls, install = fake_device
    install(wrong_dw_kernel)
    xs = inputs_fp32()
    want = reference_grads(xs)
    for attempt in range(2):
        leaves = [x.clone().as_subclass(LooksCuda).requires_grad_(True) for x in xs]
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            y, s = wkv7(*leaves[:6], leaves[6])
        got = [y, *torch.autograd.grad(y.square().sum() + s.sum(), leaves)]
        for name, g, w in zip(("y", "dr", "dw", "dk", "dv", "da", "db", "dstate"), got, want):
            assert rms_rel(g, w) < 1e-4, (attempt, name)
        messages = [str(w.message) for w in record]
        if attempt == 0:
            assert len(calls) == 1  # the self-check ran the kernel once
            assert len(messages) == 1 and messages[0].startswith(
                "rwkvslice: self-check failed: the CUDA WKV-7 kernel (float32, head size 16, cpu) against "
                "backend='torch': dw RMS-relative 3.0e-01 (tolerance 1e-03); backend='auto' uses 'torch'"
            ), messages
        else:
            assert messages == [] and len(calls) == 1  # verdict kept: no second check, no second warning


def test_auto_uses_a_kernel_that_passes(fake_device):
    calls, install = fake_device
    install(correct_kernel)
    xs = [x.as_subclass(LooksCuda) for x in inputs_fp32()]
    assert wkv7_module_resolve(xs) == "cuda"
    assert len(calls) == 1  # the self-check's run; the verdict is cached from then on
    assert wkv7_module_resolve(xs) == "cuda" and len(calls) == 1


def test_a_kernel_that_raises_is_refused_with_its_message(fake_device):
    calls, install = fake_device

    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    install(broken)
    with pytest.warns(
        UserWarning,
        match="it raised RuntimeError: CUDA error: an illegal memory access was "
        "encountered; backend='auto' uses 'torch'",
    ):
        assert wkv7_module_resolve([x.as_subclass(LooksCuda) for x in inputs_fp32()]) == "torch"


def test_the_environment_variable_skips_the_check(fake_device, monkeypatch):
    calls, install = fake_device
    install(wrong_dw_kernel)
    monkeypatch.setenv(selfcheck.SKIP_ENV, "1")
    assert wkv7_module_resolve([x.as_subclass(LooksCuda) for x in inputs_fp32()]) == "cuda"
    assert calls == []


def test_verdicts_are_per_dtype_and_head_size(fake_device):
    calls, install = fake_device
    install(correct_kernel)
    for N in (16, 32):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):  # fp16 runs the kernel in fp32
            xs = [x.to(dtype).as_subclass(LooksCuda) for x in inputs_fp32(N=N)]
            assert wkv7_module_resolve(xs) == "cuda"
    assert len(calls) == 4  # (fp32, 16), (bf16, 16), (fp32, 32), (bf16, 32)


def test_the_check_runs_under_inference_mode_and_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    with torch.inference_mode():
        assert wkv7_selfcheck.check_wkv7(correct_kernel, wkv7_torch, torch.float32, 16, "cpu") is None
    assert torch.equal(torch.rand(4), expected)


def wkv7_module_resolve(xs):
    from rwkvslice.ops.wkv7 import _resolve

    return _resolve("auto", xs[0], xs[1])


# ---- chunked loss: low-precision gradient GEMMs --------------------------------------------------------


def full_logits_reference(x, weight, target):
    xd, wd = x.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    loss = F.cross_entropy(xd @ wd.t(), target, reduction="sum")
    return (loss.detach(), *torch.autograd.grad(loss, (xd, wd)))


def chunked_bf16_step(x, weight, target):
    xs, ws = x.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(xs, ws, target, impl="chunked", chunk_size=8)
    return (loss.detach(), *torch.autograd.grad(loss, (xs, ws)))


def loss_problem():
    g = torch.Generator().manual_seed(7)
    return (
        torch.randn(40, 32, generator=g),
        0.3 * torch.randn(100, 32, generator=g),
        torch.randint(0, 100, (40,), generator=g),
    )


def test_a_wrong_low_precision_grad_gemm_is_refused_and_the_fp32_path_is_correct(monkeypatch):
    """The low-precision branch is enabled on the CPU, with an accumulation that overwrites grad_W instead
    of adding to it (only the last chunk would survive). The self-check refuses it once; the loss then
    takes its fp32 gradient path, whose gradients match full logits in fp64 (bf16 logits: 2e-2)."""
    monkeypatch.setattr(chunked_module, "LOW_PRECISION_GRAD_GEMM_DEVICES", ("cpu",))

    def overwriting(grad_w, u, xs, fp32_out_addmm):
        grad_w.copy_(u.t().float() @ xs.float())

    monkeypatch.setattr(chunked_module, "_accumulate_grad_w_low", overwriting)
    x, weight, target = loss_problem()
    with pytest.warns(UserWarning) as record:
        loss, gx, gw = chunked_bf16_step(x, weight, target)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and messages[0].startswith(
        "rwkvslice: self-check failed: the chunked loss's bfloat16 gradient GEMMs on cpu against its fp32 "
        "gradient path: grad_w RMS-relative"
    ), messages
    assert "grad_x" not in messages[0] and messages[0].endswith(
        f"fp32 gradient path from now on ({selfcheck.SKIP_ENV}=1 skips these checks)"
    )
    assert chunked_module.last_grad_w_path() == "fp32"
    ref_loss, ref_gx, ref_gw = full_logits_reference(x, weight, target)
    assert rms_rel(loss, ref_loss) < 2e-2 and rms_rel(gx, ref_gx) < 2e-2 and rms_rel(gw, ref_gw) < 2e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the verdict is kept: no second check, no second warning
        chunked_bf16_step(x, weight, target)


def test_a_correct_low_precision_grad_gemm_is_used(monkeypatch):
    """Positive control: the real accumulation passes, and the low-precision path runs (on CPU without
    the fp32-out addmm overload: "upcast_fp32")."""
    monkeypatch.setattr(chunked_module, "LOW_PRECISION_GRAD_GEMM_DEVICES", ("cpu",))
    x, weight, target = loss_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, gx, gw = chunked_bf16_step(x, weight, target)
    assert chunked_module.last_grad_w_path() == "upcast_fp32"
    ref_loss, ref_gx, ref_gw = full_logits_reference(x, weight, target)
    assert rms_rel(gx, ref_gx) < 2e-2 and rms_rel(gw, ref_gw) < 2e-2


def test_the_fp32_path_never_runs_the_check(monkeypatch):
    def fail(*args):
        raise AssertionError("self-check ran")

    monkeypatch.setattr(loss_selfcheck, "low_precision_grad_gemm_trusted", fail)
    x, weight, target = loss_problem()
    linear_cross_entropy(x.requires_grad_(), weight.requires_grad_(), target, impl="chunked").backward()
    assert chunked_module.last_grad_w_path() == "fp32"


# ---- GPU layer: the self-checks for real ---------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")
def test_the_real_paths_pass_their_self_checks_on_this_gpu():
    """The CUDA kernel (bf16 and fp32, every compiled head size) agrees with the torch backend, and the
    chunked loss's bf16 gradient GEMMs with its fp32 path; so "auto" trusts them here."""
    from rwkvslice.ops.wkv7_cuda import CUDA_HEAD_SIZES

    problems = {
        (str(dtype), N): wkv7_selfcheck.check_wkv7(wkv7_cuda_module.wkv7_cuda, wkv7_torch, dtype, N, "cuda")
        for dtype in (torch.bfloat16, torch.float32)
        for N in CUDA_HEAD_SIZES
    }
    problems["chunked bf16"] = loss_selfcheck.check_low_precision_grad_gemm("cuda", torch.bfloat16)
    assert {k: v for k, v in problems.items() if v is not None} == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")
def test_the_chunked_loss_takes_the_fast_grad_w_path_on_cuda():
    """torch >= 2.8 has addmm(out_dtype=float32) for bf16 CUDA inputs (aten::addmm.dtype_out): grad_W
    accumulates straight into the fp32 buffer. Older torch upcasts (one n x V fp32 copy per chunk)."""
    x = torch.randn(64, 128, device="cuda", requires_grad=True)
    w = torch.randn(1000, 128, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (64,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        linear_cross_entropy(x, w, t, impl="chunked", chunk_size=16).backward()
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    assert chunked_module.last_grad_w_path() == ("addmm_fp32_out" if version >= (2, 8) else "upcast_fp32")
