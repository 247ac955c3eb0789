"""FSDP2 (`--shard fsdp`) on CPU: 2 gloo ranks (file:// rendezvous, timeouts, always reaped, through
test_ddp's launcher) against one process with the whole batch, exact resume after SIGKILL, export.

Where this torch's FSDP2 cannot run on CPU (torch 2.5: CUDA only), the tests that need it are skipped
and `test_torch_without_cpu_fsdp2_refuses_with_one_line` checks the refusal instead (the torch matrix
runs it on 2.5.1).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_ddp import WORLD, launch, make_model

from rwkvslice.data import DemoTask
from rwkvslice.train.distributed import DistEnv
from rwkvslice.train.step import LossModule, train_step

pytestmark = [pytest.mark.ddp, pytest.mark.component("Sharding (FSDP)")]

# Independent of the code under test: the torch releases whose FSDP2 runs on CPU (public
# torch.distributed.fsdp.fully_shard, 2.6 on).
TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
CPU_FSDP = TORCH_VERSION >= (2, 6)
needs_cpu_fsdp = pytest.mark.skipif(not CPU_FSDP, reason=f"torch {torch.__version__}: FSDP2 runs only on "
                                    "CUDA; test_torch_without_cpu_fsdp2_refuses_with_one_line covers it")

STEPS = 3
KINDS = ("full", "lora", "state")  # what trains: everything, LoRA adapters (+ the norms), the initial state
CLIP = {"full": 0.05, "lora": 0.05, "state": 0.01}  # below each kind's gradient norms: the clip acts

# Several optimizer steps (SGD, so weights can be compared as tightly as gradients; the CLI tests below
# cover AdamW), each of 2 accumulation micro-batches of uneven kept counts and an active clip, on this
# rank's half of fixed batches, for each of KINDS; the full model with grad checkpointing per 8-token
# segment (each block runs twice per forward; the reference runs without). Before training, the sharded
# full model evaluates the held-out windows (uneven batches over the ranks). Writes the losses, clip
# norms, gathered final weights, each rank's local parameter / optimizer-state bytes and the eval result.
STEP_WORKER = textwrap.dedent("""
    import json, sys, torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from rwkvslice.train import sharding
    from rwkvslice.train.distributed import setup_distributed, teardown_distributed
    from rwkvslice.train.evaluate import evaluate_loss
    sys.path.insert(0, sys.argv[2])
    from test_fsdp import CLIP, KINDS, batches, eval_windows, model_for, optimizer_for
    from rwkvslice.train.step import train_step

    out = sys.argv[1]
    env = setup_distributed("cpu")
    try:
        for kind in KINDS:
            model = model_for(kind)
            if kind == "full":
                model.grad_checkpointing, model.grad_checkpoint_len = True, 8  # 2 segments: blocks run twice
            sharding.shard_model(model, env)
            if kind == "full":
                res = evaluate_loss(model, eval_windows(), batch_size=2, env=env)
                with open(f"{out}/eval{env.rank}.json", "w") as f:
                    json.dump(res.__dict__, f)
            opt = optimizer_for(model)
            loss_module = sharding.ShardedLossModule(model)
            losses, norms = [], []
            for idx, targets in batches():
                mine = slice(env.rank * idx.shape[0] // env.world_size, (env.rank + 1) * idx.shape[0] // env.world_size)
                idx, targets = idx[mine], targets[mine]
                stats = train_step(loss_module, opt, [(idx[:1], targets[:1]), (idx[1:], targets[1:])], env,
                                   grad_clip=CLIP[kind])
                losses.append(stats.loss)
                norms.append(stats.grad_norm)
            if kind == "full":
                # one more step whose loss is infinite on rank 1 only: every rank must skip it (the final
                # weights below are then those of the 3 steps)
                real = loss_module.forward
                if env.rank == 1:
                    loss_module.forward = lambda *a: real(*a) * float("inf")
                stats = train_step(loss_module, opt, [(idx, targets)], env, grad_clip=CLIP[kind])
                with open(f"{out}/nonfinite{env.rank}.txt", "w") as f:
                    f.write(f"{stats.applied} {stats.nonfinite}")
            sizes = sharding.local_state_bytes(model, opt)
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if env.rank == 0:
                save_file({k: v.contiguous() for k, v in full.items()}, f"{out}/{kind}-weights.safetensors")
            save_file({"loss": torch.tensor(losses), "norm": torch.tensor(norms),
                       **{k: torch.tensor([v]) for k, v in sizes.items()}}, f"{out}/{kind}-rank{env.rank}.safetensors")
    finally:
        teardown_distributed(env)
""")


def batches():
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(STEPS):
        b, t = 2 * WORLD, 16
        idx = torch.randint(1, 96, (b, t), generator=g)
        targets = torch.randint(1, 96, (b, t), generator=g)
        keep = torch.rand(b, t, generator=g) < torch.tensor([0.9, 0.2, 0.5, 0.05])[:, None]
        out.append((idx, torch.where(keep, targets, torch.full_like(targets, -100))))
    return out


def eval_windows():
    """9 held-out windows: 5 batches of 2 (the last of 1), rank 0 scoring batches 0, 2, 4 and rank 1
    batches 1 and 3, of which batch 3 has no kept target: rank 1 has one batch to score against rank 0's
    three, so without its two extra forwards (batch 3 and a padding one) rank 0 would wait forever."""
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(1, 96, (9, 16), generator=g)
    targets = torch.randint(1, 96, (9, 16), generator=g)
    targets[:, :8] = -100
    targets[6:8] = -100
    return list(zip(idx, targets, strict=True))


def model_for(kind: str):
    from rwkvslice.peft.tuning import TuneSpec, prepare

    model = make_model()
    if kind != "full":
        torch.manual_seed(11)  # the LoRA A factors' init
        prepare(model, TuneSpec(kind=kind, lora_r=4, lora_alpha=8.0, train_also=("ln",) if kind == "lora" else ()))
        if kind == "state":  # a nonzero start, so the state's gradient is not the same at every layer
            with torch.no_grad():
                model.initial_state.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    return model


def optimizer_for(model):
    # state tuning: larger steps (its gradients are small), as the trainer's STATE_LR default
    lr = 5.0 if model.initial_state is not None else 0.5
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    if not CPU_FSDP:
        pytest.skip(f"torch {torch.__version__}: FSDP2 runs only on CUDA")
    tmp = tmp_path_factory.mktemp("fsdp")
    here = os.path.dirname(__file__)
    results = launch(tmp, lambda r: [sys.executable, "-c", STEP_WORKER, str(tmp), here])
    for rc, err in results:
        assert rc == 0, err[-3000:]
    return tmp


def _reference(kind: str):
    """One unsharded process, the whole batch: (start weights, final model, losses, clip norms)."""
    model = model_for(kind)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = optimizer_for(model)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    losses, norms = [], []
    for idx, targets in batches():
        stats = train_step(LossModule(model), opt, [(idx, targets)], env, grad_clip=CLIP[kind])
        losses.append(stats.loss)
        norms.append(stats.grad_norm)
    assert all(n > CLIP[kind] for n in norms), norms  # the clip really acts on every step
    return start, model, losses, norms


def _check_like_reference(fsdp_run, kind: str) -> None:
    start, model, ref_losses, ref_norms = _reference(kind)
    for r in range(WORLD):
        ranks = load_file(str(fsdp_run / f"{kind}-rank{r}.safetensors"))
        torch.testing.assert_close(ranks["loss"], torch.tensor(ref_losses), rtol=1e-6, atol=0)
        torch.testing.assert_close(ranks["norm"], torch.tensor(ref_norms), rtol=1e-5, atol=0)
    got = load_file(str(fsdp_run / f"{kind}-weights.safetensors"))
    assert got.keys() == model.state_dict().keys()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    moved = 0
    for k, ref in model.state_dict().items():
        if k not in trainable:  # frozen: exactly the base, on both sides
            assert torch.equal(got[k], start[k]) and torch.equal(ref, start[k]), k
            continue
        diff = (got[k].double() - ref.double()).norm()
        # per tensor, relative to the weights' norm (measured: at most 2e-8; fp32 sums in another order)
        assert (diff / ref.double().norm()).item() < 1e-5, k
        # and relative to the change the 3 steps made, which a normalisation or sync bug gets wrong by
        # O(1): measured at most 1.5e-4, for tensors whose change is ~1e-5 of their norm, so the fp32
        # rounding of the weights themselves is ~1e-3 of the change there
        delta = (ref - start[k]).double().norm()
        if delta > 0:
            moved += 1
            assert (diff / delta).item() < 1e-3, k
    assert moved >= len(trainable) // 2  # most tensors moved (the official init leaves a few at zero gradient)
    return trainable


def test_two_ranks_equal_one_process_with_twice_the_batch(fsdp_run):
    """Losses per step and final weights of FSDP 2 x b (accumulation 2, clipping, grad checkpointing)
    equal one unsharded process with batch 2b; a non-finite loss on one rank is skipped by all."""
    _check_like_reference(fsdp_run, "full")
    # the step with an infinite loss on rank 1 only was skipped by both ranks
    assert (fsdp_run / "nonfinite1.txt").read_text() == "False loss (micro-batch 1)"
    assert (fsdp_run / "nonfinite0.txt").read_text().startswith("False ")


@pytest.mark.parametrize("kind", ["lora", "state"])
def test_tuned_two_ranks_equal_one_process_with_twice_the_batch(fsdp_run, kind):
    """LoRA (+ the norms via --train-also ln) and state tuning under FSDP: the frozen base sharded and
    untouched, the trainable tensors (and only they) equal one process with the whole batch."""
    trainable = _check_like_reference(fsdp_run, kind)
    if kind == "lora":
        assert any(k.endswith("lora_A") for k in trainable) and "ln_out.weight" in trainable
        assert "blocks.0.att.key.weight" not in trainable
    else:
        assert trainable == {"initial_state"}
    # the optimizer holds momentum for the trainable tensors only, sharded: each rank about half of them
    ranks = [load_file(str(fsdp_run / f"{kind}-rank{r}.safetensors")) for r in range(WORLD)]
    numel = sum(p.numel() for n, p in model_for(kind).named_parameters() if n in trainable)
    assert sum(int(r["optim_local"]) for r in ranks) == 4 * numel


def test_held_out_eval_under_fsdp_equals_one_process(fsdp_run):
    """evaluate_loss on the sharded model (5 batches over 2 ranks: uneven, one with no kept target) ends
    on every rank (no hang: every rank runs 3 forwards; the launch times out otherwise) with one process's
    loss and counts."""
    from rwkvslice.train.evaluate import evaluate_loss

    ref = evaluate_loss(make_model(), eval_windows(), batch_size=2)
    assert ref.tokens == 7 * 8 and ref.batches == 5
    for r in range(WORLD):
        got = json.loads((fsdp_run / f"eval{r}.json").read_text())
        assert (got["tokens"], got["windows"], got["batches"]) == (ref.tokens, 9, 5)
        assert got["loss"] == pytest.approx(ref.loss, rel=1e-6)  # the CE sums are added in another order


def test_each_rank_holds_half_of_the_parameters_and_optimizer_state(fsdp_run):
    """From the local shards: each rank holds about 1/world_size of the parameter and optimizer bytes
    (FSDP2 shards dim 0 in ceil-sized pieces, so small (1, 1, C) tensors land on rank 0 whole)."""
    ranks = [load_file(str(fsdp_run / f"full-rank{r}.safetensors")) for r in range(WORLD)]
    full = sum(p.numel() * 4 for p in make_model().parameters())
    for kind, total in (("params", full), ("optim", full)):  # SGD momentum: one fp32 buffer per parameter
        local = [int(r[f"{kind}_local"]) for r in ranks]
        assert all(int(r[f"{kind}_full"]) == total for r in ranks)
        assert sum(local) == total, (kind, local, total)  # every byte is somewhere, once
        for n in local:
            assert abs(n / total - 1 / WORLD) < 0.02, (kind, local, total)


# What each all-gather, all-reduce and reduce-scatter of a step is, seen from torch.distributed's own
# functions (which FSDP2 calls by module attribute): every all-gather's output size and every all-reduce's
# size, whether any all-gather output buffer is still alive while the sliced loss runs (weak references),
# and that gloo's reduce-scatter, which copies its whole input, is not used. 2 optimizer steps of 2
# accumulation micro-batches each, with --reshard-after-forward on and off. The embedding and the head
# (V x C each) dominate this model.
COMM_WORKER = textwrap.dedent("""
    import json, sys, time, warnings, weakref, torch
    import torch.distributed as dist
    import rwkvslice.slicing as slicing
    from rwkvslice import RWKV7, RWKV7Config
    from rwkvslice.train import sharding
    from rwkvslice.train.distributed import setup_distributed, teardown_distributed
    from rwkvslice.train.optim import build_optimizer
    from rwkvslice.train.step import train_step

    out = sys.argv[1]
    env = setup_distributed("cpu")
    gathers, buffers, alive_in_loss, gloo_reduce_scatters, depth, reduces = [], [], [], [], [0], []
    real_loss, real_all_reduce = slicing.sliced_cross_entropy, dist.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        reduces.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    def counted(real):  # torch 2.13's FSDP2 calls all_gather_single, older ones all_gather_into_tensor
        def all_gather(output_tensor, input_tensor, *args, **kwargs):
            if depth[0] == 0:  # (one of them may call the other)
                gathers.append(output_tensor.numel())
                buffers.append(weakref.ref(output_tensor))
            depth[0] += 1
            try:
                return real(output_tensor, input_tensor, *args, **kwargs)
            finally:
                depth[0] -= 1
        return all_gather

    def gloo_reduce_scatter(*args, **kwargs):
        gloo_reduce_scatters.append(1)
        raise AssertionError("gloo's reduce_scatter was used")

    def sliced_cross_entropy(*args, **kwargs):
        # gloo's worker thread may still hold a finished all-gather's work (and its output) for an instant
        # after wait() returns; a buffer FSDP itself keeps stays alive for the whole loss
        deadline = time.monotonic() + 2.0
        while any(ref() is not None for ref in buffers) and time.monotonic() < deadline:
            time.sleep(0.001)
        alive_in_loss.append(sum(ref() is not None for ref in buffers))
        return real_loss(*args, **kwargs)

    for name in ("all_gather_single", "all_gather_into_tensor"):
        if hasattr(dist, name):
            setattr(dist, name, counted(getattr(dist, name)))
    dist.reduce_scatter_tensor = dist.reduce_scatter_single = gloo_reduce_scatter
    dist.all_reduce = all_reduce
    slicing.sliced_cross_entropy = sliced_cross_entropy
    res = {}
    caught = warnings.catch_warnings(record=True)  # with the filters in force, as a user's run has them
    seen = caught.__enter__()
    try:
        for reshard in (True, False):
            gathers.clear(); buffers.clear(); alive_in_loss.clear(); reduces.clear()
            torch.manual_seed(0)
            model = RWKV7(RWKV7Config(vocab_size=4096, n_embd=32, n_layer=2, head_size=16))
            sharding.shard_model(model, env, reshard_after_forward=reshard)
            opt = build_optimizer(model, lr=1e-3, weight_decay=0.0)
            loss_module = sharding.ShardedLossModule(model)
            g = torch.Generator().manual_seed(env.rank)
            for _ in range(2):
                idx = torch.randint(1, 4096, (2, 16), generator=g)
                tgt = torch.randint(1, 4096, (2, 16), generator=g)
                train_step(loss_module, opt, [(idx[:1], tgt[:1]), (idx[1:], tgt[1:])], env, grad_clip=1.0)
            res[str(reshard)] = {"gathers": list(gathers), "alive_in_loss": list(alive_in_loss),
                                 "reduces": list(reduces)}
        res["gloo_reduce_scatters"] = len(gloo_reduce_scatters)
        res["warnings"] = [str(w.message) for w in seen]
        with open(f"{out}/comm{env.rank}.json", "w") as f:
            json.dump(res, f)
    finally:
        teardown_distributed(env)
""")


@needs_cpu_fsdp
def test_embedding_is_gathered_once_per_forward_the_head_never_and_no_gather_buffer_outlives_it(tmp_path):
    """The embedding (V x C) costs one all-gather per micro-batch (forward only: its backward does not read
    its weight) and one gradient reduction per step, whatever --reshard-after-forward says. The head (V x C)
    costs neither: its loss is vocabulary-parallel, so no all-gather carries a tenth of its rows, and only
    the embedding's V x C gradient is reduced. Blocks are gathered again for backward only when resharding
    is on. No all-gather's flat output buffer (a second copy of the unit) is alive while the loss runs.
    Gradients go through the in-place all-reduce, not gloo's reduce-scatter (the equality tests above check
    their values). And FSDP2's view-output warning does not reach the user."""
    from torch.distributed.fsdp import FSDPModule

    results = launch(tmp_path, lambda r: [sys.executable, "-c", COMM_WORKER, str(tmp_path)])
    for rc, err in results:
        assert rc == 0, err[-3000:]
    vocab_by_channels = 4096 * 32
    blocks = block_gather_numels(n_embd=32, n_layer=2, head_size=16)
    for rank in range(WORLD):
        res = json.loads((tmp_path / f"comm{rank}.json").read_text())
        steps, micro_batches = 2, 2 * 2
        for reshard, block_gathers in (("True", 2), ("False", 1)):  # per block and micro-batch
            gathers = res[reshard]["gathers"]
            assert gathers.count(vocab_by_channels) == micro_batches, (reshard, gathers)  # the embedding only
            # the loss's own all-gathers carry hidden rows and per-row statistics, never rows of the head
            others = [g for g in gathers if g != vocab_by_channels and g not in blocks]
            assert max(others) < vocab_by_channels // 10, gathers
            for numel in set(blocks):
                expected = blocks.count(numel) * block_gathers * micro_batches
                assert gathers.count(numel) == expected, (reshard, numel, gathers)
            assert res[reshard]["alive_in_loss"] == [0] * micro_batches, (reshard, res[reshard])
            # gradient reductions (the in-place all-reduce): the embedding's once per step (none on the
            # no-sync micro-batch), the head's never
            assert res[reshard]["reduces"].count(vocab_by_channels) == steps, (reshard, res[reshard]["reduces"])
        # FSDP2's warning of view outputs (blocks pass v_first on: sharding.py explains why it is silenced)
        assert not [w for w in res["warnings"] if "returned a view tensor" in w], res["warnings"]
        if hasattr(FSDPModule, "set_custom_reduce_scatter"):  # torch >= 2.8
            assert res["gloo_reduce_scatters"] == 0


