"""WKV-7 kernel benchmark -> reports/bench-kernel.md.

Forward and forward+backward milliseconds and peak memory at the official benchmark shape (B=8, T=4096,
C=4096, head size 64, bf16 inputs), side by side in one run:
- rwkvslice backend="cuda" (our backstepping kernel, JIT-built from src/rwkvslice/cuda),
- the official RWKV-LM "wind_backstepping" wkv7 kernel, JIT-built from a checkout of BlinkDL/RWKV-LM
  that YOU provide with --rwkv-lm (its code is read from there at run time and never copied into this
  repository): RWKV-v7/train_temp/cuda/wkv7_cuda.cu + wkv7_op.cpp, present up to commit 4cd8e31 (2025-07;
  later train_temp has only the rwkv7_clampw kernels), or the RWKV-v5/cuda/ pair (which later became a MUSA
  port: check out an older commit then). --rwkv-lm may also point at the directory holding the pair.
- rwkvslice backend="torch" on the GPU (the pure-PyTorch path).
Each contender runs `--rounds` times after warm-up, rounds interleaved; medians and ratios to the official
kernel are reported. Timing uses CUDA events around the op and its backward (autograd.grad w.r.t. all six
inputs, random upstream gradient). Peak memory is torch.cuda.max_memory_allocated during one fwd+bwd,
minus what was allocated before (the inputs and upstream gradient). Outputs of ours and the official kernel
are compared (RMS-relative) so the timings are of the same computation.

The official kernel starts from a zero state and returns no final state; ours is run with state=None
(it still allocates and returns the fp32 final state).

Without a CUDA device this writes a report saying that nothing was measured and exits with status 1.

Usage: python benchmarks/bench_kernel.py --rwkv-lm /path/to/RWKV-LM [--B 8 --T 4096 --C 4096 --rounds 20]
       [--skip-torch] [--out reports/bench-kernel.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
HEAD_SIZE = 64
OFFICIAL_CHUNK_LEN = 16  # the official kernel's -D_CHUNK_LEN_ (its wrapper requires T % 16 == 0)
OFFICIAL_PAIRS = ("RWKV-v7/train_temp/cuda", "RWKV-v5/cuda")
PUBLISHED = (
    "Published H100 figures for context (johanwind/wind_rwkv README, fwd+bwd at (8, 64, 4096)): "
    "backstepping fp32 smallhead (~ the official kernel) 17 ms, chunked bf16 8 ms, FLA chunk_rwkv7 64 ms."
)


def git_commit(path: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def header(command: str) -> list[str]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return [
        "# WKV-7 kernel benchmark",
        "",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- Machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPU cores, GPU: {gpu}",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"rwkvslice commit {git_commit(ROOT)}",
        f"- Command: `{command}`",
        "",
    ]


def write_not_run(out: Path, command: str, reason: str) -> None:
    lines = header(command) + [
        "## Not run yet",
        "",
        f"Nothing was measured: {reason}. Run the command above on a CUDA machine with a checkout of "
        "BlinkDL/RWKV-LM (`--rwkv-lm PATH`) to fill this report. There are no numbers here on purpose.",
        "",
        PUBLISHED,
        "",
    ]
    out.write_text("\n".join(lines))


def make_inputs(B: int, T: int, C: int, seed: int = 0):
    """Model-like bf16 inputs (B, T, H, N): decay in (0.545, 1), a = -kk, b = kk * iclr."""
    H = C // HEAD_SIZE
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn():
        return torch.randn(B, T, H, HEAD_SIZE, device="cuda", generator=g)

    r, k, v = randn(), randn(), randn()
    w = -F.softplus(-randn()) - 0.5
    kk = F.normalize(randn(), dim=-1)
    a, b = -kk, kk * torch.sigmoid(randn())
    xs = [x.to(torch.bfloat16).contiguous() for x in (r, w, k, v, a, b)]
    return xs, randn().to(torch.bfloat16)


# ---- contenders: each is fn(r, w, k, v, a, b) -> y, differentiable -----------------------------------


def ours(r, w, k, v, a, b):
    from rwkvslice.ops.wkv7_cuda import wkv7_cuda

    return wkv7_cuda(r, w, k, v, a, b)[0]


def torch_backend(r, w, k, v, a, b):
    from rwkvslice.ops.wkv7_torch import wkv7_torch

    return wkv7_torch(r, w, k, v, a, b)[0]


def load_official(checkout: Path):
    """JIT-build the official kernel from the user's checkout; return fn(r, w, k, v, a, b) -> y."""
    from torch.utils.cpp_extension import load

    candidates = [checkout] + [checkout / rel for rel in OFFICIAL_PAIRS]
    found = [d for d in candidates if (d / "wkv7_cuda.cu").exists() and (d / "wkv7_op.cpp").exists()]
    if not found:
        raise SystemExit(
            f"bench_kernel: no wkv7_cuda.cu + wkv7_op.cpp in {checkout} or under {', '.join(OFFICIAL_PAIRS)}; "
            "check out RWKV-LM commit 4cd8e31 (or pass the directory holding the pair)"
        )
    d = found[0]
    if "musa" in (d / "wkv7_op.cpp").read_text().lower():
        raise SystemExit(f"bench_kernel: {d}/wkv7_op.cpp is the MUSA port; check out an older RWKV-LM commit")
    flags = [
        "-res-usage",
        f"-D_C_={HEAD_SIZE}",
        f"-D_CHUNK_LEN_={OFFICIAL_CHUNK_LEN}",
        "--use_fast_math",
        "-O3",
        "-Xptxas -O3",
        "--extra-device-vectorization",
    ]  # the flags its own trainer uses
    build_dir = Path(tempfile.gettempdir()) / "rwkvslice-bench-official"
    build_dir.mkdir(exist_ok=True)
    load(
        name="wind_backstepping",
        sources=[str(d / "wkv7_cuda.cu"), str(d / "wkv7_op.cpp")],
        is_python_module=False,
        extra_cuda_cflags=flags,
        build_directory=str(build_dir),
        verbose=False,
    )
    ops = torch.ops.wind_backstepping

    class Official(torch.autograd.Function):
        # Its op order is (w, q=r, k, v, z=a, b); y bf16, s = per-chunk fp32 snapshots, sa = S a per step.
        @staticmethod
        def forward(ctx, r, w, k, v, a, b):
            B, T, H, N = r.shape
            y = torch.empty_like(v)
            s = torch.empty(B, H, T // OFFICIAL_CHUNK_LEN, N, N, dtype=torch.float32, device=r.device)
            sa = torch.empty(B, T, H, N, dtype=torch.float32, device=r.device)
            ops.forward(w, r, k, v, a, b, y, s, sa)
            ctx.save_for_backward(r, w, k, v, a, b, s, sa)
            return y

        @staticmethod
        def backward(ctx, dy):
            r, w, k, v, a, b, s, sa = ctx.saved_tensors
            dr, dw, dk, dv, da, db = (torch.empty_like(x) for x in (r, w, k, v, a, b))
            ops.backward(w, r, k, v, a, b, dy.contiguous(), s, sa, dw, dr, dk, dv, da, db)
            return dr, dw, dk, dv, da, db

    return Official.apply, f"{d} @ {git_commit(d)}"


# ---- measurement ---------------------------------------------------------------------------------------


def fwd_bwd(fn, xs, gy):
    leaves = [x.detach().requires_grad_(True) for x in xs]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, gy)
    return y.detach(), grads


