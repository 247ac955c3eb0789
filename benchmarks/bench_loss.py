"""Benchmark: memory and time of a whole RWKV-7 training step (forward + backward) by loss path.

Paths, all on the same model, inputs and kept-target mask:
  full_logits     model(idx) -> (B, T, V) logits, then masked F.cross_entropy (RWKV-LM style)
  sliced_full     hidden states -> kept rows -> plain F.linear + F.cross_entropy on them
  sliced_chunked  kept rows -> our chunked fused linear + CE (rwkvslice.slicing, impl="chunked")
  sliced_torch    kept rows -> torch's chunked F.linear_cross_entropy (impl="torch", torch >= 2.13)
at each kept density (fraction of targets != -100).

Method
- Every (path, density, round) runs in a fresh subprocess (`--worker`), so no allocator state or
  cache carries over between configurations. Rounds are interleaved (round 1 of every config, then
  round 2, ...) so a burst of load from other users hits all configs alike.
- In the worker: build the model and inputs, run one warm-up step (loads kernels and thread pools),
  drop the parameter gradients (set to None, as zero_grad does), gc.collect() and malloc_trim(0) so
  freed heap pages go back to the OS, read VmRSS as the base, reset the peak (VmHWM) by writing "5"
  to /proc/self/clear_refs, run one step, read VmHWM. Peak growth = VmHWM - base: everything the
  step allocates at its worst moment, parameter gradients included (identical for all paths).
- Time: that step and `--steps - 1` more, each followed by dropping the gradients; wall clock
  (time.perf_counter) and process CPU time (time.process_time, less sensitive to other users on a
  shared machine). Reported: medians over rounds x steps, with min-max spread.

Usage: python benchmarks/bench_loss.py [--rounds 3] [--steps 2] [--out reports/bench-loss.md]
While others edit the working tree, run a committed snapshot instead (what reports/bench-loss.md used):
  git archive HEAD | tar -x -C /tmp/snap && cd /tmp/snap && RWKVSLICE_BENCH_COMMIT=$(git -C /work/main
  rev-parse --short HEAD) PYTHONPATH=/tmp/snap/src python benchmarks/bench_loss.py --out /work/main/reports/...
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

PATHS = ("full_logits", "sliced_full", "sliced_chunked", "sliced_torch", "body_only")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def _release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker(cfg: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from rwkvslice import RWKV7, RWKV7Config
    from rwkvslice.slicing import sliced_cross_entropy

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    B, T, V, C = cfg["batch"], cfg["ctx"], cfg["vocab"], cfg["n_embd"]
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (B, T), generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    kept = max(1, round(cfg["density"] * B * T))
    order = torch.randperm(B * T, generator=gen)
    targets.view(-1)[order[kept:]] = -100
    path = cfg["path"]
    impl = {"sliced_full": "full", "sliced_chunked": "chunked", "sliced_torch": "torch"}.get(path)

    scope = cfg["scope"]
    if scope.startswith("step"):  # the whole model: embedding, blocks, ln_out, head + loss
        model = RWKV7(RWKV7Config(vocab_size=V, n_embd=C, n_layer=cfg["n_layer"]))
        ckpt = re.search(r"_ckpt(\d*)", scope)  # activation checkpointing per block [and per N-token segment]
        model.grad_checkpointing = ckpt is not None
        model.grad_checkpoint_len = int(ckpt.group(1)) if ckpt and ckpt.group(1) else None
        params = list(model.parameters())

        def hidden():
            return model.hidden_states(idx)[0]

        head_weight = model.head.weight
    else:  # "head": only the head + loss, from (B, T, C) hidden states that need a gradient
        leaf = torch.randn(B, T, C, generator=gen).requires_grad_()
        head_weight = torch.nn.Parameter(torch.randn(V, C, generator=gen) * 0.02)
        params = [leaf, head_weight]

        def hidden():
            return leaf

    def full_logits_loss():
        # A helper, so the logits tensor dies when the loss is built (as in RWKV-LM's training_step).
        logits = F.linear(hidden(), head_weight)
        return F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=-100)

    def step() -> float:
        if path == "full_logits":
            loss = full_logits_loss()
        elif path == "body_only":  # no head at all: the floor every loss path shares
            loss = hidden().square().mean()
        else:
            loss = sliced_cross_entropy(hidden(), head_weight, targets, impl=impl)
        loss.backward()
        return float(loss.detach())

    def drop_grads() -> None:
        for p in params:
            if scope.endswith("_kept") and p.grad is not None:
                p.grad.zero_()  # gradient buffers persist between steps (zero_grad(set_to_none=False), DDP)
            else:
                p.grad = None

    step()  # warm-up
    drop_grads()
    _release_memory()
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    wall, cpu, losses = [], [], []
    for i in range(cfg["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if i == 0:
            peak = _status_kib("VmHWM")
        drop_grads()
    return {
        "peak_growth_mib": (peak - base) / 1024,
        "base_rss_mib": base / 1024,
        "wall_s": wall,
        "cpu_s": cpu,
        "loss": losses[0],
        "kept": kept,
    }


def run_worker(cfg: dict) -> dict:
    # glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in its heap, so RSS
    # would show allocator caching rather than live tensors. A fixed 64 KiB threshold makes every
    # tensor-sized block an mmap that returns to the OS when freed: the peak is the live-tensor peak.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {cfg} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--steps", type=int, default=2, help="timed steps per worker (the first also gives memory)"
    )
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--densities", default="1.0,0.25,0.05")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument(
        "--scopes",
        default="step,head",
        help="step: whole model; step_ckpt: whole model with per-block activation checkpointing; "
        "step_ckptN: also per N-token segment; a _kept suffix: gradient buffers kept (zeroed, not freed) "
        "between steps; "
        "head: head + loss only",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch default)")
    ap.add_argument("--out", default="reports/bench-loss.md")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch

    from rwkvslice.slicing import torch_chunked_available

    paths = [p for p in args.paths.split(",") if p]
    if "sliced_torch" in paths and not torch_chunked_available():
        paths.remove("sliced_torch")
        print(f"torch {torch.__version__} has no chunked F.linear_cross_entropy: sliced_torch left out")
    densities = [float(d) for d in args.densities.split(",")]
    scopes = [s for s in args.scopes.split(",") if s]
    base = dict(
        vocab=args.vocab,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        batch=args.batch,
        ctx=args.ctx,
        steps=args.steps,
        threads=args.threads,
    )
    configs = []
    for scope in scopes:
        if scope.startswith("step") and "body_only" in paths:
            configs.append((scope, "body_only", 1.0))  # no head: independent of the density
        configs += [(scope, p, d) for d in densities for p in paths if p != "body_only"]
    results: dict[tuple, list[dict]] = {c: [] for c in configs}
    started = time.time()
    for r in range(args.rounds):
        for scope, p, d in configs:
            res = run_worker(dict(base, scope=scope, path=p, density=d))
            results[(scope, p, d)].append(res)
            print(
                f"round {r + 1}/{args.rounds} {scope:4s} density {d:.2f} {p:15s} "
                f"peak +{res['peak_growth_mib']:7.0f} MiB  wall {min(res['wall_s']):6.2f} s  "
                f"cpu {min(res['cpu_s']):6.2f} s  loss {res['loss']:.4f}",
                flush=True,
            )
    elapsed = time.time() - started

    def values(c, key):
        return [v for res in results[c] for v in (res[key] if isinstance(res[key], list) else [res[key]])]

    def med(c, key):
        return statistics.median(values(c, key))

    lines = [
        "# bench-loss: training step memory and time by loss path",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {_cpu_name()}, {os.cpu_count()} logical CPUs, {_mem_total_gib():.0f} GiB RAM, no GPU; "
        f"shared with other engineers' jobs during the run (load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})",
        f"- python {platform.python_version()}, torch {torch.__version__}, torch threads per worker: "
        f"{args.threads or torch.get_num_threads()}",
        f"- command: `python benchmarks/bench_loss.py {' '.join(sys.argv[1:])}`; code: {_code_version()}",
        f"- model (scope step): RWKV7 n_layer={args.n_layer} n_embd={args.n_embd} vocab={args.vocab}, fp32; "
        f"B x T = {args.batch} x {args.ctx} = {args.batch * args.ctx} tokens, kept targets at random positions",
        "- scope step_ckpt[N]: the same whole step with model.grad_checkpointing = True (each block's forward "
        "is recomputed in backward; with N, per N-token segment: model.grad_checkpoint_len = N), for every "
        "path alike",
        "- scopes *_kept: parameter gradients stay allocated between steps and are zeroed in place "
        "(optimizer.zero_grad(set_to_none=False); DDP keeps its gradient buckets likewise), so they are in the "
        "base RSS and the growth is the step's activations and working memory only; otherwise they are freed "
        "(set_to_none=True, torch's default and rwkvslice's trainer) and counted in the growth",
        "- scope head: the same head (V x C) and loss from (B, T, C) leaf hidden states, no model body",
        f"- {args.rounds} rounds x {args.steps} timed steps per config; every round runs each config in a fresh "
        f"subprocess, rounds interleaved; total {elapsed / 60:.1f} min",
        "- memory: peak RSS growth of one forward+backward over the RSS just before it (VmHWM reset via "
        "/proc/self/clear_refs after a warm-up step; gradients dropped and malloc_trim first; "
        "MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave RSS), parameter gradients included",
        "- time: wall clock and process CPU time (user+sys of all threads; steadier than wall clock while "
        "other jobs compete for the 2 cores)",
        "- cells: median (min-max) over rounds (memory) or rounds x steps (time); ratios are of medians",
    ]
    for scope in scopes:
        title = _scope_title(scope)
        lines += [
            "",
            f"## {title}",
            "",
            "| density | path | peak growth MiB | full_logits / this | wall s | cpu s | this / full_logits (cpu) |",
            "|---|---|---|---|---|---|---|",
        ]
        if (scope, "body_only", 1.0) in results:
            c = (scope, "body_only", 1.0)
            mem = _fmt_spread(values(c, "peak_growth_mib"), ".0f")
            lines.append(
                f"| any | body_only (no head, loss = mean(h^2)) | {mem} | - | "
                f"{_fmt_spread(values(c, 'wall_s'), '.2f')} | {_fmt_spread(values(c, 'cpu_s'), '.2f')} | - |"
            )
        for d in densities:
            ref = (scope, "full_logits", d)
            for p in paths:
                c = (scope, p, d)
                if c not in results or p == "body_only":
                    continue
                has_ref = ref in results and p != "full_logits"
                mem_ratio = (
                    f"{med(ref, 'peak_growth_mib') / med(c, 'peak_growth_mib'):.1f}x" if has_ref else "-"
                )
                cpu_ratio = f"{med(c, 'cpu_s') / med(ref, 'cpu_s'):.2f}" if has_ref else "-"
                lines.append(
                    f"| {d:.0%} | {p} | {_fmt_spread(values(c, 'peak_growth_mib'), '.0f')} | {mem_ratio} | "
                    f"{_fmt_spread(values(c, 'wall_s'), '.2f')} | {_fmt_spread(values(c, 'cpu_s'), '.2f')} | "
                    f"{cpu_ratio} |"
                )
        if "sliced_chunked" in paths and "sliced_torch" in paths:
            lines += [
                "",
                f"Ours (sliced_chunked) / torch's chunked path (sliced_torch), {title.lower()}, medians:",
                "",
                "| density | peak growth | cpu time | wall time |",
                "|---|---|---|---|",
            ]
            for d in densities:
                o, t = (scope, "sliced_chunked", d), (scope, "sliced_torch", d)
                lines.append(
                    f"| {d:.0%} | {med(o, 'peak_growth_mib') / med(t, 'peak_growth_mib'):.2f} | "
                    f"{med(o, 'cpu_s') / med(t, 'cpu_s'):.2f} | {med(o, 'wall_s') / med(t, 'wall_s'):.2f} |"
                )
        lines += ["", "Loss of the first timed step (all paths must agree):", ""]
        for d in densities:
            vals = ", ".join(
                f"{p} {results[(scope, p, d)][0]['loss']:.5f}" for p in paths if (scope, p, d) in results
            )
            lines.append(f"- {d:.0%}: {vals}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _scope_title(scope: str) -> str:
    if scope == "head":
        return "Head + loss only (no model body)"
    parts = ["Whole model step"]
    ckpt = re.search(r"_ckpt(\d*)", scope)
    if ckpt:
        parts.append(
            "activation checkpointing per block"
            + (f" and per {ckpt.group(1)}-token segment" if ckpt.group(1) else "")
            + " (all paths alike)"
        )
    if scope.endswith("_kept"):
        parts.append("gradient buffers kept between steps")
    return ", ".join(parts)


def _code_version() -> str:
    """Which rwkvslice ran: the git commit of its source tree, or the path of a snapshot without .git."""
    import rwkvslice

    src = os.path.dirname(os.path.dirname(os.path.abspath(rwkvslice.__file__)))
    try:
        commit = subprocess.run(
            ["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", src, "status", "--porcelain", "--", "."], capture_output=True, text=True, check=True
        ).stdout.strip()
        return f"rwkvslice at git {commit}{' with uncommitted changes' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("RWKVSLICE_BENCH_COMMIT", "unknown commit")
        return f"rwkvslice snapshot of git {commit} in {src}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or "unknown CPU"


def _mem_total_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"^MemTotal:\s+(\d+) kB", f.read(), re.M).group(1)) / 2**20
    except (OSError, AttributeError):
        return float("nan")


if __name__ == "__main__":
    sys.exit(main())
