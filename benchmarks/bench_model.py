"""Model benchmarks -> reports/bench-model.md.

1. CPU token-by-token generation (RNN mode), rwkvslice vs the official `rwkv` package on the same fp32
   weights, side by side in one run (alternating rounds; medians and the ratio).
2. CPU forward+backward of the WKV-7 op, backend "torch" vs "reference", with peak memory measured
   in a fresh subprocess per backend (ru_maxrss growth).

Usage: python benchmarks/bench_model.py [--layers 6 --embd 512 --vocab 65536 --tokens 64 --rounds 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def randomized_model(layers: int, embd: int, vocab: int):
    from rwkvslice import RWKV7, RWKV7Config

    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(vocab_size=vocab, n_embd=embd, n_layer=layers, head_size=64))
    with torch.no_grad():  # the official init zeroes output projections; make every layer work
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def bench_generation(args, layers: int, embd: int, vocab: int, rounds: int, batched: bool = True) -> dict:
    """Ours (fused CPU kernels), ours eager (the kernels off) and the package, alternated round by round."""
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    from rwkv.model import RWKV

    from rwkvslice.ops import rnn_step_cpu

    model = randomized_model(layers, embd, vocab)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_official(Path(tmp) / "m.pth")
        ref = RWKV(str(Path(tmp) / "m"), strategy="cpu fp32")

    tokens = torch.randint(0, vocab, (args.tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    fused_kernels = rnn_step_cpu.kernels
    assert fused_kernels() is not None, "the fused CPU kernels did not build"

    def run_ours(streams: int = 1, fused: bool = True) -> float:
        rnn_step_cpu.kernels = fused_kernels if fused else (lambda: None)  # type: ignore[assignment]
        try:
            state = model.init_state(streams)
            t0 = time.perf_counter()
            with torch.inference_mode():
                for tok in tokens:
                    _, state = model.step(torch.full((streams,), tok), state)
            return streams * len(tokens) / (time.perf_counter() - t0)
        finally:
            rnn_step_cpu.kernels = fused_kernels

    def run_ref() -> float:
        state = None
        t0 = time.perf_counter()
        with torch.inference_mode():
            for tok in tokens:
                _, state = ref.forward([tok], state)
        return len(tokens) / (time.perf_counter() - t0)

    contenders = {"ours": run_ours, "eager": lambda: run_ours(fused=False), "rwkv": run_ref}
    if batched:  # `streams` sequences at once, as rwkvslice.generate batches prompts
        contenders["batched"] = lambda: run_ours(args.streams)
    for fn in contenders.values():  # warm-up (TorchScript compiles on first calls)
        fn()
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            results[name].append(fn())
    return results


WKV_CHILD = r"""
import json, resource, statistics, sys, time, torch
from rwkvslice.ops import wkv7
backend, B, T, H, N, rounds, threads = sys.argv[1], *map(int, sys.argv[2:8])
if threads:
    torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
def inputs():
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = -torch.nn.functional.softplus(-torch.randn(B, T, H, N, generator=g)) - 0.5
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    a = torch.sigmoid(torch.randn(B, T, H, N, generator=g))
    xs = [r, w, k, v, -kk, kk * a]
    return [x.requires_grad_() for x in xs]
xs = inputs()
saved = {}
def pack(t):  # bytes autograd keeps for backward, each storage counted once
    saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    y, s = wkv7(*xs, backend=backend)
(y.square().sum() + s.square().sum()).backward()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for i in range(rounds + 1):
    t0 = time.perf_counter()
    y, s = wkv7(*xs, backend=backend)
    (y.square().sum() + s.square().sum()).backward()
    if i:  # round 0 is a warm-up
        times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps({"times": times, "peak_kb": peak, "saved_bytes": sum(saved.values())}))
