"""rwkvslice.slicing against independent references.

Reference everywhere: float64 full logits (hidden @ W^T over every position) and
F.cross_entropy(ignore_index=-100), i.e. what the model would compute without slicing. Tolerances:
fp32 loss relative error < 1e-6, fp32 gradients < 1e-5 (max-normalised: max|a - b| / max|b|);
bf16 autocast 1e-2 (loss) and 3e-2 (gradients).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import rwkvslice.slicing.chunked as chunked_module
from rwkvslice.errors import RWKVSliceError
from rwkvslice.slicing import (
    SlicingError,
    choose_chunk_size,
    compute_dtype,
    linear_cross_entropy,
    resolve_impl,
    select_kept,
    sliced_cross_entropy,
    torch_chunked_available,
)

IGNORE = -100
NO_TORCH_LCE = "torch < 2.13 has no chunked F.linear_cross_entropy (LinearCrossEntropyOptions)"
IMPLS = [
    "chunked",
    pytest.param("torch", marks=pytest.mark.skipif(not torch_chunked_available(), reason=NO_TORCH_LCE)),
    "full",
]
LOSS_RTOL_FP32 = 1e-6
GRAD_RTOL_FP32 = 1e-5
LOSS_RTOL_BF16 = 1e-2
GRAD_RTOL_BF16 = 3e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| in float64 (for a scalar: the relative error)."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    assert scale > 0, "reference is all zeros; use an exact comparison instead"
    return (a - b).abs().max().item() / scale


def reference(hidden, weight, targets, num_items=None):
    """float64 full-logits masked CE and its gradients w.r.t. hidden and weight."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = h @ w.t()
    flat = logits.reshape(-1, w.shape[0])
    if num_items is None:
        loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="mean")
    else:
        loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum") / num_items
    loss.backward()
    return loss.detach(), h.grad, w.grad


def make_problem(B, T, C=24, V=97, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, C, generator=g) * scale).requires_grad_()
    weight = (torch.randn(V, C, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, targets, g


def keep_mask(pattern: str, B: int, T: int, g: torch.Generator) -> torch.Tensor:
    t = torch.arange(T)
    if pattern == "random":
        keep = torch.rand(B, T, generator=g) < 0.35
        keep[0, 0] = True
    elif pattern == "prompt_prefix":  # SFT: no loss on each row's prompt, loss on its response
        starts = torch.randint(1, T, (B, 1), generator=g)
        keep = t[None, :] >= starts
    elif pattern == "right_padding":  # rows of different lengths padded on the right
        lengths = torch.randint(1, T + 1, (B, 1), generator=g)
        keep = t[None, :] < lengths
    elif pattern == "prompt_and_padding":
        starts = torch.randint(0, T // 2, (B, 1), generator=g)
        ends = torch.randint(T // 2 + 1, T + 1, (B, 1), generator=g)
        keep = (t[None, :] >= starts) & (t[None, :] < ends)
    elif pattern == "single":
        keep = torch.zeros(B, T, dtype=torch.bool)
        keep[B - 1, T // 2] = True
    elif pattern == "all_kept":
        keep = torch.ones(B, T, dtype=torch.bool)
    else:
        raise AssertionError(pattern)
    return keep


def masked(targets, keep):
    return torch.where(keep, targets, torch.full_like(targets, IGNORE))


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


# ------------------------------------------------------------------------------ equality with full logits


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 1000])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "pattern", ["random", "prompt_prefix", "right_padding", "prompt_and_padding", "single", "all_kept"]
)
def test_sliced_loss_equals_full_logits_masked_ce(pattern, impl, chunk_size):
    """Value and gradients (hidden and head weight) equal float64 full-logits masked CE for every mask
    pattern, implementation and chunk size (incl. 4, which does not divide N, and 1000 > N)."""
    hidden, weight, targets, g = make_problem(3, 11)
    targets = masked(targets, keep_mask(pattern, 3, 11, g))
    loss = sliced_cross_entropy(hidden, weight, targets, impl=impl, chunk_size=chunk_size)
    gh, gw = grads(loss, hidden, weight)
    ref_loss, ref_gh, ref_gw = reference(hidden, weight, targets)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel(loss, ref_loss) < LOSS_RTOL_FP32
    assert rel(gh, ref_gh) < GRAD_RTOL_FP32
    assert rel(gw, ref_gw) < GRAD_RTOL_FP32
    # positions without loss get exactly zero gradient
    ignored = targets == IGNORE
    assert torch.count_nonzero(gh[ignored]) == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (6, 1), (1, 40)])
