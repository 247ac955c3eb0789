"""Exact packing through the trainer: `--pack` trains on exactly what unpacked data trains on (one step over
the whole data set: the same loss and gradient norm), DDP passes the resets through (2 gloo ranks x one
packed window each == one process with both), and a `--pack` CLI run on samples of mixed lengths resumes
bit for bit after SIGKILL.

Tolerances: fp32, relative 1e-6 on the step loss and 1e-5 on the gradient norm / gradients (the packing
tests' bounds), exact equality for resume.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import textwrap

import pytest
import torch
from cli_runs import run_in_process, signal_after_steps
from safetensors.torch import load_file

from rwkvslice.data import build_dataset, collate
from rwkvslice.train.distributed import DistEnv
from rwkvslice.train.step import LossModule, train_step
from rwkvslice.train.trainer import TrainConfig, train

pytestmark = pytest.mark.component("Training Loop")


def write_samples(path, n, seed=0, max_len=60):
    """Prompt/response records of mixed lengths (byte tokens): log-uniform, from a few to max_len."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            size = int(round(2 ** rng.uniform(1.5, 5.9)))
            split = rng.randint(1, max(1, size - 1))
            text = "".join(rng.choice("abcdefghij ") for _ in range(size))
            f.write(json.dumps({"prompt": text[:split], "response": text[split:max_len] or "x"}) + "\n")
    return path


def noised_model():
    from rwkvslice import RWKV7, RWKV7Config
    from rwkvslice.data import get_tokenizer

    torch.manual_seed(0)
    model = RWKV7(RWKV7Config.preset("demo", get_tokenizer("byte").vocab_size))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_packed_step_equals_unpacked_step_over_the_same_samples(tmp_path):
    """One optimizer step over the whole data set, packed (4 windows) and unpacked (one window per sample,
    in 2 accumulation micro-batches): the same samples, so the same mean loss and gradient norm."""
    data = write_samples(tmp_path / "d.jsonl", 12, seed=1)
    packed = build_dataset(data, "byte", 64, pack=True)
    unpacked = build_dataset(data, "byte", 64)
    assert len(unpacked) == 12 and len(packed) < len(unpacked)
    init = tmp_path / "init.pth"  # noised weights: the official init zeroes the blocks' output projections
    noised_model().save_official(init)
    base = dict(data=str(data), init_from=str(init), ctx_len=64, steps=1, lr=1e-3, warmup_steps=0,
                progress=False, device="cpu", seed=5)
    train(TrainConfig(out=str(tmp_path / "packed"), pack=True, batch_size=len(packed), **base),
          log=lambda m: None)
    train(TrainConfig(out=str(tmp_path / "plain"), batch_size=6, grad_accum=2, **base), log=lambda m: None)
    (p,), (u,) = metrics(tmp_path / "packed"), metrics(tmp_path / "plain")
    assert p["kept_tokens"] == u["kept_tokens"] == packed.stats["kept_tokens"]
    assert abs(p["loss"] - u["loss"]) / u["loss"] < 1e-6
    assert abs(p["grad_norm"] - u["grad_norm"]) / u["grad_norm"] < 1e-5
    assert p["tokens"] < u["tokens"]  # fewer positions (less padding) for the same samples


# --- DDP: 2 ranks x one packed window == one process with both windows ----------------------------------

PACKED_STEP_WORKER = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import save_file
    from rwkvslice.train.distributed import setup_distributed, teardown_distributed
    from rwkvslice.train.step import LossModule, train_step
    sys.path.insert(0, sys.argv[2])
    from test_ddp import make_model, snapshot_grads_at_step
    from test_packing import packed_batch

    out = sys.argv[1]
    env = setup_distributed("cpu")
    try:
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        ddp = torch.nn.parallel.DistributedDataParallel(LossModule(model))
        batch = [x[env.rank : env.rank + 1] for x in packed_batch()]
        grads = snapshot_grads_at_step(model, opt)
        stats = train_step(ddp, opt, [tuple(batch)], env, grad_clip=0.0)
        save_file({**{"g." + k: v.contiguous() for k, v in grads.items()},
                   "loss": torch.tensor([stats.loss])}, f"{out}/rank{env.rank}.safetensors")
    finally:
        teardown_distributed(env)
""")


def packed_batch():
    """Two packed windows of 3 samples each (idx, targets, resets), vocab 96 as test_ddp's model."""
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(1, 96, (2, 40), generator=g)
    targets = torch.randint(1, 96, (2, 40), generator=g)
    resets = torch.zeros(2, 40, dtype=torch.bool)
    resets[0, [0, 11, 29]] = True
    resets[1, [0, 16, 17]] = True
    targets[:, 36:] = -100
    return idx, targets, resets


@pytest.mark.ddp
def test_two_ranks_with_packed_windows_equal_one_process(tmp_path):
    from test_ddp import WORLD, launch, make_model, snapshot_grads_at_step

    assert WORLD == 2
    here = os.path.dirname(__file__)
    results = launch(tmp_path, lambda r: [sys.executable, "-c", PACKED_STEP_WORKER, str(tmp_path), here])
    for rc, err in results:
        assert rc == 0, err[-3000:]
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    grads = snapshot_grads_at_step(model, opt)
    stats = train_step(LossModule(model), opt, [packed_batch()], DistEnv(0, 1, 0, torch.device("cpu")))
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    for r in ranks:
        assert abs(r["loss"].item() - stats.loss) / stats.loss < 1e-6
        for name, g in grads.items():
            err = ((r["g." + name] - g).norm() / g.norm().clamp_min(1e-30)).item()
            assert err < 1e-5 or g.norm() == 0, (name, err)
    # control: without resets the single process would train on something else
    model2 = make_model()
    opt2 = torch.optim.SGD(model2.parameters(), lr=1.0)
    leaky = train_step(LossModule(model2), opt2, [packed_batch()[:2]], DistEnv(0, 1, 0, torch.device("cpu")))
    assert abs(leaky.loss - stats.loss) / stats.loss > 1e-5


# --- SIGKILL + resume with --pack ----------------------------------------------------------------------


def _cmd(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), "--pack", "--model", "demo", "--ctx-len", "64",
            "--batch-size", "4", "--steps", "10", "--lr", "2e-3", "--warmup-steps", "2", "--save-every", "1",
            "--keep", "2", "--seed", "3", "--no-progress", "--device", "cpu", *extra]


@pytest.mark.slow  # one CLI process of 10 steps, killed, plus two runs in this process (cli_runs.py)
def test_pack_run_resumes_bit_for_bit_after_sigkill(tmp_path):
    data = write_samples(tmp_path / "train.jsonl", 60, seed=2)
    ds = build_dataset(data, "byte", 64, pack=True)
    assert len(ds) >= 12 and any(int(collate([ds[i]])[2].sum()) > 1 for i in range(len(ds)))  # packs
    run_in_process(_cmd(data, tmp_path / "ref"))
    ref = [(m["step"], m["loss"]) for m in metrics(tmp_path / "ref")]
    assert len(ref) == 10

    rng = random.Random()
    out = tmp_path / "run"
    kill_after = rng.randint(2, 7)
    rc = signal_after_steps(_cmd(data, out), out, kill_after, rng)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    run_in_process(_cmd(data, out, "--resume"))
    got = [(m["step"], m["loss"]) for m in metrics(out)]
    assert got == ref, f"killed after {kill_after} steps: {got} != {ref}"
    from rwkvslice.train.checkpoint import latest_checkpoint

    a = load_file(str(latest_checkpoint(out / "checkpoints") / "rwkvslice_model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "ref" / "checkpoints") / "rwkvslice_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
