"""DDP vs FSDP2 (`--shard none` vs `--shard fsdp`) on CPU with gloo -> reports/bench-fsdp.md.

Each configuration starts its own WORLD rank processes (file:// rendezvous, one torch thread each, as
torchrun would on this machine). Every rank builds the same model, wraps it the way the trainer does
(DistributedDataParallel around LossModule, or sharding.shard_model + ShardedLossModule), builds the
trainer's AdamW, and runs `train_step` (forward, backward, clip, AdamW) on its own batch of
SFT-shaped rows (the last 25 % of each row carries loss). Measured per rank:
  - peak memory, two independent measures taken in the same run:
    max RSS: growth of the process's max RSS (ru_maxrss) from just before the model is built, so it
    includes weights, gradients, AdamW moments, DDP's gradient buckets, gathered FSDP units and
    activations (and, for FSDP, the full model every rank builds before sharding it), but also what
    glibc's allocator keeps mapped after tensors are freed, gloo's buffers and the interpreter;
    live tensors: the peak of the bytes of tensor storages alive at once, as torch's dispatcher creates
    them (a TorchDispatchMode entered before the model is built; storages freed or resized, as FSDP
    does to gathered weights, are subtracted), so no allocator slack, no gloo-internal buffers; and
    separately the bytes alive once the model, its wrapper and the optimizer are built (DDP: weights +
    gradient buckets; FSDP: the shards) and the peak of that build phase;
  - the bytes of parameters and optimizer state this rank holds (from the local shards);
  - step time: median over the timed steps (after one warm-up step), the slowest rank's;
  - the loss of every step, which must agree between DDP and FSDP.

Usage: flock /tmp/rwkvslice-heavy.lock python benchmarks/bench_fsdp.py [--world 2] [--n-layer 12]
       [--n-embd 768] [--vocab 65536] [--ctx-len 512] [--batch 1] [--steps 3] [--out reports/bench-fsdp.md]
       [--mmap-threshold BYTES]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.60  # the goal: FSDP's per-rank peak at most 60 % of DDP's at 2 ranks


def live_tensor_bytes():
    """A TorchDispatchMode counting the bytes of the tensor storages alive (`.live`) and their peak
    (`.peak`): each storage an op returns is counted once, until it is freed (a weak reference) or
    resized (FSDP frees a gathered unit with `untyped_storage().resize_(0)`, which no dispatch sees)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map_only
    from torch.utils.weak import WeakIdKeyDictionary

    class LiveTensorBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.sizes = WeakIdKeyDictionary()  # storage -> bytes counted
            self._resize = torch.UntypedStorage.resize_

        def _add(self, n: int) -> None:
            self.live += n
            self.peak = max(self.peak, self.live)

        def _track(self, t) -> None:
            if type(t) is not torch.Tensor:  # DTensor outputs: their local tensors were seen already
                return
            st = t.untyped_storage()
            if st in self.sizes:
                return
            counted = [st.nbytes()]  # what this storage adds now (a resize changes it)
            self.sizes[st] = counted
            weakref.finalize(st, lambda: self._add(-counted[0]))
            self._add(counted[0])

        def __enter__(self):
            mode = self

            def resize_(st, size):
                mode._resize(st, size)
                counted = mode.sizes.get(st)
                if counted is not None:
                    mode._add(st.nbytes() - counted[0])
                    counted[0] = st.nbytes()
                return st

            torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
            return super().__enter__()

        def __exit__(self, *exc):
            torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
            return super().__exit__(*exc)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            from torch.distributed.tensor import DTensor

            if any(t is DTensor for t in types):
                return NotImplemented  # let DTensor run its local ops, which this mode then sees
            out = func(*args, **(kwargs or {}))
            tree_map_only(torch.Tensor, self._track, out)
            return out

    return LiveTensorBytes()