"""


def bench_wkv(args) -> dict:
    out = {}
    for backend in ("reference", "torch"):
        rounds = 3 if backend == "reference" else 7
        proc = subprocess.run(
            [sys.executable, "-c", WKV_CHILD, backend, "4", "512", "4", "64", str(rounds), str(args.threads)],
            capture_output=True, text=True, check=True,
        )
        out[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--embd", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=4, help="sequences of the batched generation row")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--sizes", default="2x128x65536,6x512x256,6x64x256",
                        help="more LAYERSxEMBDxVOCAB sizes for the generation table ('' for none)")
    parser.add_argument("--out", default=str(ROOT / "reports" / "bench-model.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = bench_generation(args, args.layers, args.embd, args.vocab, args.rounds)
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",") if size]
    more = {size: bench_generation(args, *size, rounds=args.rounds, batched=False) for size in sizes}
    wkv = bench_wkv(args)
    from importlib.metadata import version

    import rwkv  # noqa: F401  (version below)

    g_ours, g_ref = statistics.median(gen["ours"]), statistics.median(gen["rwkv"])
    g_eager = statistics.median(gen["eager"])
    med = statistics.median
    size_rows = [
        f"| {L} | {E} | {V} | {med(r['ours']):.1f} | {med(r['eager']):.1f} | {med(r['rwkv']):.1f} | "
        f"**{med(r['ours']) / med(r['rwkv']):.2f}x** | {med(r['eager']) / med(r['rwkv']):.2f}x |"
        for (L, E, V), r in more.items()
    ]
    t_ref = statistics.median(wkv["reference"]["times"])
    t_torch = statistics.median(wkv["torch"]["times"])
    tokens = 4 * 512
    lines = [
        "# Benchmark: model (CPU)",
        "",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Machine: {platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'unknown CPU'}), "
        f"torch threads {torch.get_num_threads()}",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, rwkv {version('rwkv')}, "
        f"rwkvslice {version('rwkvslice')}",
        f"- Command: `python benchmarks/bench_model.py {' '.join(sys.argv[1:])}`".rstrip(),
        "- The machine is shared and noisy: medians over rounds, alternated between the contenders.",
        "",
        f"## Token-by-token generation, fp32, {args.layers} layers, n_embd {args.embd}, vocab {args.vocab}",
        "",
        f"{args.tokens} tokens per round, {args.rounds} rounds, same weights (ours saved with `save_official` "
        "and loaded by the package with strategy `cpu fp32`).",
        "",
        "| implementation | median tokens/s | all rounds |",
        "|---|---|---|",
        f"| rwkvslice `model.step` | {g_ours:.1f} | {', '.join(f'{x:.0f}' for x in gen['ours'])} |",
        f"| rwkvslice eager step (fused kernels off) | {g_eager:.1f} | "
        f"{', '.join(f'{x:.0f}' for x in gen['eager'])} |",
        f"| official `rwkv` package | {g_ref:.1f} | {', '.join(f'{x:.0f}' for x in gen['rwkv'])} |",
        "",
        f"**Ratio ours / official: {g_ours / g_ref:.2f}x** (goal >= 1.0x, stretch 2x). Without the fused CPU "
        f"kernels (ops/rnn_step_cpu.py): {g_eager / g_ref:.2f}x.",
        "",
        "Other sizes, same method (medians of the same number of rounds, alternated):",
        "",
        "| layers | n_embd | vocab | ours tok/s | eager tok/s | package tok/s | ours / package | eager / package |",
        "|---|---|---|---|---|---|---|---|",
        *size_rows,
        "",
        f"Batched (not the goal's measure): `model.step` on {args.streams} sequences at once, as "
        "`rwkvslice.generate` decodes several prompts, gives "
        f"{statistics.median(gen['batched']):.1f} tokens/s in aggregate "
        f"({', '.join(f'{x:.0f}' for x in gen['batched'])}), "
        f"{statistics.median(gen['batched']) / g_ref:.2f}x the package's single-sequence rate (its RNN forward "
        "takes one sequence at a time). Generation here is bound by reading the weights, which a batch "
        "shares.",
        "",
        "## WKV-7 forward + backward, B=4, T=512, H=4, N=64 (fp32)",
        "",
        "Each backend in a fresh subprocess. *Saved for backward*: bytes autograd keeps between forward and",
        "backward (saved_tensors_hooks, each storage once; inputs included). *RSS growth*: ru_maxrss growth",
        "over the timed rounds after one warm-up pass (0 means the warm-up's heap was reused).",
        "",
        "| backend | median ms | tokens/s | saved for backward | RSS growth |",
        "|---|---|---|---|---|",
        f"| reference (loop + autograd) | {t_ref * 1e3:.1f} | {tokens / t_ref:,.0f} | "
        f"{wkv['reference']['saved_bytes'] / 2**20:.1f} MiB | {wkv['reference']['peak_kb'] / 1024:.0f} MiB |",
        f"| torch (chunked, custom backward) | {t_torch * 1e3:.1f} | {tokens / t_torch:,.0f} | "
        f"{wkv['torch']['saved_bytes'] / 2**20:.1f} MiB | {wkv['torch']['peak_kb'] / 1024:.0f} MiB |",
        "",
        f"**Speed-up torch / reference: {t_ref / t_torch:.1f}x** (goal >= 10x).",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
