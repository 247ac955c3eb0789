"""PEFT benchmark -> reports/bench-peft.md: full fine-tuning vs LoRA r=16 vs state tuning.

One training step as `rwkvslice train` runs it (`train_step`: forward, backward, grad clip, AdamW) on a
0.4B-shaped model (24 layers x 1024, vocab 65536) at ctx_len 512, batch 1, fp32 on the CPU, every
target kept. Each configuration runs in a fresh process, so its peak memory is its own:
  - peak memory growth: the process's max RSS after the steps minus before the first step (the model is
    already built, so this is gradients + AdamW state + activations, what fine-tuning adds);
  - peak live tensor bytes (a second, independent measure, what torch.cuda.max_memory_allocated would
    show a GPU user, less the model): one more step, untimed, under `LiveTensorBytes`, a
    TorchDispatchMode that adds up the storages the ops create and subtracts each when it is freed,
    counting the AdamW state that lives across steps from the start. RSS also holds what glibc's
    allocator keeps after frees (its high-water mark) and the BLAS / oneDNN work buffers; this does not;
  - saved for backward: the bytes autograd keeps from forward to backward in that step (each storage
    once, parameters not counted), counted with torch.autograd.graph.saved_tensors_hooks;
  - step time: median over the timed steps after one warm-up step;
  - checkpoint sizes: the files a run writes (full: its weights file + optimizer.pt; LoRA / state:
    peft.safetensors + optimizer.pt) against the base file (the official .pth, fp32).

Goals (issue 12): LoRA's peak <= 35 % of full's, state tuning's <= LoRA's, neither slower per step than
full; a LoRA checkpoint under 5 % of the base file.

Usage (heavy: ~8 GB for full fine-tuning):
    flock /tmp/rwkvslice-heavy.lock python benchmarks/bench_peft.py [--rounds 2] [--threads 1]
        [--mmap-threshold BYTES]

--mmap-threshold also runs every configuration a second time with MALLOC_MMAP_THRESHOLD_=BYTES in its
environment (glibc then serves each allocation of at least BYTES by its own mmap and returns it to the
system when freed, so RSS follows live memory more closely, at some speed cost) and reports that run in
a second table. The goal verdicts are computed from the first run, the default allocator.
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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab=65536, n_embd=1024, n_layer=24, head_size=64)
CTX, BATCH = 512, 1
if os.environ.get("BENCH_PEFT_SMOKE"):  # a tiny shape to check the script itself, not for the report
    SHAPE, CTX = dict(vocab=320, n_embd=64, n_layer=2, head_size=32), 32
CASES = ["full", "lora", "state"]


def live_tensor_bytes_mode():
    """A TorchDispatchMode instance tracking the bytes of live tensor storages (class built lazily so that
    the parent process does not import torch)."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveTensorBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self._refs: dict[int, weakref.ref] = {}

        def track(self, t):
            st = t.untyped_storage()
            key, n = id(st), st.nbytes()
            ref = self._refs.get(key)
            if n == 0 or (ref is not None and ref() is st):
                return
            self._refs[key] = weakref.ref(st, lambda _, key=key, n=n: self._freed(key, n))
            self.live += n
            self.peak = max(self.peak, self.live)

        def _freed(self, key, n):
            self.live -= n
            self._refs.pop(key, None)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # outputs on an input's storage (views, in-place and out= ops) allocated nothing
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.track(t)
            return out

    return LiveTensorBytes()


