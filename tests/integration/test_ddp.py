"""DDP on CPU (gloo, file:// rendezvous): 2 ranks x batch b == 1 rank x batch 2b.

Workers are processes (forks of the test process, cli_runs.py) with RANK/WORLD_SIZE set the way torchrun
sets them, a file:// rendezvous (RWKVSLICE_DIST_INIT: no port races), a collective timeout, and a hard
wall-clock limit after which the test kills them; they are always reaped.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
import torch
from cli_runs import fork, run_in_process
from safetensors.torch import load_file

from rwkvslice.data import DemoTask
from rwkvslice.train.distributed import DistEnv
from rwkvslice.train.step import LossModule, train_step

pytestmark = [pytest.mark.ddp, pytest.mark.component("Training Loop")]

WORLD = 2

# One optimizer step on this rank's half of a fixed batch, with 2 accumulation micro-batches of uneven
# kept counts; writes the gradients (before the update) and the weights (after it). SGD with lr 1 makes
# the weight change equal the gradient, so weights can be compared as tightly as gradients (AdamW's
# first step, lr*g/(|g|+eps), would amplify fp32 noise in near-zero gradients; the CLI test below
# covers AdamW end to end).
STEP_WORKER = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import save_file
    from rwkvslice.train.distributed import setup_distributed, teardown_distributed
    from rwkvslice.train.step import LossModule, train_step
    sys.path.insert(0, sys.argv[2])
    from test_ddp import make_batch, make_model, snapshot_grads_at_step

    out = sys.argv[1]
    env = setup_distributed("cpu")
    try:
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        ddp = torch.nn.parallel.DistributedDataParallel(LossModule(model))
        idx, targets = make_batch()
        half = idx.shape[0] // env.world_size
        mine = slice(env.rank * half, (env.rank + 1) * half)
        idx, targets = idx[mine], targets[mine]
        grads = snapshot_grads_at_step(model, opt)
        micro = [(idx[:1], targets[:1]), (idx[1:], targets[1:])]
        stats = train_step(ddp, opt, micro, env, grad_clip=0.0)
        save_file({**{"w." + k: v.contiguous() for k, v in model.state_dict().items()},
                   **{"g." + k: v.contiguous() for k, v in grads.items()},
                   "loss": torch.tensor([stats.loss]), "kept": torch.tensor([stats.kept_tokens])},
                  f"{out}/rank{env.rank}.safetensors")
    finally:
        teardown_distributed(env)
""")


def make_model():
    from rwkvslice import RWKV7, RWKV7Config

    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(vocab_size=96, n_embd=64, n_layer=2, head_size=32))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every layer contributes (the official init zeroes output projections)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def snapshot_grads_at_step(model, opt) -> dict:
    """Gradients as the optimizer sees them (after DDP's all-reduce), captured inside opt.step()."""
    grads = {}
    real_step = opt.step

    def step(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
        return real_step(*args, **kwargs)

    opt.step = step
    return grads


def make_batch():
    g = torch.Generator().manual_seed(2)
    b, t = 2 * WORLD, 16
    idx = torch.randint(1, 96, (b, t), generator=g)
    targets = torch.randint(1, 96, (b, t), generator=g)
    keep = torch.rand(b, t, generator=g) < torch.tensor([0.9, 0.2, 0.5, 0.05])[:, None]  # uneven per rank
    return idx, torch.where(keep, targets, torch.full_like(targets, -100))


def launch(tmp_path, argv_for_rank, timeout=180, world=WORLD):
    """Start `world` ranks (WORLD unless told), wait, always reap. Returns their (returncode, stderr).

    `argv_for_rank(rank)` is a command line `[sys.executable, "-c", SCRIPT, ...]` or `[sys.executable, "-m",
    "rwkvslice.cli", ...]`; each rank runs it as a fork of this process (cli_runs.fork: no fresh
    interpreter's imports), with torchrun's environment variables."""
    rdzv = tmp_path / "rdzv"
    procs = []
    try:
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                       RWKVSLICE_DIST_INIT=f"file://{rdzv}", RWKVSLICE_DIST_TIMEOUT="120",
                       OMP_NUM_THREADS="1")  # as torchrun does: one thread per rank on a 2-core box
            argv = argv_for_rank(rank)
            assert argv[0] == sys.executable, argv[:1]
            procs.append(fork(argv[1:], env=env))
        results = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, err) for p, (_, err) in zip(procs, results)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


