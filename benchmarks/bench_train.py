"""Training benchmarks -> reports/bench-train.md.

A training step here is what `rwkvslice train` runs: `train_step` (forward, backward, AdamW update)
on one micro-batch. Two loss paths are compared side by side, each in a fresh subprocess per
configuration so peak memory is that configuration's alone:
  - sliced:   `model.loss` (hidden states -> kept rows only -> chunked fused linear + CE);
  - unsliced: full logits `model(idx)` (B x T x V) + masked `F.cross_entropy(ignore_index=-100)`,
              normalised the same way (sum / kept tokens).
Targets are SFT-shaped: each row's last `kept` fraction carries loss, the prompt before it is -100.

CPU: tokens/s (all B x T positions per second, median over rounds) and peak RSS growth over the
process's state before the first step (ru_maxrss; includes AdamW state, identical in both paths).
GPU (only when CUDA is available): a 0.1B-shaped model (12 layers, n_embd 768, vocab 65536) at
ctx_len 512 in bf16 autocast; peak memory is torch.cuda.max_memory_allocated. The report records which
weight-gradient GEMM path the chunked loss took (slicing.chunked.last_grad_w_path: "addmm_fp32_out" is the
fast one). Then the loss alone at that shape (hidden states -> head + cross-entropy, forward + backward,
bf16 autocast, fp32 master weight): ours (impl="chunked") against torch's F.linear_cross_entropy
(impl="torch", where this torch has it) and plain full logits on the kept rows (impl="full"), at 100 % and
25 % kept, so impl="auto" can be set from a measurement.
Also: one end-to-end `rwkvslice train --demo` run (wall and CPU time, exact match).

The machine may be shared: the report records the load average before and after. Ratios between
paths from the same run are the point; absolute numbers move with the load.

Usage: python benchmarks/bench_train.py [--rounds 5] [--threads N] [--skip-demo] [--gpu-only]
       [--out reports/bench-train.md]
(--gpu-only: the GPU sections alone, what tools/gpu_check.sh runs; no CUDA device -> a report saying so, exit 1)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def loss_worker(cfg: dict) -> dict:
    """Head + loss alone, every impl in this one process (rounds interleaved): median ms of forward +
    backward and the peak memory over what was allocated before (x, W and the targets). Meant for CUDA
    (cfg["device"]; on CPU it runs too, for checking the script, with no memory figure)."""
    import torch

    from rwkvslice.slicing import chunked, linear_cross_entropy, torch_chunked_available

    torch.manual_seed(0)
    device = torch.device(cfg.get("device", "cuda"))
    cuda = device.type == "cuda"
    rows, C, V = cfg["rows"], cfg["n_embd"], cfg["vocab"]
    x = torch.randn(rows, C, device=device, requires_grad=True)
    weight = (0.02 * torch.randn(V, C, device=device)).requires_grad_()
    target = torch.randint(0, V, (rows,), device=device)
    impls = ["chunked", "full"] + (["torch"] if torch_chunked_available() else [])

    def run(impl):
        x.grad = weight.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = linear_cross_entropy(x, weight, target, impl=impl) / rows
        loss.backward()
        if cuda:
            torch.cuda.synchronize()

    out: dict = {"impls": {}, "torch_impl": "available" if "torch" in impls else
                 f"not in torch {torch.__version__} (F.linear_cross_entropy with LinearCrossEntropyOptions)"}
    for impl in impls:  # warm-up, then the peak of one step
        run(impl)
        x.grad = weight.grad = None
        peak_mb = 0.0
        if cuda:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run(impl)
            peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        out["impls"][impl] = {"peak_mb": peak_mb, "ms": []}
        if impl == "chunked":
            out["grad_w_path"] = chunked.last_grad_w_path()
    for _ in range(cfg["rounds"]):
        for impl in impls:
            t0 = time.perf_counter()
            run(impl)  # synchronised: wall time of forward + backward
            out["impls"][impl]["ms"].append(1e3 * (time.perf_counter() - t0))
    for r in out["impls"].values():
        r["median_ms"] = statistics.median(r.pop("ms"))
    return out


def worker(cfg: dict) -> dict:
    """Runs in its own process: build, warm up, time `rounds` steps, report."""
    import torch
    import torch.nn.functional as F

    if cfg["mode"] == "loss":
        return loss_worker(cfg)

    from rwkvslice import RWKV7, RWKV7Config
    from rwkvslice.train.distributed import DistEnv
    from rwkvslice.train.optim import build_optimizer
    from rwkvslice.train.step import LossModule, train_step

    class FullLogitsLoss(torch.nn.Module):
        """The unsliced baseline: every position through the head, then a masked CE."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, idx, targets, num_items):
            logits = self.model(idx)
            ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1),
                                 ignore_index=-100, reduction="sum")
            return ce / num_items

    device = torch.device(cfg["device"])
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    c = RWKV7Config(vocab_size=cfg["vocab"], n_embd=cfg["n_embd"], n_layer=cfg["n_layer"],
                    head_size=cfg["head_size"])
    model = RWKV7(c).to(device)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.0)
    B, T = cfg["batch"], cfg["ctx_len"]
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(1, cfg["vocab"], (B, T), generator=g)
    targets = torch.randint(1, cfg["vocab"], (B, T), generator=g)
    n_kept = max(1, round(T * cfg["kept"]))
    targets[:, : T - n_kept] = -100
    idx, targets = idx.to(device), targets.to(device)
    module = LossModule(model) if cfg["mode"] == "sliced" else FullLogitsLoss(model)
    env = DistEnv(0, 1, 0, device)

    def step():
        train_step(module, opt, [(idx, targets)], env, precision=cfg["precision"], grad_clip=1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    step()  # warm-up (allocates AdamW state)
    times = []
    for _ in range(cfg["rounds"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    out = {"median_s": statistics.median(times), "tokens_per_s": B * T / statistics.median(times),
           "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
        out["cuda_peak_total_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if cfg["mode"] == "sliced":
        from rwkvslice.slicing import chunked

        out["grad_w_path"] = chunked.last_grad_w_path()
    return out


def run_worker(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


CPU_CASES = [
    # name, model shape, batch shape, kept fraction
    ("demo model, byte vocab (the demo's own step)", dict(vocab=320, n_embd=128, n_layer=2, head_size=32),
     dict(batch=32, ctx_len=32), 2 / 32),
    ("demo model, World vocab 65536, 25% kept", dict(vocab=65536, n_embd=128, n_layer=2, head_size=32),
     dict(batch=8, ctx_len=256), 0.25),
    ("demo model, World vocab 65536, 5% kept", dict(vocab=65536, n_embd=128, n_layer=2, head_size=32),
     dict(batch=8, ctx_len=256), 0.05),
]
GPU_CASE = ("0.1B shape (L12 D768), World vocab, bf16, 25% kept",
            dict(vocab=65536, n_embd=768, n_layer=12, head_size=64), dict(batch=8, ctx_len=512), 0.25)


LOSS_KEPT = (1.0, 0.25)


def run_gpu(rounds: int) -> dict:
    name, shape, batch, kept = GPU_CASE
    gpu = {mode: run_worker(dict(shape, **batch, kept=kept, mode=mode, device="cuda", precision="bf16",
                                 rounds=rounds)) for mode in ("sliced", "unsliced")}
    for frac in LOSS_KEPT:
        rows = round(batch["batch"] * batch["ctx_len"] * frac)
        gpu[f"loss {frac}"] = run_worker(dict(vocab=shape["vocab"], n_embd=shape["n_embd"], rows=rows,
                                              mode="loss", rounds=max(rounds, 10)))
    return gpu


def gpu_section(gpu: dict | None, gpu_name: str) -> list[str]:
    lines = ["## GPU (0.1B shape: 12 layers, n_embd 768, vocab 65536, ctx_len 512, bf16)", ""]
    if gpu is None:
        lines.append("Not run: no CUDA device on this machine (torch.cuda.is_available() is False). The script "
                     "runs this section automatically on a machine with one.")
        return lines
    name, shape, batch, kept = GPU_CASE
    lines += [f"Device: {gpu_name}. B x T = {batch['batch']} x {batch['ctx_len']}, {kept:.0%} kept.", "",
              "| path | tokens/s | step (s) | peak CUDA memory over the model+AdamW state (MB) |",
              "|---|---|---|---|"]
    for mode in ("sliced", "unsliced"):
        r = gpu[mode]
        if "error" in r:
            lines.append(f"| {mode} | error: {r['error']} | | |")
        else:
            lines.append(f"| {mode} | {r['tokens_per_s']:,.0f} | {r['median_s']:.3f} | {r['cuda_peak_mb']:.0f} |")
    lines += ["", f"Chunked loss weight-gradient path in the sliced step: `{gpu['sliced'].get('grad_w_path')}` "
              "(`addmm_fp32_out`: bf16 GEMM accumulating into the fp32 buffer; `upcast_fp32`: this torch lacks "
              "that addmm overload, an extra n x V fp32 copy per chunk; `fp32`: the low-precision path failed "
              "its self-check).", "",
              "### Head + loss alone (forward + backward, bf16 autocast, fp32 master weight)", "",
              "| kept rows | impl | median ms | peak memory over x, W (MB) | time / chunked | memory / chunked |",
              "|---|---|---|---|---|---|"]
    notes = set()
    for frac in LOSS_KEPT:
        res = gpu[f"loss {frac}"]
        rows = round(batch["batch"] * batch["ctx_len"] * frac)
        if "error" in res:
            lines.append(f"| {rows} ({frac:.0%}) | all | error: {res['error']} | | | |")
            continue
        notes.add(f"impl='torch': {res['torch_impl']}; chunked grad_W path `{res.get('grad_w_path')}`")
        ours = res["impls"]["chunked"]
        for impl, r in res["impls"].items():
            t_ratio, m_ratio = r["median_ms"] / ours["median_ms"], r["peak_mb"] / max(ours["peak_mb"], 1e-9)
            lines.append(f"| {rows} ({frac:.0%}) | {impl} | {r['median_ms']:.2f} | {r['peak_mb']:.0f} | "
                         f"{t_ratio:.2f} | {m_ratio:.2f} |")
    lines += [""] + [f"- {n}" for n in sorted(notes)]
    return lines


def gpu_only(args) -> int:
    import torch

    cmd = "python benchmarks/bench_train.py " + " ".join(sys.argv[1:])
    lines = ["# Training benchmark (GPU sections): sliced vs unsliced loss in a full training step", "",
             f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}",
             f"- Versions: {versions()} (CUDA {torch.version.cuda})", f"- Command: `{cmd.strip()}`",
             f"- Step = `train_step` (forward + backward + grad clip + AdamW, one micro-batch) under bf16 autocast; "
             f"median of {args.rounds} steps after one warm-up step, each configuration in a fresh process.", ""]
    available = torch.cuda.is_available()
    lines += gpu_section(run_gpu(args.rounds) if available else None,
                         torch.cuda.get_device_name(0) if available else "")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if available else 1


def demo_run() -> dict:
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "rwkvslice.cli", "train", "--demo", "--out", str(out / "d"),
                           "--no-progress"], capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
           "rc": proc.returncode}
    try:
        res["exact_match"] = json.loads((out / "d" / "eval.json").read_text())["exact_match"]
    except (OSError, ValueError, KeyError):
        res["exact_match"] = None
    res["memory_line"] = next((line for line in proc.stdout.splitlines() if line.startswith("slicing")), "")
    return res


def versions() -> str:
    import torch

    return f"python {platform.python_version()}, torch {torch.__version__}, rwkvslice (this checkout)"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per CPU worker (default: torch's)")
    ap.add_argument("--gpu-only", action="store_true", help="the GPU sections alone (no CPU cases, no demo)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench-train.md"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch

    if args.gpu_only:
        return gpu_only(args)
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for name, shape, batch, kept in CPU_CASES:
        res = {}
        for mode in ("sliced", "unsliced"):
            cfg = dict(shape, **batch, kept=kept, mode=mode, device="cpu", precision="fp32", rounds=args.rounds,
                       threads=args.threads)
            res[mode] = run_worker(cfg)
            print(name, mode, res[mode], file=sys.stderr)
        rows.append((name, shape, batch, kept, res))
    gpu = run_gpu(args.rounds) if torch.cuda.is_available() else None
    gpu_name = torch.cuda.get_device_name(0) if gpu is not None else ""
    demo = None if args.skip_demo else demo_run()
    load_after = os.getloadavg()

    env_prefix = "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS",) if k in os.environ)
    cmd = env_prefix + "python benchmarks/bench_train.py " + " ".join(sys.argv[1:])
    lines = [
        "# Training benchmark: sliced vs unsliced loss in a full training step",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({platform.processor() or 'cpu'}), "
        f"{platform.system()} {platform.release()}",
        f"- Versions: {versions()}",
        f"- Command: `{cmd.strip()}`",
        f"- Load average (1 min) before / after: {load_before[0]:.1f} / {load_after[0]:.1f} "
        "(the machine is shared; absolute speeds move with the load, ratios from one run are the point)",
        "- Step = `train_step`: forward + backward + grad clip + AdamW, one micro-batch, fp32 on CPU. "
        f"Median of {args.rounds} steps after one warm-up step, each configuration in a fresh process.",
        "- Peak memory (CPU) = growth of the process's max RSS from before the first step (includes the AdamW "
        "state, which is the same in both paths).",
        "",
        "## CPU",
        "",
        "| case | B x T | kept | path | tokens/s | step (s) | peak RSS growth (MB) | speed ratio | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, _shape, batch, kept, res in rows:
        s, u = res["sliced"], res["unsliced"]
        for mode in ("sliced", "unsliced"):
            r = res[mode]
            if "error" in r:
                lines.append(f"| {name} | {batch['batch']} x {batch['ctx_len']} | {kept:.0%} | {mode} | error: "
                             f"{r['error']} | | | | |")
                continue
            ratio_speed = ratio_mem = ""
            if mode == "sliced" and "error" not in u:
                ratio_speed = f"{s['tokens_per_s'] / u['tokens_per_s']:.2f}x faster"
                ratio_mem = f"{u['rss_growth_mb'] / max(s['rss_growth_mb'], 1e-9):.1f}x less"
            lines.append(f"| {name} | {batch['batch']} x {batch['ctx_len']} | {kept:.1%} | {mode} | "
                         f"{r['tokens_per_s']:,.0f} | {r['median_s']:.3f} | {r['rss_growth_mb']:.0f} | "
                         f"{ratio_speed} | {ratio_mem} |")
    lines += ["", f"Threads per worker: {rows[0][4]['sliced'].get('threads', '?')}.", "",
              "Reading: with the byte vocab (V = 320) the logits are small next to the activations, so slicing "
              "saves time but little memory; with the 65536-token World vocab the unsliced path holds B x T x V "
              "fp32 logits plus their gradient, which dominates the step's memory, and its cost does not fall "
              "with the kept fraction while the sliced path's does.", ""]
    lines += gpu_section(gpu, gpu_name if gpu is not None else "")
    lines += ["", "## `rwkvslice train --demo` end to end", ""]
    if demo is None:
        lines.append("Skipped (--skip-demo).")
    else:
        lines += [f"- exit status {demo['rc']}, held-out exact match {demo['exact_match']}",
                  f"- wall time {demo['wall_s']:.0f} s, CPU time (user+sys) {demo['cpu_s']:.0f} s "
                  f"on {os.cpu_count()} cores; with the load above, wall time overstates an idle machine's",
                  f"- its memory note: {demo['memory_line']}"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