@pytest.mark.parametrize("pattern", ["random", "all_kept"])
def test_degenerate_shapes(shape, pattern, impl):
    """B = 1, T = 1 and both: same equality with the full-logits reference."""
    B, T = shape
    hidden, weight, targets, g = make_problem(B, T, seed=B * 100 + T)
    targets = masked(targets, keep_mask(pattern, B, T, g))
    loss = sliced_cross_entropy(hidden, weight, targets, impl=impl, chunk_size=3)
    gh, gw = grads(loss, hidden, weight)
    ref_loss, ref_gh, ref_gw = reference(hidden, weight, targets)
    assert rel(loss, ref_loss) < LOSS_RTOL_FP32
    assert rel(gh, ref_gh) < GRAD_RTOL_FP32
    assert rel(gw, ref_gw) < GRAD_RTOL_FP32


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 4),
    T=st.integers(1, 12),
    C=st.integers(1, 20),
    V=st.integers(2, 60),
    keep_prob=st.floats(0.05, 1.0),
    chunk_size=st.one_of(st.none(), st.integers(1, 20)),
    seed=st.integers(0, 2**16),
)
def test_property_chunked_equals_full_logits(B, T, C, V, keep_prob, chunk_size, seed):
    """Property: for any shape, mask density and chunk size, ours equals the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g, requires_grad=True)
    weight = torch.randn(V, C, generator=g, requires_grad=True)
    keep = torch.rand(B, T, generator=g) < keep_prob
    keep.view(-1)[torch.randint(0, B * T, (1,), generator=g)] = True
    targets = masked(torch.randint(0, V, (B, T), generator=g), keep)
    loss = sliced_cross_entropy(hidden, weight, targets, impl="chunked", chunk_size=chunk_size)
    gh, gw = grads(loss, hidden, weight)
    ref_loss, ref_gh, ref_gw = reference(hidden, weight, targets)
    assert rel(loss, ref_loss) < LOSS_RTOL_FP32
    assert rel(gh, ref_gh) < GRAD_RTOL_FP32
    assert rel(gw, ref_gw) < GRAD_RTOL_FP32


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_sums_and_skips_ignored_rows(impl):
    """linear_cross_entropy on flat rows: the SUM of per-row CE, rows with target -100 skipped."""
    hidden, weight, targets, g = make_problem(1, 30)
    targets = masked(targets, keep_mask("random", 1, 30, g))
    x, t = hidden[0], targets[0]
    loss = linear_cross_entropy(x, weight, t, impl=impl, chunk_size=7)
    n = int((t != IGNORE).sum())
    ref_loss, ref_gh, ref_gw = reference(hidden, weight, targets, num_items=1)
    assert rel(loss, ref_loss) < LOSS_RTOL_FP32
    gx, gw = grads(loss, x, weight)
    assert rel(gx, ref_gh[0]) < GRAD_RTOL_FP32
    assert rel(gw, ref_gw) < GRAD_RTOL_FP32
    assert n < 30  # the mask did drop rows


def test_float64_inputs_give_a_float64_loss():
    """fp64 hidden and weight compute in fp64 (tests and gradcheck-style use) and agree to 1e-12."""
    hidden, weight, targets, g = make_problem(2, 6)
    hidden = hidden.detach().double().requires_grad_()
    weight = weight.detach().double().requires_grad_()
    targets = masked(targets, keep_mask("random", 2, 6, g))
    loss = sliced_cross_entropy(hidden, weight, targets, chunk_size=2)
    gh, gw = grads(loss, hidden, weight)
    ref_loss, ref_gh, ref_gw = reference(hidden, weight, targets)
    assert loss.dtype == torch.float64
    assert rel(loss, ref_loss) < 1e-12 and rel(gh, ref_gh) < 1e-12 and rel(gw, ref_gw) < 1e-12


# ------------------------------------------------------------------------------------------- select_kept


def test_select_kept_gathers_rows_in_order_with_their_own_targets():
    """select_kept returns hidden[b, t] paired with targets[b, t] (no shift), in row-major order; its
    backward scatters into zeros."""
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3).requires_grad_()
    targets = torch.tensor([[5, IGNORE, 7, IGNORE], [IGNORE, IGNORE, 9, 4]])
    x, t = select_kept(hidden, targets)
    assert t.tolist() == [5, 7, 9, 4]
    expected_rows = [hidden[0, 0], hidden[0, 2], hidden[1, 2], hidden[1, 3]]
    assert torch.equal(x, torch.stack(expected_rows))
    (x * torch.arange(1, 5, dtype=torch.float32)[:, None]).sum().backward()
    expected = torch.zeros(2, 4, 3)
    expected[0, 0], expected[0, 2], expected[1, 2], expected[1, 3] = 1, 2, 3, 4
    assert torch.equal(hidden.grad, expected)


def test_select_kept_all_kept_is_a_view_and_accepts_int32_targets():
    """With every target kept the rows are hidden itself (no copy); int32 targets come back as int64."""
    hidden = torch.randn(2, 3, 4)
    targets = torch.randint(0, 9, (2, 3), dtype=torch.int32)
    x, t = select_kept(hidden, targets)
    assert x.data_ptr() == hidden.data_ptr() and x.shape == (6, 4)
    assert t.dtype == torch.int64 and t.tolist() == targets.reshape(-1).tolist()


# --------------------------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("impl", IMPLS)
def test_alignment_gradient_of_one_target_lands_on_its_own_row(impl):
    """With a single kept target at (b, t), the loss is CE(hidden[b, t] @ W^T, targets[b, t]) computed by
    hand, and only hidden[b, t] gets a gradient: an off-by-one pairing (t - 1 or t + 1) fails."""
    hidden, weight, targets, _ = make_problem(2, 5, seed=7)
    b, t, y = 1, 3, 42
    targets = torch.full((2, 5), IGNORE)
    targets[b, t] = y
    loss = sliced_cross_entropy(hidden, weight, targets, impl=impl)
    (gh,) = grads(loss, hidden)
    z = weight.detach().double() @ hidden.detach().double()[b, t]
    p = torch.softmax(z, 0)
    assert abs(loss.item() - (torch.logsumexp(z, 0) - z[y]).item()) < 1e-5
    onehot = torch.zeros_like(p)
    onehot[y] = 1
    expected_row = (p - onehot) @ weight.detach().double()
    nonzero_rows = torch.nonzero(gh.abs().sum(-1)).tolist()
    assert nonzero_rows == [[b, t]]
    assert rel(gh[b, t], expected_row) < GRAD_RTOL_FP32


# ------------------------------------------------------------------------------- normalisation, num_items


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_gradient_accumulation_over_uneven_micro_batches_equals_one_big_batch(impl, as_tensor):
    """Micro-batches with 1 and ~40 kept targets, each normalised by num_items = the global kept count,
    accumulate to exactly the big batch's loss and gradients (a per-micro-batch mean would not)."""
    hidden, weight, targets, g = make_problem(4, 16, seed=3)
    keep = keep_mask("random", 4, 16, g)
    keep[0] = False
    keep[0, 5] = True  # micro-batch 1 (row 0): a single kept target
    keep[1:] = torch.rand(3, 16, generator=g) < 0.9  # micro-batch 2 (rows 1-3): most kept
    targets = masked(targets, keep)
    total = int(keep.sum())
    num_items = torch.tensor(total) if as_tensor else total

    big = sliced_cross_entropy(hidden, weight, targets, impl=impl)
    big_gh, big_gw = grads(big, hidden, weight)

    accumulated = 0.0
    naive = 0.0
    for rows in (slice(0, 1), slice(1, 4)):
        part = sliced_cross_entropy(hidden[rows], weight, targets[rows], num_items=num_items, impl=impl)
        part.backward()
        accumulated += part.item()
        naive += sliced_cross_entropy(hidden[rows], weight, targets[rows], impl=impl).item()
    assert abs(accumulated - big.item()) / big.item() < LOSS_RTOL_FP32 * 5
    assert rel(hidden.grad, big_gh) < GRAD_RTOL_FP32
    assert rel(weight.grad, big_gw) < GRAD_RTOL_FP32
    assert abs(naive / 2 - big.item()) / big.item() > 1e-2  # the uneven split matters here