def time_once(fn, xs, gy) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of one call."""
    leaves = [x.detach().requires_grad_(True) for x in xs]
    start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    start.record()
    y = fn(*leaves)
    mid.record()
    torch.autograd.grad(y, leaves, gy)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(mid), start.elapsed_time(end)


def peak_extra_bytes(fn, xs, gy) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fwd_bwd(fn, xs, gy)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return peak - base


def rms_rel(got, want) -> float:
    want = want.double()
    return ((got.double() - want).square().mean().sqrt() / want.square().mean().sqrt()).item()


def gpu_facts() -> list[str]:
    """What this GPU and torch decided for rwkvslice's GPU-only paths: the kernel's first-use self-check
    (bf16, N=64, against the torch backend) and the chunked loss's grad_W path (issue 17)."""
    from rwkvslice.ops import selfcheck
    from rwkvslice.ops.wkv7_cuda import wkv7_cuda
    from rwkvslice.ops.wkv7_torch import wkv7_torch
    from rwkvslice.slicing import chunked

    try:
        problem = selfcheck.check_wkv7(wkv7_cuda, wkv7_torch, torch.bfloat16, HEAD_SIZE, "cuda")
    except Exception as e:  # report it; the timings above stand
        problem = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    fast = chunked._has_fp32_out_addmm(torch.device("cuda"), torch.bfloat16)
    path, verdict = ("addmm_fp32_out", "accepted") if fast else ("upcast_fp32", "refused")
    return [
        f"- Kernel self-check on this GPU (bf16, N={HEAD_SIZE}, forward + backward against the torch backend): "
        f"{problem or 'agrees'}.",
        f"- Chunked loss grad_W path here: {path} (addmm(out_dtype=float32) with bf16 inputs {verdict} by "
        f"torch {torch.__version__}).",
        "",
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rwkv-lm", type=Path, help="path to a checkout of BlinkDL/RWKV-LM (for the official kernel)"
    )
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--C", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--torch-rounds", type=int, default=3, help="rounds for the (slow) torch backend")
    p.add_argument("--skip-torch", action="store_true", help="leave out the torch backend")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench-kernel.md")
    args = p.parse_args(argv)
    command = " ".join(["python benchmarks/bench_kernel.py", *(sys.argv[1:] if argv is None else argv)])
    args.out.parent.mkdir(parents=True, exist_ok=True)

    if not torch.cuda.is_available():
        reason = f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False)"
        write_not_run(args.out, command, reason)
        print(f"bench_kernel: {reason}; nothing measured, wrote {args.out} saying so", file=sys.stderr)
        return 1
    if args.T % OFFICIAL_CHUNK_LEN or args.C % HEAD_SIZE:
        p.error(f"--T must be a multiple of {OFFICIAL_CHUNK_LEN} (official kernel) and --C of {HEAD_SIZE}")

    xs, gy = make_inputs(args.B, args.T, args.C)
    contenders = {"rwkvslice cuda": ours}
    official_src = "not run (no --rwkv-lm given)"
    if args.rwkv_lm:
        contenders["official wind_backstepping"], official_src = load_official(args.rwkv_lm)
    if not args.skip_torch:
        contenders["rwkvslice torch (GPU)"] = torch_backend

    # Agreement with the official kernel (same inputs, zero initial state).
    agreement = {}
    if "official wind_backstepping" in contenders:
        y_o, g_o = fwd_bwd(contenders["official wind_backstepping"], xs, gy)
        y_r, g_r = fwd_bwd(ours, xs, gy)
        agreement = {"y": rms_rel(y_r, y_o)} | {
            f"d{n}": rms_rel(a, b) for n, a, b in zip("rwkvab", g_r, g_o, strict=True)
        }
        del y_o, g_o, y_r, g_r

    results: dict[str, list[tuple[float, float]]] = {}
    memory: dict[str, int] = {}
    failed: dict[str, str] = {}
    for name, fn in contenders.items():
        try:
            for _ in range(2):  # warm-up: JIT build, allocator, autotuning of cuBLAS in the torch path
                time_once(fn, xs, gy)
            memory[name] = peak_extra_bytes(fn, xs, gy)
            results[name] = []
        except torch.cuda.OutOfMemoryError as e:
            failed[name] = f"out of memory ({str(e).splitlines()[0]})"
            torch.cuda.empty_cache()
    for i in range(max(args.rounds, args.torch_rounds)):
        for name, fn in contenders.items():
            rounds = args.torch_rounds if "torch" in name else args.rounds
            if name in results and i < rounds:
                results[name].append(time_once(fn, xs, gy))

    H = args.C // HEAD_SIZE
    base = results.get("official wind_backstepping")
    base_total = statistics.median(t for _, t in base) if base else None
    lines = header(command) + [
        f"Shape: B={args.B}, T={args.T}, C={args.C} (H={H}, N={HEAD_SIZE}), bf16 inputs. "
        f"Official kernel: {official_src}.",
        "",
        "| contender | rounds | forward ms (median) | fwd+bwd ms (median) | fwd+bwd / official | peak extra memory |",
        "|---|---|---|---|---|---|",
    ]
    for name, ts in results.items():
        fwd = statistics.median(f for f, _ in ts)
        total = statistics.median(t for _, t in ts)
        ratio = f"{total / base_total:.2f}" if base_total else "n/a"
        lines.append(
            f"| {name} | {len(ts)} | {fwd:.2f} | {total:.2f} | {ratio} | {memory[name] / 2**30:.2f} GiB |"
        )
    for name, why in failed.items():
        lines.append(f"| {name} | 0 | {why} | | | |")
    lines.append("")
    if agreement:
        lines += [
            "Agreement of rwkvslice cuda with the official kernel (RMS-relative): "
            + ", ".join(f"{k} {v:.1e}" for k, v in agreement.items()),
            "",
        ]
    lines += gpu_facts() + [PUBLISHED, ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