def worker(cfg: dict) -> dict:
    import torch

    from rwkvslice import RWKV7, RWKV7Config
    from rwkvslice.peft import TuneSpec, prepare
    from rwkvslice.train import checkpoint as ckpt_io
    from rwkvslice.train.distributed import DistEnv
    from rwkvslice.train.optim import build_optimizer
    from rwkvslice.train.step import LossModule, train_step

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(vocab_size=SHAPE["vocab"], n_embd=SHAPE["n_embd"], n_layer=SHAPE["n_layer"],
                              head_size=SHAPE["head_size"]))
    n_params = sum(p.numel() for p in model.parameters())
    if cfg["tune"] == "lora":
        prepare(model, TuneSpec(kind="lora", lora_r=16, lora_alpha=32))
    elif cfg["tune"] == "state":
        prepare(model, TuneSpec(kind="state"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(1, SHAPE["vocab"], (BATCH, CTX), generator=g)
    targets = torch.randint(1, SHAPE["vocab"], (BATCH, CTX), generator=g)
    module, env = LossModule(model), DistEnv(0, 1, 0, torch.device("cpu"))

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(cfg["rounds"] + 1):  # step 0 is the warm-up (allocates the AdamW state)
        t0 = time.perf_counter()
        train_step(module, opt, [(idx, targets)], env, precision="fp32", grad_clip=1.0)
        if i:
            times.append(time.perf_counter() - t0)
    # One more step, untimed: peak live tensor bytes (AdamW's state counted from the start) and what
    # autograd saves for backward (each storage once, parameters not counted).
    live = live_tensor_bytes_mode()
    for state in opt.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                live.track(t)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with live, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(module, opt, [(idx, targets)], env, precision="fp32", grad_clip=1.0)
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024

    sizes = {}
    with tempfile.TemporaryDirectory(dir=cfg["tmp"]) as d:
        model.peft_base = {"init_from": None, "sha256": "benchmark"}
        path = ckpt_io.save_checkpoint(Path(d), 1, model=model, optimizer=opt, trainer_state={},
                                       run_info={}, keep=1)
        sizes = {f.name: f.stat().st_size for f in path.iterdir()}
        if cfg["tune"] == "full":
            model.save_official(Path(d) / "base.pth")
            sizes["base.pth"] = (Path(d) / "base.pth").stat().st_size
    return {"median_s": statistics.median(times), "times": times, "rss_growth_mb": growth_mb,
            "live_peak_mb": live.peak / 2**20, "saved_mb": sum(saved.values()) / 2**20,
            "weights_file": ckpt_io.WEIGHTS_FILE if cfg["tune"] == "full" else "peft.safetensors",
            "params": n_params, "trainable": trainable, "sizes": sizes, "threads": torch.get_num_threads()}


def run_worker(cfg: dict, extra_env: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), **(extra_env or {}))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True,
                          timeout=3600, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mb(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def memory_table(results: dict) -> list[str]:
    full = results["full"]
    lines = [
        "| tune | trainable params | peak memory growth, max RSS (MB) | vs full | peak live tensors (MB) | vs full "
        "| saved for backward (MB) | step (s) | vs full |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in CASES:
        r = results[k]
        lines.append(f"| {k} | {r['trainable']:,} | {r['rss_growth_mb']:,.0f} | "
                     f"{r['rss_growth_mb'] / full['rss_growth_mb']:.1%} | {r['live_peak_mb']:,.0f} | "
                     f"{r['live_peak_mb'] / full['live_peak_mb']:.1%} | {r['saved_mb']:,.0f} | {r['median_s']:.2f} | "
                     f"{r['median_s'] / full['median_s']:.2f}x |")
    return lines


def report(results: dict, args, load: tuple[float, float], mmap_results: dict | None = None) -> str:
    import torch

    full, lora, state = (results[k] for k in CASES)
    command = f"--rounds {args.rounds} --threads {args.threads}"
    if args.mmap_threshold:
        command += f" --mmap-threshold {args.mmap_threshold}"
    base = full["sizes"]["base.pth"]
    lines = [
        "# PEFT benchmark: full fine-tuning vs LoRA r=16 vs state tuning",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({cpu_model()}), {platform.system()} "
        f"{platform.release()}",
        f"- Versions: python {platform.python_version()}, torch {torch.__version__}, rwkvslice (this checkout)",
        f"- Command: `flock /tmp/rwkvslice-heavy.lock python benchmarks/bench_peft.py {command}`",
        f"- Load average (1 min) before / after: {load[0]:.1f} / {load[1]:.1f} (shared machine: absolute times "
        "move with the load; the ratios of one run are the point)",
        f"- Model: {SHAPE['n_layer']} layers x {SHAPE['n_embd']}, vocab {SHAPE['vocab']} "
        f"({full['params'] / 1e6:.1f}M parameters), ctx_len {CTX}, batch {BATCH}, every target kept, fp32, CPU, "
        f"{full['threads']} thread(s). One `train_step` (forward, backward, grad clip, AdamW); median of "
        f"{args.rounds} steps after a warm-up step; each configuration in a fresh process.",
        "- Peak memory growth = max RSS after the steps minus before the first one (gradients, AdamW state, "
        "activations: what training adds to the loaded model); the goals are judged on it.",
        "- Peak live tensors = the high-water mark of live tensor storages during one more (untimed) step, AdamW "
        "state included, model weights not (a TorchDispatchMode counting each storage an op creates until it "
        "is freed: what `torch.cuda.max_memory_allocated` would show on a GPU, less the model). Unlike RSS it "
        "leaves out what glibc's allocator keeps after frees and the BLAS / oneDNN work buffers.",
        "- Saved for backward = the bytes autograd keeps from forward to backward in that step (each storage "
        "once, parameters not counted; `torch.autograd.graph.saved_tensors_hooks`).",
        "",
        *memory_table(results),
    ]
    goal_mem = lora["rss_growth_mb"] <= 0.35 * full["rss_growth_mb"]
    goal_state = state["rss_growth_mb"] <= lora["rss_growth_mb"]
    goal_speed = lora["median_s"] <= full["median_s"] and state["median_s"] <= full["median_s"]
    lines += [
        "",
        f"Goals: LoRA peak <= 35 % of full: **{'met' if goal_mem else 'NOT met'}** "
        f"({lora['rss_growth_mb'] / full['rss_growth_mb']:.1%}); state <= LoRA: "
        f"**{'met' if goal_state else 'NOT met'}** ({state['rss_growth_mb']:,.0f} vs {lora['rss_growth_mb']:,.0f} MB); "
        f"neither slower than full: **{'met' if goal_speed else 'NOT met'}** (LoRA "
        f"{lora['median_s'] / full['median_s']:.2f}x, state {state['median_s'] / full['median_s']:.2f}x of full's "
        "step time).",
        "",
        f"For information, by peak live tensors: LoRA {lora['live_peak_mb'] / full['live_peak_mb']:.1%} of full, "
        f"state {state['live_peak_mb'] / full['live_peak_mb']:.1%}.",
        "",
    ]
    if mmap_results is not None:
        m_full, m_lora, m_state = (mmap_results[k] for k in CASES)
        lines += [
            f"## The same with MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}",
            "",
            f"Every configuration again in a fresh process with `MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}` in "
            "its environment: glibc serves each allocation of at least that many bytes by its own mmap and "
            "unmaps it when freed, so freed activations leave RSS at once. Reported, not used for the goals.",
            "",
            *memory_table(mmap_results),
            "",
            f"With this setting: LoRA peak {m_lora['rss_growth_mb'] / m_full['rss_growth_mb']:.1%} of full's "
            f"(max RSS), state {m_state['rss_growth_mb'] / m_full['rss_growth_mb']:.1%}.",
            "",
        ]
    lines += [
        "## Checkpoint sizes",
        "",
        f"Base file (`save_official`, fp32): {mb(base)} MB.",
        "",
        "| tune | weights file | weights (MB) | optimizer.pt (MB) | checkpoint dir (MB) | weights / base "
        "| dir / base |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in CASES:
        s = results[k]["sizes"]
        wname = results[k]["weights_file"]
        total = sum(v for n, v in s.items() if n != "base.pth")
        lines.append(f"| {k} | {wname} | {mb(s[wname])} | {mb(s['optimizer.pt'])} | {mb(total)} | "
                     f"{s[wname] / base:.2%} | {total / base:.2%} |")
    lora_total = sum(v for n, v in lora["sizes"].items())
    lines += [
        "",
        f"Goal: a LoRA checkpoint under 5 % of the base file: **{'met' if lora_total < 0.05 * base else 'NOT met'}** "
        f"(the whole directory, AdamW moments included, is {lora_total / base:.2%}; the adapter weights alone "
        f"{lora['sizes']['peft.safetensors'] / base:.2%}).",
        "",
        "Raw step times (s): "
        + "; ".join(f"{k} " + ", ".join(f"{t:.2f}" for t in results[k]["times"]) for k in CASES),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench-peft.md"))
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where the checkpoints are written")
    ap.add_argument("--mmap-threshold", type=int, default=0,
                    help="also run every configuration with MALLOC_MMAP_THRESHOLD_ set to this (bytes)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    load0 = os.getloadavg()[0]

    def run_all(extra_env: dict | None) -> dict:
        results = {}
        for k in CASES:
            cfg = {"tune": k, "rounds": args.rounds, "threads": args.threads, "tmp": args.tmp}
            results[k] = run_worker(cfg, extra_env)
            print(k, extra_env or "", json.dumps(results[k]), file=sys.stderr)
            if "error" in results[k]:
                raise SystemExit(f"{k}: {results[k]['error']}")
        return results

    results = run_all(None)
    mmap_results = run_all({"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)}) if args.mmap_threshold else None
    text = report(results, args, (load0, os.getloadavg()[0]), mmap_results)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