def test_num_items_must_cover_the_kept_targets():
    """An int num_items smaller than this batch's kept count is a counting bug: SlicingError."""
    hidden, weight, targets, _ = make_problem(1, 4)
    with pytest.raises(SlicingError, match="num_items"):
        sliced_cross_entropy(hidden, weight, targets, num_items=3)
    loss = sliced_cross_entropy(hidden, weight, targets, num_items=8)
    ref_loss, _, _ = reference(hidden, weight, targets, num_items=8)
    assert rel(loss, ref_loss) < LOSS_RTOL_FP32


# ------------------------------------------------------------------------------------ all-ignored batch


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_items", [None, 0, 7, "tensor"])
def test_all_ignored_batch_is_a_connected_exact_zero(impl, num_items):
    """No kept target: the loss is exactly 0.0 (not NaN), still in the graph of hidden and the head
    weight, and backward gives both exact, finite zero gradients (so DDP's hooks fire on every rank)."""
    hidden, weight, _, _ = make_problem(2, 5)
    targets = torch.full((2, 5), IGNORE)
    items = torch.tensor(0.0) if num_items == "tensor" else num_items
    loss = sliced_cross_entropy(hidden, weight, targets, num_items=items, impl=impl)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert loss.requires_grad and loss.grad_fn is not None
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


