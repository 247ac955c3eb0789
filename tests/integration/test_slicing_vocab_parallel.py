"""slicing.vocab_parallel on 3 gloo ranks (file:// rendezvous, through test_ddp's launcher): a head weight
that is a DTensor sharded by rows, never gathered, against an fp64 full-logits reference of the whole
weight computed here in one process.

What each rank must get, for loss_s = sum of CE over rank s's kept rows / divisor_s and c_s the factor
rank s back-propagates with (1 in plain use, world as the trainer does):
- its own loss_s;
- grad x_s = c_s * d loss_s / d x_s (its rows affect only its loss);
- its rows of grad W = 1/world * sum_s c_s * d loss_s / dW (the mean over ranks, as data-parallel
  training averages gradients), as a DTensor sharded like W.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_ddp import launch

pytestmark = [pytest.mark.ddp, pytest.mark.component("Loss Computation")]

WORLD = 3
# name: vocab, channels, kept rows per rank, chunk rows, logit scale, trainer-style (num_items = all ranks'
# kept rows, backward of loss * world) or plain (num_items None: each rank divides by its own count,
# backward of loss), autocast bf16
CASES = {
    # 103 rows over 3 ranks: 35, 35, 33; rank 1 has no kept row; 4-row chunks: 3 chunks, the last partial
    "trainer_fp32": dict(vocab=103, channels=16, rows=(5, 0, 7), chunk=4, scale=1.0, trainer=True, bf16=False),
    "plain_fp32": dict(vocab=103, channels=16, rows=(6, 3, 1), chunk=None, scale=1.0, trainer=False, bf16=False),
    # logits up to ~+-60: each rank's local max differs a lot from the global one, many rows confident
    "confident_fp32": dict(vocab=64, channels=8, rows=(4, 4, 4), chunk=5, scale=12.0, trainer=True, bf16=False),
    # 4 rows over 3 ranks in torch.chunk's split: 2, 2 and none for rank 2
    "empty_shard_fp32": dict(vocab=4, channels=8, rows=(3, 2, 2), chunk=None, scale=1.0, trainer=True, bf16=False),
    "trainer_bf16": dict(vocab=103, channels=16, rows=(5, 2, 7), chunk=4, scale=1.0, trainer=True, bf16=True),
}

WORKER = textwrap.dedent("""
    import json, sys, torch
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    sys.path.insert(0, sys.argv[2])
    from test_slicing_vocab_parallel import CASES, case_data
    from rwkvslice.slicing import SlicingError, linear_cross_entropy, sliced_cross_entropy
    from rwkvslice.train.distributed import setup_distributed, teardown_distributed

    out = sys.argv[1]
    env = setup_distributed("cpu")
    r, world = env.rank, env.world_size
    try:
        mesh = init_device_mesh("cpu", (world,))

        def sharded(w):
            return torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))

        for name, case in CASES.items():
            w_full, xs, ts = case_data(name)
            w = sharded(w_full)
            x = xs[r].clone().requires_grad_(True)
            num_items = sum(int((t != -100).sum()) for t in ts) if case["trainer"] else None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case["bf16"]):
                loss = sliced_cross_entropy(x[None], w, ts[r][None], num_items=num_items, chunk_size=case["chunk"])
            (loss * world if case["trainer"] else loss).backward()
            # forward only (held-out eval): the same loss
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case["bf16"]):
                again = sliced_cross_entropy(xs[r][None], w, ts[r][None], num_items=num_items, chunk_size=case["chunk"])
            save_file({"loss": loss.detach().reshape(1), "again": again.reshape(1), "grad_x": x.grad,
                       "grad_w": w.grad.to_local().contiguous(),
                       "grad_w_global_shape": torch.tensor(list(w.grad.shape))},
                      f"{out}/{name}-rank{r}.safetensors")
            with open(f"{out}/{name}-rank{r}.json", "w") as f:
                json.dump({"placements": str(w.grad.placements), "dtype": str(w.grad.dtype)}, f)

        # nothing kept on any rank: an exact 0 and zero gradients, on every rank
        w_full, xs, ts = case_data("plain_fp32")
        w, x = sharded(w_full), xs[r].clone().requires_grad_(True)
        loss = sliced_cross_entropy(x[None], w, torch.full_like(ts[r], -100)[None])
        loss.backward()
        save_file({"loss": loss.detach().reshape(1), "grad_x": x.grad, "grad_w": w.grad.to_local().contiguous()},
                  f"{out}/none-rank{r}.safetensors")

        errors = {}
        w = sharded(w_full)
        loss = linear_cross_entropy(xs[r].clone().requires_grad_(True), w, ts[r])
        try:  # ranks scaling their losses differently: refused (on every rank), not a wrong gradient
            (loss * (r + 1)).backward()
        except RuntimeError as exc:
            errors["unequal"] = str(exc)
        loss = linear_cross_entropy(xs[r].clone().requires_grad_(True), sharded(w_full), ts[r])
        loss.backward(retain_graph=True)
        try:  # the gradients were handed over by the first backward
            loss.backward()
        except RuntimeError as exc:
            errors["twice"] = str(exc)
        try:  # the full-logits impl would need the whole weight
            linear_cross_entropy(xs[r], w, ts[r], impl="full")
        except SlicingError as exc:
            errors["impl"] = str(exc)
        with open(f"{out}/errors-rank{r}.json", "w") as f:
            json.dump(errors, f)
    finally:
        teardown_distributed(env)