def block_gather_numels(n_embd: int, n_layer: int, head_size: int) -> list[int]:
    """Elements each block's all-gather carries: its parameters, each one's dim 0 padded to a multiple
    of the world size (FSDP2's flat buffer). Block 0 also has ln0, so it differs from the others."""
    from rwkvslice import RWKV7, RWKV7Config

    with torch.device("meta"):
        model = RWKV7(RWKV7Config(vocab_size=8, n_embd=n_embd, n_layer=n_layer, head_size=head_size))
    return [sum(-(-p.shape[0] // WORLD) * WORLD * (p.numel() // p.shape[0]) for p in block.parameters())
            for block in model.blocks]


def test_torch_without_cpu_fsdp2_refuses_with_one_line(tmp_path):
    """`--shard fsdp` on CPU where FSDP2 runs only on CUDA: one line, exit 2, on every rank, no output."""
    if CPU_FSDP:
        pytest.skip(f"torch {torch.__version__} runs FSDP2 on CPU (this checks the refusal on older torch)")
    data = DemoTask(seed=4).write_jsonl(tmp_path / "train.jsonl", 16, "train")
    out = tmp_path / "run"
    results = launch(tmp_path, lambda r: [sys.executable, "-m", "rwkvslice.cli", "train", "--data", str(data),
                                          "--out", str(out), "--shard", "fsdp", "--device", "cpu"])
    for rc, err in results:
        assert rc == 2, err[-2000:]
        assert err.strip().splitlines()[-1].startswith("rwkvslice: error: --shard fsdp on CPU needs torch >= 2.6")
        assert "Traceback" not in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------
# The CLI: `rwkvslice train --shard fsdp` under torchrun's environment (full, LoRA with held-out eval,
# state tuning), against the same runs in one process, killed and resumed, exported. Three 2-rank
# launches in all (most of a launch is importing torch and FSDP): the three sharded runs in one, the
# SIGKILLed full run, and both resumes in one; the one-process runs and exports run in this process.

CLI_WORKER = textwrap.dedent("""
    import json, os, sys
    from rwkvslice.cli import main

    for i, argv in enumerate(json.loads(sys.argv[1])):  # several CLI runs, one process group each
        os.environ["RWKVSLICE_DIST_INIT"] = f"file://{sys.argv[2]}/rdzv-{i}"
        if main(argv) != 0:
            sys.exit(f"run {i} failed: {argv}")
""")
TUNED = {"lora": ["--tune", "lora", "--lora-r", "4", "--train-also", "ln"], "state": ["--tune", "state"]}


def _train_args(data, out, *extra):
    model = [] if "--init-from" in extra else ["--model", "demo"]  # (--init-from brings its own shape)
    return ["train", "--data", str(data), "--out", str(out), *model, "--ctx-len", "32", "--steps", "3",
            "--lr", "2e-3", "--warmup-steps", "1", "--grad-accum", "2", "--grad-clip", "0.5", "--save-every", "1",
            "--keep", "3", "--seed", "3", "--no-progress", "--device", "cpu", *extra]


def _losses(out):
    return [(r["step"], r["loss"], r.get("eval_loss")) for r in _records(out)]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _launch_ok(tmp_path, runs):
    """One 2-rank launch running the CLI runs `runs` one after the other."""
    where = tmp_path / f"launch-{len(list(tmp_path.glob('launch-*')))}"  # fresh rendezvous files each time
    where.mkdir()
    argv = [sys.executable, "-c", CLI_WORKER, json.dumps([[str(a) for a in run] for run in runs]), str(where)]
    for rc, err in launch(where, lambda r: argv, timeout=300):
        assert rc == 0, err[-3000:]


def _dcp_weights(ckpt):
    """The model tensors of a sharded checkpoint, read by torch's own converter (not our loader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dest = ckpt.parent.parent.parent / f"{ckpt.parent.parent.name}-{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt / "dcp"), str(dest))
    sd = torch.load(dest, weights_only=True)
    return sd["model"]  # the nested {"model": ..., "optim": ...} that the trainer saved


def _kill_at_random(data, run, rdzv, steps_done: int, delay: float):
    """Start a 2-rank CLI run and SIGKILL every rank `delay` s after its step-`steps_done` checkpoint
    appeared (inside the next step or its checkpoint write: save_every 1)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    try:
        for rank in range(WORLD):
            penv = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                        RWKVSLICE_DIST_INIT=f"file://{rdzv}", RWKVSLICE_DIST_TIMEOUT="120")
            procs.append(subprocess.Popen([sys.executable, "-m", "rwkvslice.cli",
                                           *_train_args(data, run, "--batch-size", "2", "--shard", "fsdp")],
                                          env=penv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 240
        done = run / "checkpoints" / f"step-{steps_done:08d}"
        while time.monotonic() < deadline and all(p.poll() is None for p in procs) and not done.is_dir():
            time.sleep(0.01)
        time.sleep(delay)
        for p in procs:
            p.send_signal(signal.SIGKILL)
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
    assert all(p.returncode == -signal.SIGKILL for p in procs), "the run finished before it was killed"


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    if not CPU_FSDP:
        pytest.skip(f"torch {torch.__version__}: FSDP2 runs only on CUDA")
    from rwkvslice import RWKV7, RWKV7Config
    from rwkvslice.cli import main

    tmp = tmp_path_factory.mktemp("fsdp-cli")
    data = DemoTask(seed=2).write_jsonl(tmp / "train.jsonl", 24, "train")  # 3 steps x 8 windows
    held_out = DemoTask(seed=6).write_jsonl(tmp / "eval.jsonl", 5, "heldout")  # uneven over 2 ranks
    torch.manual_seed(0)  # the tuned runs' base: a demo model with every weight nonzero (the official
    base = RWKV7(RWKV7Config.preset("demo", 320))  # init zeroes att.output, so a state would get no gradient)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    base.save_official(tmp / "base.pth")
    extra = {"full": [], "lora": [*TUNED["lora"], "--init-from", tmp / "base.pth", "--eval-data", held_out,
                                  "--eval-every", "1"],
             "state": [*TUNED["state"], "--init-from", tmp / "base.pth"]}
    _launch_ok(tmp, [_train_args(data, tmp / f"fsdp-{k}", "--batch-size", "2", "--shard", "fsdp", *extra[k])
                     for k in KINDS])
    for k in KINDS:  # one process with the whole batch, in this process
        assert main([str(a) for a in _train_args(data, tmp / f"single-{k}", "--batch-size", "4", *extra[k])]) == 0

    rng = random.Random()
    kill_after, delay = rng.randint(1, 2), rng.uniform(0, 1.0)  # a random moment of the 3-step schedule
    _kill_at_random(data, tmp / "killed", tmp / "rdzv-killed", kill_after, delay)
    # the LoRA run, resumed from its step-1 checkpoint (the later ones removed, as a run that stopped
    # there would have left it; --out must stay the same, so the whole run is kept as a copy first)
    shutil.copytree(tmp / "fsdp-lora", tmp / "uninterrupted-lora")
    for later in ("step-00000002", "step-00000003"):
        shutil.rmtree(tmp / "fsdp-lora" / "checkpoints" / later)
    # the killed run resumed with --no-reshard-after-forward: when FSDP frees gathered weights changes
    # no arithmetic
    _launch_ok(tmp, [_train_args(data, tmp / "killed", "--batch-size", "2", "--shard", "fsdp", "--resume",
                                 "--no-reshard-after-forward"),
                     _train_args(data, tmp / "fsdp-lora", "--batch-size", "2", "--shard", "fsdp", "--resume",
                                 *extra["lora"])])
    return SimpleNamespace(tmp=tmp, data=data, kill=(kill_after, delay))


@needs_cpu_fsdp
@pytest.mark.slow  # the fixture: ~70 s of subprocesses on 2 cores; the torch matrix skips it
def test_cli_fsdp_matches_one_process_resumes_after_sigkill_and_exports(cli, capsys):
    from rwkvslice.cli import main

    ref, single, run = cli.tmp / "fsdp-full", cli.tmp / "single-full", cli.tmp / "killed"
    # 2 ranks x batch 2 x 2 micro-batches == one process x batch 4 x 2 micro-batches, AdamW, clipping
    a, b = _records(ref), _records(single)
    assert [r["step"] for r in a] == list(range(1, 4))
    for x, y in zip(a, b, strict=True):
        assert x["tokens"] == y["tokens"] and x["kept_tokens"] == y["kept_tokens"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5) and x["grad_norm"] > 0.5
    final = ref / "checkpoints" / "step-00000003"
    assert (final / "dcp" / ".metadata").is_file() and not (final / "rwkvslice_model.safetensors").exists()
    ours = _dcp_weights(final)
    theirs = load_file(str(single / "checkpoints" / "step-00000003" / "rwkvslice_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for k in theirs:  # AdamW: the DDP test's 1e-3 per-tensor bound and its reasoning (test_ddp.py)
        err = ((ours[k].double() - theirs[k].double()).norm() / theirs[k].double().norm().clamp_min(1e-12)).item()
        assert err < 1e-3, (k, err)

    # SIGKILL at a random moment, then --resume: the same losses and final weights, bit for bit
    assert _losses(run) == _losses(ref), f"killed {cli.kill[1]:.2f} s after {cli.kill[0]} step(s)"
    resumed = _dcp_weights(run / "checkpoints" / "step-00000003")
    for k in ours:
        assert torch.equal(resumed[k], ours[k]), k
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # temporaries cleaned

    # a resume in one process (DDP/no shard) of the sharded run is refused in one line
    capsys.readouterr()
    assert main([str(a) for a in _train_args(cli.data, run, "--batch-size", "2", "--steps", "5", "--resume")]) == 2
    assert capsys.readouterr().err.strip().startswith("rwkvslice: error: --resume: --shard")

    # export: the official .pth runs in the `rwkv` package with the trained model's logits; the
    # safetensors directory holds the same tensors
    pth = cli.tmp / "model.pth"
    assert main(["export", "--ckpt", str(ref), "--official", str(pth), "--safetensors",
                 str(cli.tmp / "exported")]) == 0
    exported = load_file(str(cli.tmp / "exported" / "rwkvslice_model.safetensors"))  # and the safetensors layout
    assert exported.keys() == ours.keys() and all(torch.equal(exported[k], ours[k]) for k in ours)
    assert json.loads((cli.tmp / "exported" / "run.json").read_text())["tokenizer"] == "byte"
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    rwkv_model = pytest.importorskip("rwkv.model", reason="the official `rwkv` package is not installed")
    from rwkvslice import RWKV7, RWKV7Config

    trained = RWKV7(RWKV7Config.preset("demo", ours["emb.weight"].shape[0]))
    trained.load_state_dict(ours)  # the weights as torch's converter reads them from the shards
    tokens = list(range(1, 40))
    with torch.no_grad():
        expected = trained(torch.tensor([tokens]))[0]
        got, _ = rwkv_model.RWKV(str(cli.tmp / "model"), strategy="cpu fp32").forward(tokens, None,
                                                                                      full_output=True)
    rms = ((got.double() - expected.double()).pow(2).mean().sqrt() / expected.double().pow(2).mean().sqrt())
    assert rms.item() < 1e-5  # fp32 both sides (test_interop_official.py explains the 1e-7-level gap)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


@needs_cpu_fsdp
@pytest.mark.slow  # shares the fixture above
@pytest.mark.parametrize("kind", ["lora", "state"])
def test_cli_fsdp_tuned_run_matches_one_process_and_exports_like_it(cli, kind):
    """--tune lora (with --eval-data) / state under FSDP: the losses and held-out losses of one process
    with the whole batch; a checkpoint of only the trainable tensors (the non-sharded tuned layout);
    exported (.pth merged, or the state file) like the one-process run."""
    from rwkvslice.cli import main

    ours, theirs = cli.tmp / f"fsdp-{kind}", cli.tmp / f"single-{kind}"
    a, b = _records(ours), _records(theirs)
    assert [r["step"] for r in a] == list(range(1, 4))
    for x, y in zip(a, b, strict=True):
        assert x["kept_tokens"] == y["kept_tokens"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] > 0  # the trainable tensors get gradients (the base has no zero weights)
        if kind == "lora":  # evaluated every step; the same windows, batched by 2 over 2 ranks vs 4 in one
            assert x["eval_tokens"] == y["eval_tokens"] > 0
            assert x["eval_loss"] == pytest.approx(y["eval_loss"], rel=1e-5)
    final = ours / "checkpoints" / "step-00000003"
    assert not (final / "dcp").exists() and not (final / "rwkvslice_model.safetensors").exists()
    mine = load_file(str(final / "peft.safetensors"))
    ref = load_file(str(theirs / "checkpoints" / "step-00000003" / "peft.safetensors"))
    assert mine.keys() == ref.keys() and (kind != "state" or set(mine) == {"initial_state"})
    for k in ref:  # AdamW: the full run's bound (above)
        assert _rel(mine[k], ref[k]) < 1e-3, k
    out = {w: cli.tmp / f"export-{kind}-{w}.pth" for w in ("fsdp", "single")}
    flag = "--official" if kind == "lora" else "--state"
    for w, run in (("fsdp", ours), ("single", theirs)):
        assert main(["export", "--ckpt", str(run), flag, str(out[w])]) == 0
    got, want = (torch.load(out[w], weights_only=True) for w in ("fsdp", "single"))
    base = torch.load(cli.tmp / "base.pth", weights_only=True)
    assert got.keys() == want.keys()
    for k in want:
        assert _rel(got[k], want[k]) < 1e-3, k
    if kind == "lora":  # merged: the adapted weights moved away from the base
        assert got.keys() == base.keys()
        assert _rel(got["blocks.0.att.key.weight"], base["blocks.0.att.key.weight"]) > 1e-5
    else:
        assert len(got) == 2 and got["blocks.0.att.time_state"].abs().max() > 0


@needs_cpu_fsdp
@pytest.mark.slow  # shares the fixture above
def test_cli_fsdp_lora_run_resumes_bit_for_bit(cli):
    """A --shard fsdp --tune lora run resumed from its step-1 checkpoint logs the same losses and
    held-out losses and ends with the same adapters and optimizer state, bit for bit."""
    ref, run = cli.tmp / "uninterrupted-lora", cli.tmp / "fsdp-lora"
    assert _losses(run) == _losses(ref) and all(e is not None for _, _, e in _losses(ref))
    a, b = (r / "checkpoints" / "step-00000003" for r in (ref, run))
    assert (a / "peft.safetensors").read_bytes() == (b / "peft.safetensors").read_bytes()
    oa, ob = (torch.load(d / "optimizer.pt", weights_only=True) for d in (a, b))
    # (torch's set_optimizer_state_dict hands the betas back as a list: the same two numbers)
    plain = [[{k: list(v) if k == "betas" else v for k, v in g.items()} for g in o["param_groups"]] for o in (oa, ob)]
    assert plain[0] == plain[1] and oa["state"].keys() == ob["state"].keys()
    for name, state in oa["state"].items():
        for key, v in state.items():
            assert torch.equal(v, ob["state"][name][key]), (name, key)