# ----------------------------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_with_fp32_master_weight(impl, hidden_dtype):
    """Under CPU autocast(bf16) with an fp32 master weight: GEMMs in bf16, loss within 1e-2 and
    gradients within 3e-2 of the float64 reference; gradients come back in the inputs' dtypes."""
    hidden, weight, targets, g = make_problem(3, 20, C=64, V=300, seed=5)
    targets = masked(targets, keep_mask("prompt_prefix", 3, 20, g))
    h = hidden.detach().to(hidden_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(h, weight) == torch.bfloat16
        loss = sliced_cross_entropy(h, weight, targets, impl=impl, chunk_size=8)
    gh, gw = grads(loss, h, weight)
    ref_loss, ref_gh, ref_gw = reference(h, weight, targets)
    assert loss.dtype == torch.float32
    assert gh.dtype == hidden_dtype and gw.dtype == torch.float32
    assert rel(loss, ref_loss) < LOSS_RTOL_BF16
    assert rel(gh, ref_gh) < GRAD_RTOL_BF16
    assert rel(gw, ref_gw) < GRAD_RTOL_BF16


def test_bf16_hidden_with_fp32_weight_without_autocast_computes_in_fp32():
    """bf16 hidden + fp32 master weight outside autocast: promoted to fp32 (exact to fp32 tolerance on
    the bf16 values), weight gradient fp32, hidden gradient bf16."""
    hidden, weight, targets, g = make_problem(2, 9, seed=11)
    targets = masked(targets, keep_mask("random", 2, 9, g))
    h = hidden.detach().bfloat16().requires_grad_()
    assert compute_dtype(h, weight) == torch.float32
    loss = sliced_cross_entropy(h, weight, targets, chunk_size=4)
    gh, gw = grads(loss, h, weight)
    ref_loss, ref_gh, ref_gw = reference(h, weight, targets)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    assert rel(loss, ref_loss) < LOSS_RTOL_FP32
    assert rel(gw, ref_gw) < GRAD_RTOL_FP32
    assert rel(gh, ref_gh) < 1e-2  # only the final rounding to bf16


def _confident_problem(N=16, base_channels=32, V=200, margin=10.0):
    """Rows whose target logit is max(other logits) + margin, with every value exact in bf16.

    x = [random {-1, 0, 1} features | one-hot row id]; W = [random quarters | per-row bias column that
    lifts only row n's target class]. Products of {-1,0,1} and quarters sum exactly, so the bf16 logits
    equal the exact ones and any error is the loss's own. grad_W[y_n, base + n] = d loss / d logit[n, y_n]
    isolates each row's true-class gradient p_y - 1 (divided by N).
    """
    g = torch.Generator().manual_seed(9)
    C = base_channels + N
    x = torch.zeros(N, C)
    x[:, :base_channels] = torch.randint(-1, 2, (N, base_channels), generator=g).float()
    x[:, base_channels:] = torch.eye(N)
    w = torch.zeros(V, C)
    w[:, :base_channels] = torch.randint(-2, 3, (V, base_channels), generator=g).float() / 4
    targets = torch.randperm(V, generator=g)[:N]
    logits = x @ w.t()
    for n in range(N):
        others = torch.cat([logits[n, : targets[n]], logits[n, targets[n] + 1 :]])
        w[targets[n], base_channels + n] = others.max() + margin - logits[n, targets[n]]
    assert torch.equal(x.bfloat16().float(), x) and torch.equal(w.bfloat16().float(), w)
    return x, w, targets, base_channels


def _true_class_grads(gw, targets, base_channels):
    return torch.stack([gw[y, base_channels + n] for n, y in enumerate(targets.tolist())])


def test_confident_logits_keep_an_accurate_true_class_gradient():
    """Target logit = max + 10 (softmax_y -> 1): in bf16 autocast our true-class gradient p_y - 1 stays
    within 1e-4 relative of float64 (no cancellation), no worse than torch's own bf16 path plus 1e-4,
    and the tiny loss is accurate to 1e-4 relative."""
    x, w, targets, base = _confident_problem()
    N = x.shape[0]
    z = x.double() @ w.double().t()
    p_y = torch.softmax(z, 1)[torch.arange(N), targets]
    exact_true = (p_y - 1) / N
    exact_loss = (torch.logsumexp(z, 1) - z[torch.arange(N), targets]).mean()
    assert p_y.min() > 0.99  # confident
    errors = {}
    for impl in ["chunked", "full"]:
        weight = w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(x, weight, targets, impl=impl, chunk_size=5) / N
        loss.backward()
        true = _true_class_grads(weight.grad, targets, base)
        errors[impl] = ((true.double() - exact_true).abs() / exact_true.abs()).max().item()
        if impl == "chunked":
            assert abs(loss.item() - exact_loss.item()) / exact_loss.item() < 1e-4
    assert errors["chunked"] < 1e-4
    assert errors["chunked"] <= errors["full"] + 1e-4


# ------------------------------------------------------------------------------- upstream gradient != 1


@pytest.mark.parametrize("impl", IMPLS)
def test_non_uniform_upstream_gradient(impl):
    """Two losses sharing the head weight, combined as 2.5 * L1 - 0.7 * L2, plus an explicit
    grad_output of -3: gradients scale exactly like the reference (the stored forward-pass gradients
    are multiplied by the upstream gradient)."""
    h1, weight, t1, g = make_problem(2, 8, seed=21)
    h2, _, t2, _ = make_problem(3, 5, seed=22)
    t1 = masked(t1, keep_mask("random", 2, 8, g))
    l1 = sliced_cross_entropy(h1, weight, t1, impl=impl, chunk_size=3)
    l2 = sliced_cross_entropy(h2, weight, t2, impl=impl, chunk_size=3)
    (2.5 * l1 - 0.7 * l2).backward()
    _, r1h, r1w = reference(h1, weight, t1)
    _, r2h, r2w = reference(h2, weight, t2)
    assert rel(h1.grad, 2.5 * r1h) < GRAD_RTOL_FP32
    assert rel(h2.grad, -0.7 * r2h) < GRAD_RTOL_FP32
    assert rel(weight.grad, 2.5 * r1w - 0.7 * r2w) < GRAD_RTOL_FP32

    x = h2.detach().reshape(-1, h2.shape[-1]).requires_grad_()
    total = linear_cross_entropy(x, weight, t2.reshape(-1), impl=impl, chunk_size=4)
    gx, gw = torch.autograd.grad(total, (x, weight), grad_outputs=torch.tensor(-3.0))
    _, rh, rw = reference(h2, weight, t2, num_items=1)
    assert rel(gx, -3.0 * rh.reshape(-1, h2.shape[-1])) < GRAD_RTOL_FP32
    assert rel(gw, -3.0 * rw) < GRAD_RTOL_FP32


# ----------------------------------------------------------------------------------- errors and options


@pytest.mark.parametrize("bad", [97, 500, -1, -101])
def test_out_of_range_targets_raise_a_clear_error(bad):
    """A target >= V or negative other than -100 raises SlicingError (an RWKVSliceError and ValueError)
    naming the position and the vocab size, from both entry points and every impl."""
    hidden, weight, targets, _ = make_problem(2, 4, V=97)
    targets[1, 2] = bad
    with pytest.raises(SlicingError, match=r"targets\[\[1, 2\]\] = .* vocab_size 97") as info:
        sliced_cross_entropy(hidden, weight, targets)
    assert isinstance(info.value, RWKVSliceError) and isinstance(info.value, ValueError)
    for impl in ["chunked", "full"] + (["torch"] if torch_chunked_available() else []):
        with pytest.raises(SlicingError, match=r"target\[6\]"):
            linear_cross_entropy(hidden.reshape(-1, 24), weight, targets.reshape(-1), impl=impl)
    expected = (
        f"targets[[1, 2]] = {bad} is out of range for vocab_size 97 (expected 0..96, or -100 for no loss)"
    )
    assert str(info.value) == expected


def test_bad_arguments_raise_slicing_error():
    hidden, weight, targets, _ = make_problem(2, 4)
    with pytest.raises(SlicingError, match="impl"):
        sliced_cross_entropy(hidden, weight, targets, impl="fast")
    with pytest.raises(SlicingError, match="chunk_size"):
        sliced_cross_entropy(hidden, weight, targets, chunk_size=0)
    with pytest.raises(SlicingError, match=r"targets \(2, 3\)"):
        sliced_cross_entropy(hidden, weight, targets[:, :3])
    with pytest.raises(SlicingError, match="channels"):
        linear_cross_entropy(hidden[0], weight[:, :5], targets[0])
    with pytest.raises(SlicingError, match="integer"):
        select_kept(hidden, targets.float())


@pytest.mark.skipif(torch_chunked_available(), reason="this torch has F.linear_cross_entropy options")
def test_impl_torch_on_old_torch_is_a_clear_error():
    hidden, weight, targets, _ = make_problem(1, 3)
    with pytest.raises(SlicingError, match="torch >= 2.13"):
        sliced_cross_entropy(hidden, weight, targets, impl="torch")


def _spy_forward(monkeypatch):
    calls = []
    real = chunked_module._forward

    def spy(x, weight, target, chunk_size, dtype, need_grad_x, need_grad_w):
        out = real(x, weight, target, chunk_size, dtype, need_grad_x, need_grad_w)
        calls.append((need_grad_x, need_grad_w, out[1] is not None, out[2] is not None))
        return out

    monkeypatch.setattr(chunked_module, "_forward", spy)
    return calls


def test_only_needed_gradients_are_computed(monkeypatch):
    """The chunked forward computes grad_x / grad_W only for inputs that need them, and none under
    no_grad; the loss value is the same in every case."""
    calls = _spy_forward(monkeypatch)
    hidden, weight, targets, _ = make_problem(2, 6)
    ref_loss, ref_gh, ref_gw = reference(hidden, weight, targets)
    with torch.no_grad():
        loss = sliced_cross_entropy(hidden, weight, targets, impl="chunked")
    assert loss.grad_fn is None and rel(loss, ref_loss) < LOSS_RTOL_FP32
    h_only = sliced_cross_entropy(hidden, weight.detach(), targets, impl="chunked")
    (gh,) = grads(h_only, hidden)
    w_only = sliced_cross_entropy(hidden.detach(), weight, targets, impl="chunked")
    (gw,) = grads(w_only, weight)
    assert calls == [(False, False, False, False), (True, False, True, False), (False, True, False, True)]
    assert rel(gh, ref_gh) < GRAD_RTOL_FP32 and rel(gw, ref_gw) < GRAD_RTOL_FP32


def test_second_backward_is_refused():
    """Gradients are computed in forward and handed over once: a second backward (retain_graph) raises
    instead of returning already-consumed buffers."""
    hidden, weight, targets, _ = make_problem(2, 3)
    loss = sliced_cross_entropy(hidden, weight, targets, impl="chunked")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_chunk_size_rule():
    """Chunk logits about half the fp32 V x C gradient accumulator: n = 2C / bytes per logit (fp32 4,
    bf16 2 + its fp32 copy 4), at least 32 rows, at most N."""
    assert choose_chunk_size(4096, 65536, 512) == 256
    assert choose_chunk_size(4096, 65536, 512, torch.bfloat16) == 170
    assert choose_chunk_size(4096, 65536, 512, torch.float64) == 128
    assert choose_chunk_size(100, 65536, 512) == 100
    assert choose_chunk_size(4096, 65536, 32) == 32
    assert choose_chunk_size(0, 65536, 512) == 1


# ------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_bf16_autocast_matches_reference(impl):
    """On CUDA under autocast(bf16) (the low-precision gradient GEMMs, grad_W accumulated in fp32):
    loss within 1e-2 and gradients within 3e-2 of the float64 reference, fp32 master-weight gradient."""
    hidden, weight, targets, g = make_problem(4, 64, C=128, V=1000, seed=5)
    targets = masked(targets, keep_mask("prompt_and_padding", 4, 64, g))
    h = hidden.detach().cuda().requires_grad_()
    w = weight.detach().cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = sliced_cross_entropy(h, w, targets.cuda(), impl=impl, chunk_size=50)
    gh, gw = grads(loss, h, w)
    ref_loss, ref_gh, ref_gw = reference(hidden, weight, targets)
    assert gw.dtype == torch.float32
    assert rel(loss.cpu(), ref_loss) < LOSS_RTOL_BF16
    assert rel(gh.cpu(), ref_gh) < GRAD_RTOL_BF16
    assert rel(gw.cpu(), ref_gw) < GRAD_RTOL_BF16


@pytest.mark.gpu
def test_cuda_confident_logits_no_worse_than_torch_bf16():
    """On CUDA the logits gradient goes through bf16 GEMMs, so the true-class gradient carries bf16
    rounding; computed in fp32 first it must still be no worse than twice torch's own bf16 path + 1e-3
    (Liger's criterion is 4x), far from the 100 % error of a bf16 p_y - 1."""
    x, w, targets, base = _confident_problem()
    N = x.shape[0]
    z = x.double() @ w.double().t()
    exact_true = (torch.softmax(z, 1)[torch.arange(N), targets] - 1) / N
    errors = {}
    for impl in ["chunked", "full"]:
        weight = w.cuda().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy(x.cuda(), weight, targets.cuda(), impl=impl, chunk_size=5) / N
        loss.backward()
        true = _true_class_grads(weight.grad.cpu(), targets, base)
        errors[impl] = ((true.double() - exact_true).abs() / exact_true.abs()).max().item()
    assert errors["chunked"] <= 2 * errors["full"] + 1e-3


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_low_precision_gradient_gemm_branch_on_cpu(monkeypatch, hidden_dtype):
    """The CUDA branch (dlogits cast to bf16 into the logits buffer, bf16 gradient GEMMs, fp32 grad_W
    accumulator; CPU has no fp32-out addmm, so its fallback runs) forced on CPU: same tolerances as the
    bf16 autocast test, so the CUDA code path is checked on CPU CI too."""
    monkeypatch.setattr(chunked_module, "LOW_PRECISION_GRAD_GEMM_DEVICES", ("cpu", "cuda"))
    hidden, weight, targets, g = make_problem(3, 20, C=64, V=300, seed=5)
    targets = masked(targets, keep_mask("prompt_prefix", 3, 20, g))
    h = hidden.detach().to(hidden_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sliced_cross_entropy(h, weight, targets, impl="chunked", chunk_size=8)
    gh, gw = grads(loss, h, weight)
    ref_loss, ref_gh, ref_gw = reference(h, weight, targets)
    assert gh.dtype == hidden_dtype and gw.dtype == torch.float32
    assert rel(loss, ref_loss) < LOSS_RTOL_BF16
    assert rel(gh, ref_gh) < GRAD_RTOL_BF16
    assert rel(gw, ref_gw) < GRAD_RTOL_BF16


def test_low_precision_branch_is_fp16_safe_with_uniform_logits(monkeypatch):
    """A zero head (all logits equal) over V = 70000 classes: sum_{j != y} exp(z_j - m) = V - 1 exceeds
    fp16's 65504, so the low-precision copy of dlogits must be normalised first. Loss log V, finite
    gradients equal to the reference within fp16 tolerance (1e-2)."""
    monkeypatch.setattr(chunked_module, "LOW_PRECISION_GRAD_GEMM_DEVICES", ("cpu", "cuda"))
    V, C = 70000, 4
    x = torch.randn(3, C, requires_grad=True)
    weight = torch.zeros(V, C, requires_grad=True)
    targets = torch.tensor([0, 5, V - 1])
    with torch.autocast("cpu", dtype=torch.float16):
        loss = linear_cross_entropy(x, weight, targets, impl="chunked")
    gx, gw = grads(loss, x, weight)
    ref_loss, ref_gh, ref_gw = reference(x[None], weight, targets[None], num_items=1)
    assert torch.isfinite(gw).all() and torch.isfinite(gx).all()
    assert rel(loss, ref_loss) < 1e-2 and abs(loss.item() - 3 * torch.log(torch.tensor(float(V)))) < 1e-2
    assert rel(gw, ref_gw) < 1e-2


# ------------------------------------------------------------------- wiring found by mutation testing
# Each test below kills mutants that every test above let through (reports/mutation.md). References are
# hand-computed values or the float64 full-logits reference, never the code under test.


def test_resolve_impl_names_the_implementation_that_runs():
    """The "auto" impl is ours ("chunked"), every other name stands for itself, an unknown one lists all."""
    assert resolve_impl("auto") == "chunked"
    assert resolve_impl("chunked") == "chunked"
    assert resolve_impl("full") == "full"
    if torch_chunked_available():
        assert resolve_impl("torch") == "torch"
    with pytest.raises(SlicingError, match=r"^impl must be one of auto, chunked, torch, full, got 'fast'$"):
        resolve_impl("fast")


def test_torch_impl_needs_both_linear_cross_entropy_and_its_options(monkeypatch):
    """torch's chunked path needs F.linear_cross_entropy AND nn.LinearCrossEntropyOptions; without
    either, torch_chunked_available() is False and impl="torch" is a SlicingError naming torch >= 2.13."""
    with monkeypatch.context() as m:
        m.delattr(torch.nn, "LinearCrossEntropyOptions", raising=False)
        assert not torch_chunked_available()
        with pytest.raises(
            SlicingError, match=r"^impl='torch' needs F\.linear_cross_entropy .*\(torch >= 2\.13\)"
        ):
            resolve_impl("torch")
    with monkeypatch.context() as m:
        m.delattr(F, "linear_cross_entropy", raising=False)
        assert not torch_chunked_available()


@pytest.mark.parametrize("impl", ["auto"] + IMPLS)
def test_each_impl_runs_its_own_path_with_the_requested_chunk_size(monkeypatch, impl):
    """The impl argument picks the path that runs (our chunked forward, torch's F.linear_cross_entropy,
    or full logits + F.cross_entropy) and chunk_size reaches it; the value still equals the reference."""
    ours, theirs = [], []
    real_forward, real_lce = chunked_module._forward, getattr(F, "linear_cross_entropy", None)

    def spy_forward(x, weight, target, chunk_size, *rest):
        ours.append(chunk_size)
        return real_forward(x, weight, target, chunk_size, *rest)

    def spy_lce(*args, options=None, **kwargs):
        theirs.append(options.batch_chunk_size if options is not None else "no options")
        return real_lce(*args, options=options, **kwargs)

    monkeypatch.setattr(chunked_module, "_forward", spy_forward)
    if real_lce is not None:
        monkeypatch.setattr(F, "linear_cross_entropy", spy_lce)
    hidden, weight, targets, _ = make_problem(1, 12)
    loss = linear_cross_entropy(hidden[0], weight, targets[0], impl=impl, chunk_size=5)
    ref_loss, _, _ = reference(hidden, weight, targets, num_items=1)
    assert rel(loss, ref_loss) < LOSS_RTOL_FP32
    expected = {"auto": ([5], []), "chunked": ([5], []), "torch": ([], [5]), "full": ([], [])}[impl]
    assert (ours, theirs) == expected
    if impl == "full":
        assert type(loss.grad_fn).__name__ == "NllLossBackward0"


def test_default_impl_of_linear_cross_entropy_is_ours(monkeypatch):
    """linear_cross_entropy without impl= runs the chunked path (the "auto" default)."""
    calls = _spy_forward(monkeypatch)
    hidden, weight, targets, _ = make_problem(1, 6)
    loss = linear_cross_entropy(hidden[0], weight, targets[0])
    ref_loss, _, _ = reference(hidden, weight, targets, num_items=1)
    assert rel(loss, ref_loss) < LOSS_RTOL_FP32 and len(calls) == 1


@pytest.mark.parametrize(
    ("rows", "channels", "dtype", "expected"),
    [
        (100, 16, torch.float32, 32),
        (300, 512, torch.bfloat16, 170),
        (300, 512, torch.float64, 128),
        (20, 512, torch.float32, 20),
    ],
)
def test_default_chunk_size_follows_the_rule_for_the_compute_dtype(
    monkeypatch, rows, channels, dtype, expected
):
    """Without chunk_size the chunked path gets 2C / bytes-per-logit rows (fp32 4, bf16 2 + 4, fp64 8),
    at least 32, at most N; hand values: C=16 -> 32 (floor), bf16 C=512 -> 2048 // 12 = 170, fp64 ->
    128, N=20 -> 20."""
    seen = []
    real_forward = chunked_module._forward

    def spy(x, weight, target, chunk_size, *rest):
        seen.append(chunk_size)
        return real_forward(x, weight, target, chunk_size, *rest)

    monkeypatch.setattr(chunked_module, "_forward", spy)
    x = torch.randn(rows, channels, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    weight = torch.randn(5, channels, dtype=x.dtype)
    target = torch.randint(0, 5, (rows,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        linear_cross_entropy(x, weight, target, impl="chunked")
    assert seen == [expected]
    assert choose_chunk_size(1, 65536, 512) == 1  # never more rows than N, even for N = 1


def test_argument_errors_name_the_problem():
    """Each shape / dtype check raises SlicingError with its own message (shapes as given)."""
    hidden, weight, targets, _ = make_problem(2, 4)
    x, t = hidden.reshape(8, 24), targets.reshape(8)
    with pytest.raises(SlicingError, match=r"^x must be \(N, C\), got shape \(2, 4, 24\)$"):
        linear_cross_entropy(hidden, weight, t)
    with pytest.raises(SlicingError, match=r"^weight must be \(V, C\), got shape \(24,\)$"):
        linear_cross_entropy(x, weight[0], t)
    with pytest.raises(SlicingError, match=r"^target must be \(8,\) to match x, got shape \(5,\)$"):
        linear_cross_entropy(x, weight, t[:5])
    with pytest.raises(SlicingError, match=r"^target must hold integer token ids, got dtype torch.float32$"):
        linear_cross_entropy(x, weight, t.float())
    with pytest.raises(SlicingError, match=r"^target must hold integer token ids, got dtype torch.bool$"):
        linear_cross_entropy(x, weight, t > 3)
    with pytest.raises(SlicingError, match=r"^hidden must be \(B, T, C\), got shape \(8, 24\)$"):
        select_kept(x, targets)
    with pytest.raises(SlicingError, match=r"^targets \(2, 3\) must have hidden's \(B, T\) = \(2, 4\)$"):
        select_kept(hidden, targets[:, :3])


def test_second_backward_message_is_exact():
    hidden, weight, targets, _ = make_problem(1, 3)
    loss = sliced_cross_entropy(hidden, weight, targets, impl="chunked")
    loss.backward(retain_graph=True)
    message = (
        "chunked linear_cross_entropy: backward ran twice; its gradients are computed in forward and handed "
        "over once (retain_graph is not supported)"
    )
    with pytest.raises(RuntimeError) as info:
        loss.backward()
    assert str(info.value) == message


@pytest.mark.parametrize("impl", IMPLS)
def test_upstream_gradient_of_exactly_two_scales_the_gradients(impl):
    """grad_output = 2 (the one value next to the skip-if-1 shortcut): gradients are twice the reference."""
    hidden, weight, targets, _ = make_problem(1, 7, seed=4)
    x = hidden.detach()[0].requires_grad_()
    total = linear_cross_entropy(x, weight, targets[0], impl=impl, chunk_size=3)
    gx, gw = torch.autograd.grad(total, (x, weight), grad_outputs=torch.tensor(2.0))
    _, rh, rw = reference(hidden, weight, targets, num_items=1)
    assert rel(gx, 2.0 * rh[0]) < GRAD_RTOL_FP32 and rel(gw, 2.0 * rw) < GRAD_RTOL_FP32


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_inputs_give_a_float64_loss_for_every_impl(impl):
    """fp64 hidden and weight: a float64 loss equal to the float64 reference to 1e-12, every impl."""
    hidden, weight, targets, g = make_problem(2, 6)
    hidden = hidden.detach().double().requires_grad_()
    weight = weight.detach().double().requires_grad_()
    targets = masked(targets, keep_mask("random", 2, 6, g))
    loss = sliced_cross_entropy(hidden, weight, targets, chunk_size=2, impl=impl)
    gh, gw = grads(loss, hidden, weight)
    ref_loss, ref_gh, ref_gw = reference(hidden, weight, targets)
    assert loss.dtype == torch.float64
    assert rel(loss, ref_loss) < 1e-12 and rel(gh, ref_gh) < 1e-12 and rel(gw, ref_gw) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_weight_with_fp32_hidden_computes_in_fp32(impl):
    """A bf16 head with fp32 hidden (no autocast) promotes to fp32: fp32 tolerances against the float64
    reference on the bf16 weight values; the weight gradient comes back in bf16 (max-normalised 1e-2:
    only its final rounding)."""
    hidden, weight, targets, g = make_problem(2, 9, seed=12)
    targets = masked(targets, keep_mask("random", 2, 9, g))
    w = weight.detach().bfloat16().requires_grad_()
    loss = sliced_cross_entropy(hidden, w, targets, impl=impl, chunk_size=4)
    gh, gw = grads(loss, hidden, w)
    ref_loss, ref_gh, ref_gw = reference(hidden, w, targets)
    assert loss.dtype == torch.float32 and gh.dtype == torch.float32 and gw.dtype == torch.bfloat16
    assert rel(loss, ref_loss) < LOSS_RTOL_FP32
    assert rel(gh, ref_gh) < GRAD_RTOL_FP32
    assert rel(gw, ref_gw) < 1e-2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("hidden_dtype", "weight_dtype", "loss_dtype"),
    [(torch.float64, torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16, torch.float32)],
)
def test_all_ignored_batch_zero_has_the_loss_dtype(impl, hidden_dtype, weight_dtype, loss_dtype):
    """The connected exact zero of an all-ignored batch has the dtype a real loss would have: fp64 for
    fp64 inputs, fp32 for bf16 ones; gradients are exact zeros in the inputs' dtypes."""
    hidden, weight, _, _ = make_problem(2, 3)
    h = hidden.detach().to(hidden_dtype).requires_grad_()
    w = weight.detach().to(weight_dtype).requires_grad_()
    loss = sliced_cross_entropy(h, w, torch.full((2, 3), IGNORE), impl=impl)
    assert loss.dtype == loss_dtype and loss.item() == 0.0
    gh, gw = grads(loss, h, w)
    assert torch.equal(gh, torch.zeros_like(h)) and torch.equal(gw, torch.zeros_like(w))


@pytest.mark.parametrize(
    "items", [torch.tensor(40, dtype=torch.int64), torch.tensor(40.0, dtype=torch.float64)]
)
def test_tensor_num_items_keeps_an_fp32_loss(items):
    """A tensor num_items (int64 or fp64, e.g. an all-reduced count) divides the fp32 sum without
    promoting the loss to its dtype: fp32, equal to sum / 40 of the float64 reference."""
    hidden, weight, targets, _ = make_problem(2, 6)
    loss = sliced_cross_entropy(hidden, weight, targets, num_items=items)
    ref_loss, _, _ = reference(hidden, weight, targets, num_items=40)
    assert loss.dtype == torch.float32 and rel(loss, ref_loss) < LOSS_RTOL_FP32


@pytest.mark.parametrize("impl", ["chunked", "full"])
def test_zero_channels_give_log_vocab_per_row(impl):
    """C = 0: every logit is 0, so each kept row costs exactly log V (hand value 3 log 5), not the
    all-ignored zero."""
    loss = linear_cross_entropy(torch.zeros(3, 0), torch.zeros(5, 0), torch.tensor([0, 4, 2]), impl=impl)
    assert abs(loss.item() - 3 * math.log(5)) < 1e-6


def _fake_fp32_out_addmm(monkeypatch, supported=(torch.bfloat16,), accumulate=True):
    """Replace torch.addmm by what a CUDA build with addmm(out_dtype=float32) does, on CPU: for `supported`
    2-D input dtypes, out (fp32, same shape) = input + mat1 @ mat2 in fp32. Any other call behaves like
    torch's own checks: TypeError for a missing / non-tensor argument, RuntimeError for a wrong shape or
    dtype. accumulate=False models a broken kernel that drops `input` (beta = 0). Returns the list of
    input dtypes of the fp32-out calls."""
    real = torch.addmm
    calls = []

    def addmm(input, mat1, mat2, *, out_dtype=None, out=None):
        if out_dtype is None:
            return real(input, mat1, mat2, out=out) if out is not None else real(input, mat1, mat2)
        if not all(isinstance(t, torch.Tensor) for t in (input, mat1, mat2)):
            raise TypeError("addmm: expected tensors")
        if out_dtype != torch.float32 or mat1.dtype not in supported or mat2.dtype not in supported:
            raise RuntimeError(f"addmm: out_dtype {out_dtype} not supported for {mat1.dtype} inputs")
        if mat1.dim() != 2 or mat2.dim() != 2:
            raise RuntimeError("addmm: mat1 and mat2 must be matrices")
        res = mat1.float() @ mat2.float()
        if accumulate:
            res = input.float() + res
        calls.append(mat1.dtype)
        if out is None:
            return res
        if out.dtype != torch.float32 or out.shape != res.shape:
            raise RuntimeError("addmm: out must be fp32 with the result's shape")
        return out.copy_(res)

    monkeypatch.setattr(torch, "addmm", addmm)
    monkeypatch.setattr(chunked_module, "_FP32_OUT_ADDMM", {})
    return calls


def test_fp32_out_addmm_probe(monkeypatch):
    """_has_fp32_out_addmm says True only where addmm(out_dtype=float32, out=fp32) accumulates
    1 + [1 1] @ [1 1]^T = 3 for that input dtype: False on this CPU torch (no addmm.dtype_out), True /
    False per dtype on a device that has it for bf16 only (answers cached per device and dtype), False
    for a kernel that overwrites instead of accumulating."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(chunked_module, "_FP32_OUT_ADDMM", {})
    assert chunked_module._has_fp32_out_addmm(cpu, torch.bfloat16) is False

    calls = _fake_fp32_out_addmm(monkeypatch, supported=(torch.bfloat16,))
    assert chunked_module._has_fp32_out_addmm(cpu, torch.bfloat16) is True
    assert chunked_module._has_fp32_out_addmm(cpu, torch.float16) is False
    assert chunked_module._has_fp32_out_addmm(cpu, torch.bfloat16) is True
    assert calls == [torch.bfloat16]  # probed once per (device, dtype); fp16 was refused before the call

    _fake_fp32_out_addmm(monkeypatch, supported=(torch.bfloat16,), accumulate=False)
    assert chunked_module._has_fp32_out_addmm(cpu, torch.bfloat16) is False


def test_fp32_out_addmm_branch_on_cpu(monkeypatch):
    """The CUDA branch where grad_W accumulates bf16 GEMMs into fp32 via addmm(out_dtype=float32), run on
    CPU with that addmm emulated: one fp32-out addmm per chunk (after the probe), and loss / gradients
    within the bf16 tolerances of the float64 reference."""
    monkeypatch.setattr(chunked_module, "LOW_PRECISION_GRAD_GEMM_DEVICES", ("cpu", "cuda"))
    calls = _fake_fp32_out_addmm(monkeypatch, supported=(torch.bfloat16,))
    monkeypatch.setenv("RWKVSLICE_SKIP_SELFCHECK", "1")  # count this loss's addmm calls only (no self-check)
    hidden, weight, targets, g = make_problem(3, 20, C=64, V=300, seed=5)
    targets = masked(targets, keep_mask("prompt_prefix", 3, 20, g))
    kept = int((targets != IGNORE).sum())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sliced_cross_entropy(hidden, weight, targets, impl="chunked", chunk_size=8)
    gh, gw = grads(loss, hidden, weight)
    ref_loss, ref_gh, ref_gw = reference(hidden, weight, targets)
    assert calls == [torch.bfloat16] * (1 + -(-kept // 8))
    assert gw.dtype == torch.float32
    assert rel(loss, ref_loss) < LOSS_RTOL_BF16
    assert rel(gh, ref_gh) < GRAD_RTOL_BF16
    assert rel(gw, ref_gw) < GRAD_RTOL_BF16


@pytest.mark.parametrize("impl", IMPLS)
def test_int32_targets_are_accepted_by_linear_cross_entropy(impl):
    """int32 target ids (not only int64) work in every impl and give the float64 reference's sum (torch
    2.5's gather / cross_entropy only take int64 indices, so the ids must be converted)."""
    hidden, weight, targets, g = make_problem(1, 9, seed=6)
    targets = masked(targets, keep_mask("random", 1, 9, g))
    loss = linear_cross_entropy(hidden[0], weight, targets[0].to(torch.int32), impl=impl, chunk_size=4)
    ref_loss, _, _ = reference(hidden, weight, targets, num_items=1)
    assert rel(loss, ref_loss) < LOSS_RTOL_FP32