def test_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path):
    here = os.path.dirname(__file__)
    results = launch(tmp_path, lambda r: [sys.executable, "-c", STEP_WORKER, str(tmp_path), here])
    for rc, err in results:
        assert rc == 0, err[-3000:]

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    grads = snapshot_grads_at_step(model, opt)
    idx, targets = make_batch()
    stats = train_step(LossModule(model), opt, [(idx, targets)], DistEnv(0, 1, 0, torch.device("cpu")))

    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    for r in ranks:
        assert int(r["kept"]) == stats.kept_tokens == int((targets != -100).sum())
        assert float(r["loss"]) == pytest.approx(stats.loss, rel=1e-6)
    for n, p in model.named_parameters():
        for r in ranks:
            # fp32 sums in a different order (all-reduce vs one batch): 1e-5 relative to the tensor's norm
            err = ((r["g." + n].double() - grads[n].double()).norm() / grads[n].double().norm()).item()
            assert err < 1e-5, (n, err)
            torch.testing.assert_close(r["w." + n], p.detach(), rtol=1e-5, atol=1e-7, msg=f"weight {n}")
    # the ranks hold identical weights (DDP's averaged gradients are the same everywhere)
    for k in ranks[0]:
        if k.startswith("w."):
            assert torch.equal(ranks[0][k], ranks[1][k]), k


def ranks_vs_one_process(tmp_path, common, steps=3):
    """`rwkvslice train COMMON` on WORLD ranks at batch 4 each (torchrun's env) and in this process at batch
    8: both must succeed and log the same steps, tokens, kept tokens and losses (rel 1e-5: fp32 sums in
    another order). Returns the two run directories."""
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    results = launch(tmp_path, lambda r: [sys.executable, "-m", "rwkvslice.cli", "train", "--out", str(ddp_out),
                                          "--batch-size", "4", *common])
    for rc, err in results:
        assert rc == 0, err[-3000:]
    run_in_process(["train", "--out", single_out, "--batch-size", "8", *common])  # cli_runs.py

    def recs(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    ddp, single = recs(ddp_out), recs(single_out)
    assert [r["step"] for r in ddp] == list(range(1, steps + 1))
    for a, b in zip(ddp, single, strict=True):
        assert a["tokens"] == b["tokens"] and a["kept_tokens"] == b["kept_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    return ddp_out, single_out


def assert_tensors_close_after_adamw(a: dict, b: dict) -> None:
    """Per tensor, norm-relative < 1e-3. Adam divides each gradient by its running RMS, so an element whose
    gradient is at float-noise level (e.g. att.key right after the zero-initialised att.output starts to
    move) can take a +-lr step on one side and not the other when the all-reduce sums in another order.
    Such elements are few; a real normalisation bug (a factor of world_size, a wrong num_items) moves
    every element by O(lr) and fails this by orders of magnitude."""
    assert a.keys() == b.keys() and a
    for k in a:
        err = ((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-12)).item()
        assert err < 1e-3, (k, err)


@pytest.mark.slow  # 2 rank processes + one run in this process: integration runs it; the torch matrix skips it
def test_cli_under_torchrun_env_matches_single_process(tmp_path):
    """`rwkvslice train` with torchrun's env: rank 0 alone writes; losses equal a 1-process 2b run."""
    data = DemoTask(seed=4).write_jsonl(tmp_path / "train.jsonl", 64, "train")
    common = ["--data", str(data), "--model", "demo", "--ctx-len", "32", "--steps", "3", "--lr", "2e-3",
              "--warmup-steps", "1", "--no-progress", "--device", "cpu"]
    ddp_out, single_out = ranks_vs_one_process(tmp_path, common)
    run = json.loads((ddp_out / "checkpoints" / "step-00000003" / "run.json").read_text())
    assert run["world_size"] == 2
    assert_tensors_close_after_adamw(
        load_file(str(ddp_out / "checkpoints" / "step-00000003" / "rwkvslice_model.safetensors")),
        load_file(str(single_out / "checkpoints" / "step-00000003" / "rwkvslice_model.safetensors")))