def worker(cfg: dict, out: str) -> None:
    """One rank (RANK / WORLD_SIZE / RWKVSLICE_DIST_INIT in the environment)."""
    import torch

    from rwkvslice import RWKV7, RWKV7Config
    from rwkvslice.train import sharding
    from rwkvslice.train.distributed import setup_distributed, teardown_distributed
    from rwkvslice.train.optim import build_optimizer
    from rwkvslice.train.step import LossModule, train_step

    env = setup_distributed("cpu")
    try:
        base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracker = live_tensor_bytes() if cfg["track"] else None  # (its per-op Python call slows every op)
        if tracker is not None:
            tracker.__enter__()
        torch.manual_seed(0)
        model = RWKV7(RWKV7Config(vocab_size=cfg["vocab"], n_embd=cfg["n_embd"], n_layer=cfg["n_layer"],
                                  head_size=64))
        model.grad_checkpointing = cfg["grad_checkpoint"]
        if cfg["mode"] == "fsdp":
            sharding.shard_model(model, env)
            module: torch.nn.Module = sharding.ShardedLossModule(model)
        else:
            module = torch.nn.parallel.DistributedDataParallel(LossModule(model))
        opt = build_optimizer(model, lr=1e-4, weight_decay=0.01)
        import gc

        gc.collect()
        built = {"build_rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024}
        if tracker is not None:
            built.update(built_live_mb=tracker.live / 2**20, build_peak_live_mb=tracker.peak / 2**20)
        g = torch.Generator().manual_seed(1 + env.rank)
        B, T = cfg["batch"], cfg["ctx_len"]
        idx = torch.randint(1, cfg["vocab"], (B, T), generator=g)
        targets = torch.randint(1, cfg["vocab"], (B, T), generator=g)
        targets[:, : T - T // 4] = -100
        losses, times = [], []
        for _ in range(cfg["steps"] + 1):
            t0 = time.perf_counter()
            stats = train_step(module, opt, [(idx, targets)], env, grad_clip=1.0)
            times.append(time.perf_counter() - t0)
            losses.append(stats.loss)
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if tracker is not None:
            tracker.__exit__(None, None, None)
            built["peak_live_mb"] = tracker.peak / 2**20
        res = {"rank": env.rank, "losses": losses, "step_s": statistics.median(times[1:]),
               "peak_growth_mb": (peak_kb - base_kb) / 1024, "peak_total_mb": peak_kb / 1024,
               **built, **sharding.local_state_bytes(model, opt)}
        Path(out, f"rank{env.rank}.json").write_text(json.dumps(res))
    finally:
        teardown_distributed(env)


def run_config(cfg: dict, world: int, extra_env: dict | None = None) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    procs = []
    try:
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                       RWKVSLICE_DIST_INIT=f"file://{tmp / 'rdzv'}", RWKVSLICE_DIST_TIMEOUT="1800",
                       OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), **(extra_env or {}))
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(cfg), str(tmp)],
                                          env=env, stderr=subprocess.PIPE, text=True))
        errs = [p.communicate(timeout=7200)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    for p, err in zip(procs, errs, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"{cfg['mode']} rank failed:\n{err[-3000:]}")
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else "unknown"


def n_params(a: argparse.Namespace) -> int:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from rwkvslice import RWKV7, RWKV7Config

    with torch.device("meta"):
        model = RWKV7(RWKV7Config(vocab_size=a.vocab, n_embd=a.n_embd, n_layer=a.n_layer, head_size=64))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2, metavar=("CFG", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--ctx-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--note", default="", help="a sentence for the report (e.g. why this model size)")
    ap.add_argument("--mmap-threshold", type=int, default=0, metavar="BYTES",
                    help="also run every configuration (untracked) with MALLOC_MMAP_THRESHOLD_=BYTES")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench-fsdp.md"))
    a = ap.parse_args()
    if a.worker:
        worker(json.loads(a.worker[0]), a.worker[1])
        return

    import torch

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()[0]
    base = {"vocab": a.vocab, "n_embd": a.n_embd, "n_layer": a.n_layer, "ctx_len": a.ctx_len,
            "batch": a.batch, "steps": a.steps}
    results = {}
    for gc in (False, True):  # activations as they are, then per-block activation checkpointing
        for mode in ("ddp", "fsdp"):
            t0 = time.perf_counter()
            # twice: the memory columns with the live-tensor tracker, the step time (and a second max
            # RSS) without it, each in fresh processes
            tracked = run_config(dict(base, mode=mode, grad_checkpoint=gc, track=True), a.world)
            plain = run_config(dict(base, mode=mode, grad_checkpoint=gc, track=False), a.world)
            results[(mode, gc)] = [dict(t, step_s=u["step_s"], plain_rss_mb=u["peak_growth_mb"],
                                        plain_losses=u["losses"]) for t, u in zip(tracked, plain, strict=True)]
            print(f"{mode} grad_checkpoint={gc}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            Path(a.out).with_suffix(".json").write_text(json.dumps({f"{m} gc={g}": v for (m, g), v in results.items()}))
    # glibc's allocator keeps freed heap memory mapped (its mmap threshold grows up to 32 MiB as large
    # blocks are freed, and holes in the heap are not returned), which adds to max RSS on both sides; with a
    # fixed threshold each allocation of at least BYTES is its own mapping, returned to the kernel when freed
    mmap_results = {}
    if a.mmap_threshold:
        for gc in (False, True):
            for mode in ("ddp", "fsdp"):
                t0 = time.perf_counter()
                mmap_results[(mode, gc)] = run_config(dict(base, mode=mode, grad_checkpoint=gc, track=False), a.world,
                                                      {"MALLOC_MMAP_THRESHOLD_": str(a.mmap_threshold)})
                print(f"{mode} grad_checkpoint={gc} mmap threshold: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    load_after = os.getloadavg()[0]

    P = n_params(a)
    peak = {k: max(r["plain_rss_mb"] for r in rs) for k, rs in results.items()}
    live = {k: max(r["peak_live_mb"] for r in rs) for k, rs in results.items()}
    step = {k: max(r["step_s"] for r in rs) for k, rs in results.items()}
    cmd = "flock /tmp/rwkvslice-heavy.lock python benchmarks/bench_fsdp.py " + shlex.join(sys.argv[1:])
    lines = [
        "# FSDP2 vs DDP: per-rank memory and step time (CPU, gloo)",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({cpu_model()}), "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
        f"Linux {platform.release()}",
        f"- Versions: python {platform.python_version()}, torch {torch.__version__}, rwkvslice (this checkout)",
        f"- Command: `{cmd.strip()}`",
        f"- Load average (1 min) before / after: {load_before:.1f} / {load_after:.1f} (the machine is shared; "
        "step times move with the load, memory does not)",
        f"- Model: {a.n_layer} layers x n_embd {a.n_embd}, vocab {a.vocab}, head_size 64: {P / 1e6:.0f} M "
        f"parameters ({P * 4 / 2**30:.2f} GiB fp32). {a.world} ranks, each batch {a.batch} x ctx_len "
        f"{a.ctx_len} (25 % of each row kept), fp32, one torch thread per rank.",
        "- Step = `train_step` (forward, backward, grad clip 1.0, AdamW); median of "
        f"{a.steps} steps after one warm-up step; the slowest rank. Each configuration runs twice in fresh "
        "processes: with the live-tensor tracker (the memory columns) and without it (step time, and the max "
        "RSS the ratios use: the tracker's per-op Python call slows every op and holds a little memory).",
        "- Peak RSS = growth of each rank process's max RSS from just before the model is built. Peak live = "
        "the most bytes of tensor storages alive at once on the rank's main thread (a TorchDispatchMode; no "
        "allocator slack, no gloo-internal buffers); built = alive once the model, its DDP/FSDP wrapper and "
        "AdamW are built; build peak = the live peak of that build phase. Both measures come from the same run.",
    ]
    if a.note:
        lines.append(f"- {a.note}")
    lines += [
        "",
        "| activations | shard | rank | peak RSS growth (MiB) | same, tracked run (MiB) | peak live tensors "
        "(MiB) | built: live / build peak (MiB) | params held (MiB) | AdamW state held (MiB) | step (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (mode, gc), rs in results.items():
        for r in rs:
            lines.append(f"| {'checkpointed' if gc else 'kept'} | {'none (DDP)' if mode == 'ddp' else 'fsdp'} "
                         f"| {r['rank']} | {r['plain_rss_mb']:,.0f} | {r['peak_growth_mb']:,.0f} "
                         f"| {r['peak_live_mb']:,.0f} "
                         f"| {r['built_live_mb']:,.0f} / {r['build_peak_live_mb']:,.0f} "
                         f"| {r['params_local'] / 2**20:,.0f} "
                         f"| {r['optim_local'] / 2**20:,.0f} | {r['step_s']:.2f} |")
    lines.append("")
    for gc in (False, True):
        ddp, fsdp = results[("ddp", gc)], results[("fsdp", gc)]
        assert all(r["losses"] == r["plain_losses"] for r in ddp + fsdp)  # the tracker changes no arithmetic
        same = all(d["losses"] == f["losses"] for d, f in zip(ddp, fsdp, strict=True))
        max_rel = max(abs(x - y) / abs(y) for d, f in zip(ddp, fsdp, strict=True)
                      for x, y in zip(f["losses"], d["losses"], strict=True))
        ratio = peak[("fsdp", gc)] / peak[("ddp", gc)]
        ratio_live = live[("fsdp", gc)] / live[("ddp", gc)]

        def verdict(r: float) -> str:
            return "met" if r <= GOAL else "not met"

        lines += [
            f"**Activations {'checkpointed per block (--grad-checkpoint)' if gc else 'kept (default)'}**: "
            f"FSDP per-rank peak / DDP per-rank peak (the larger rank of each): max RSS **{ratio:.0%}** (goal "
            f"of at most {GOAL:.0%}: **{verdict(ratio)}**), live tensors **{ratio_live:.0%}** "
            f"(**{verdict(ratio_live)}**); step time FSDP / DDP {step[('fsdp', gc)] / step[('ddp', gc)]:.2f}x; "
            "losses per step "
            f"{'identical' if same else f'equal to {max_rel:.1e} relative'} (FSDP rank 0: "
            f"{', '.join(f'{x:.6f}' for x in fsdp[0]['losses'])}; DDP rank 0: "
            f"{', '.join(f'{x:.6f}' for x in ddp[0]['losses'])}).",
            "",
        ]
    if mmap_results:
        lines += [
            f"## The same with `MALLOC_MMAP_THRESHOLD_={a.mmap_threshold}`",
            "",
            "Every configuration again, without the tracker, in fresh processes with "
            f"`MALLOC_MMAP_THRESHOLD_={a.mmap_threshold}` in their environment: glibc then serves each allocation "
            "of at least that many bytes by its own mapping and returns it to the kernel when it is freed, so max "
            "RSS follows the live tensors instead of what the heap retains. Same code, same losses.",
            "",
            "| activations | shard | rank | peak RSS growth (MiB) | step (s) |",
            "|---|---|---|---|---|",
        ]
        for (mode, gc), rs in mmap_results.items():
            for r in rs:
                lines.append(f"| {'checkpointed' if gc else 'kept'} | {'none (DDP)' if mode == 'ddp' else 'fsdp'} "
                             f"| {r['rank']} | {r['peak_growth_mb']:,.0f} | {r['step_s']:.2f} |")
        lines.append("")
        for gc in (False, True):
            ddp, fsdp = mmap_results[("ddp", gc)], mmap_results[("fsdp", gc)]
            assert all(d["losses"] == u["losses"] for d, u in zip(ddp, results[("ddp", gc)], strict=True))
            ratio = max(r["peak_growth_mb"] for r in fsdp) / max(r["peak_growth_mb"] for r in ddp)
            t_ratio = max(r["step_s"] for r in fsdp) / max(r["step_s"] for r in ddp)
            lines += [
                f"**Activations {'checkpointed' if gc else 'kept'}, fixed mmap threshold**: FSDP / DDP max RSS "
                f"**{ratio:.0%}** (goal of at most {GOAL:.0%}: **{'met' if ratio <= GOAL else 'not met'}**); "
                f"step time FSDP / DDP {t_ratio:.2f}x.",
                "",
            ]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
