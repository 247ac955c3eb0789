"""Small driver for tools/gpu_check.sh: build the CUDA extension and report, or run the kernel once.

    python tools/gpu_kernel_run.py build     JIT-build the CUDA WKV-7 extension (one line on failure, then the
                                             tail of the build log it names); then the first-use self-checks
                                             run directly on this GPU (kernel vs the torch backend for bf16 /
                                             fp32 and every compiled head size; the chunked loss's bf16
                                             gradient GEMMs vs its fp32 path), the fp32-out addmm probe, and
                                             which grad_W path a bf16 autocast loss step took.
    python tools/gpu_kernel_run.py sanitize  a small forward + backward through backend="cuda" (bf16 with a
                                             state and T not a multiple of the chunk; fp32 from zero state),
                                             for compute-sanitizer; prints "ran" at the end.

Exit status 0 when everything reported ok, 1 otherwise, 3 when there is no CUDA device.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path


def no_cuda() -> bool:
    import torch

    if torch.cuda.is_available():
        return False
    print(f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}, is_available() False)")
    return True


def build() -> int:
    import torch

    from rwkvslice.cuda.build import KernelBuildError, load_cuda_extension

    t0 = time.perf_counter()
    try:
        name = load_cuda_extension()
    except KernelBuildError as e:
        print(f"build: FAILED: {e}")
        match = re.search(r"see (\S+)$", str(e))
        if match and Path(match.group(1)).exists():
            print("".join(Path(match.group(1)).read_text().splitlines(keepends=True)[-80:]))
        return 1
    print(f"build: ok, {name} in {time.perf_counter() - t0:.1f} s on {torch.cuda.get_device_name(0)}")
    return report_selfchecks()


def report_selfchecks() -> int:
    import torch

    from rwkvslice.ops import selfcheck as wkv7_selfcheck
    from rwkvslice.ops.wkv7_cuda import CUDA_HEAD_SIZES, wkv7_cuda
    from rwkvslice.ops.wkv7_torch import wkv7_torch
    from rwkvslice.slicing import chunked, linear_cross_entropy
    from rwkvslice.slicing import selfcheck as loss_selfcheck

    failures = 0
    for dtype in (torch.bfloat16, torch.float32):
        for N in CUDA_HEAD_SIZES:
            problem = wkv7_selfcheck.check_wkv7(wkv7_cuda, wkv7_torch, dtype, N, "cuda")
            failures += problem is not None
            print(f"selfcheck wkv7 {dtype} N={N}: {problem or 'ok'}")
    problem = loss_selfcheck.check_low_precision_grad_gemm("cuda", torch.bfloat16)
    failures += problem is not None
    print(f"selfcheck chunked-loss bf16 gradient GEMMs: {problem or 'ok'}")
    probe = chunked._has_fp32_out_addmm(torch.device("cuda"), torch.bfloat16)
    print(f"addmm(out_dtype=float32, out=fp32) with bf16 inputs on CUDA, torch {torch.__version__}: "
          f"{'supported' if probe else 'not supported'}")
    x = torch.randn(64, 128, device="cuda", requires_grad=True)
    w = torch.randn(1000, 128, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (64,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        linear_cross_entropy(x, w, t, impl="chunked").backward()
    print(f"chunked loss grad_W path (bf16 autocast, CUDA): {chunked.last_grad_w_path()}")
    return 1 if failures else 0


def sanitize() -> int:
    import torch

    from rwkvslice.ops import wkv7

    torch.manual_seed(0)
    for dtype, N, T, with_state in ((torch.bfloat16, 64, 37, True), (torch.float32, 16, 16, False)):
        xs = [torch.randn(2, T, 2, N, device="cuda").to(dtype).requires_grad_() for _ in range(6)]
        with torch.no_grad():
            xs[1].copy_(-torch.nn.functional.softplus(-xs[1].float()) - 0.5)  # the kernel's w range
        state = torch.randn(2, 2, N, N, device="cuda", requires_grad=True) if with_state else None
        y, s = wkv7(*xs, state, backend="cuda")
        (y.float().square().sum() + s.square().sum()).backward()
    torch.cuda.synchronize()
    print("ran")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("build", "sanitize"):
        print(__doc__, file=sys.stderr)
        return 2
    if no_cuda():
        return 3
    return build() if argv[0] == "build" else sanitize()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
