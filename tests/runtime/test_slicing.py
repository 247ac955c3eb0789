"""rwkvslice.slicing against independent references.

Reference everywhere: float64 full logits (hidden @ W^T over every position) and
F.cross_entropy(ignore_index=-100), i.e. what the model would compute without slicing. Tolerances:
fp32 loss relative error < 1e-6, fp32 gradients < 1e-5 (max-normalised: max|a - b| / max|b|);
bf16 autocast 1e-2 (loss) and 3e-2 (gradients).
"""

from __future__ import annotations

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