""")


def case_data(name: str):
    """(W (V, C) fp32, each rank's hidden rows, each rank's targets with -100s): the same on every rank."""
    case = CASES[name]
    g = torch.Generator().manual_seed(sorted(CASES).index(name) + 1)
    vocab, channels = case["vocab"], case["channels"]
    w = torch.randn(vocab, channels, generator=g) * case["scale"] / channels**0.5
    xs, ts = [], []
    for kept in case["rows"]:
        rows = kept + 2  # two ignored rows in each rank's batch
        xs.append(torch.randn(rows, channels, generator=g))
        t = torch.randint(0, vocab, (rows,), generator=g)
        t[torch.randperm(rows, generator=g)[:2]] = -100
        if vocab > 2 * WORLD:  # targets on both sides of a shard border too
            border = -(-vocab // WORLD)
            first = torch.nonzero(t != -100).squeeze(1)[:2]
            t[first] = torch.tensor([border - 1, border])[: len(first)]
        ts.append(t)
    return w, xs, ts


def reference(name: str):
    """fp64, full logits: (loss per rank, grad x per rank, grad W) as the module docstring defines them."""
    case = CASES[name]
    w_full, xs, ts = case_data(name)
    w = w_full.double().requires_grad_(True)
    xs = [x.double().requires_grad_(True) for x in xs]
    total_kept = sum(int((t != -100).sum()) for t in ts)
    losses = []
    for x, t in zip(xs, ts, strict=True):
        ce = F.cross_entropy(x @ w.t(), t, reduction="sum", ignore_index=-100)
        losses.append(ce / (total_kept if case["trainer"] else max(int((t != -100).sum()), 1)))
    factor = WORLD if case["trainer"] else 1
    sum(loss * factor for loss in losses).backward()
    return [loss.item() for loss in losses], [x.grad for x in xs], w.grad / WORLD


@pytest.fixture(scope="module")
def ranks_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab_parallel")
    here = str(__import__("pathlib").Path(__file__).parent)
    results = launch(tmp, lambda r: [sys.executable, "-c", WORKER, str(tmp), here], world=WORLD)
    for rc, err in results:
        assert rc == 0, err[-3000:]
    return tmp


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative difference (0 when both are zero)."""
    denom = b.double().norm().item()
    return (a.double() - b.double()).norm().item() / denom if denom else a.double().norm().item()


@pytest.mark.parametrize("name", list(CASES))
def test_each_rank_gets_its_loss_its_rows_gradient_and_its_shard_of_the_mean_weight_gradient(ranks_run, name):
    """Against fp64 full logits: fp32 losses to 1e-6 relative and gradients to 1e-5 (norm-relative);
    bf16 autocast (x and W rounded to bf16 for the GEMMs) losses to 1e-2 and gradients to 3e-2. The weight
    gradient arrives as this rank's rows (torch.chunk's split), a DTensor sharded like W, fp32."""
    case = CASES[name]
    ref_losses, ref_gx, ref_gw = reference(name)
    vocab = case["vocab"]
    per = -(-vocab // WORLD)
    loss_tol, grad_tol = (1e-2, 3e-2) if case["bf16"] else (1e-6, 1e-5)
    shards = []
    for r in range(WORLD):
        got = load_file(str(ranks_run / f"{name}-rank{r}.safetensors"))
        meta = json.loads((ranks_run / f"{name}-rank{r}.json").read_text())
        assert meta == {"placements": "(Shard(dim=0),)", "dtype": "torch.float32"}, meta
        assert got["grad_w_global_shape"].tolist() == [vocab, case["channels"]]
        assert got["loss"].item() == pytest.approx(ref_losses[r], rel=loss_tol, abs=1e-12)
        assert torch.equal(got["again"], got["loss"])  # no_grad scores the same rows the same way
        assert _rel(got["grad_x"], ref_gx[r]) < grad_tol, (r, _rel(got["grad_x"], ref_gx[r]))
        rows = slice(min(r * per, vocab), min((r + 1) * per, vocab))
        assert got["grad_w"].shape[0] == rows.stop - rows.start
        shards.append(got["grad_w"])
        if got["grad_w"].numel():
            assert _rel(got["grad_w"], ref_gw[rows]) < grad_tol, (r, _rel(got["grad_w"], ref_gw[rows]))
    assert _rel(torch.cat(shards), ref_gw) < grad_tol  # every row of W, once
    if name == "empty_shard_fp32":
        assert shards[2].shape[0] == 0


def test_nothing_kept_anywhere_is_an_exact_zero_with_zero_gradients(ranks_run):
    for r in range(WORLD):
        got = load_file(str(ranks_run / f"none-rank{r}.safetensors"))
        assert got["loss"].item() == 0.0
        assert not got["grad_x"].any() and not got["grad_w"].any()


def test_unequal_loss_scales_a_second_backward_and_whole_weight_impls_are_refused_on_every_rank(ranks_run):
    for r in range(WORLD):
        errors = json.loads((ranks_run / f"errors-rank{r}.json").read_text())
        assert "scaled differently before backward ([1.0, 2.0, 3.0])" in errors["unequal"], errors
        assert errors["impl"].startswith("impl='full' needs the whole weight"), errors
        assert "backward ran twice" in errors["twice"], errors
