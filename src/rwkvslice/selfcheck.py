"""Self-checks of GPU-only code before "auto" trusts it: the shared verdict cache and comparison.

CPU CI never executes the CUDA paths, so the first time a process would use one of them it runs it once on
a small random problem beside a trusted path on the same device, and keeps the verdict:

- ops/selfcheck.py, wkv7_kernel_trusted(r): the CUDA WKV-7 kernel (forward + backward, per device, compute
  dtype and head size) against the "torch" backend. Used by wkv7(backend="auto").
- slicing/selfcheck.py, low_precision_grad_gemm_trusted(device, dtype): the chunked loss's low-precision
  gradient GEMMs (bf16/fp16 dlogits, fp32 grad_W accumulator) against its fp32 gradient path.

When outputs or gradients differ beyond the dtype's tolerance (RMS-relative), or the path raises, a warning
says once what differed and by how much, and the trusted path is used from then on. The cost is a few
milliseconds once per process and key. Problems are drawn from private generators, so the caller's RNG
streams are untouched. RWKVSLICE_SKIP_SELFCHECK=1 skips the checks (everything is trusted), on a machine
where the GPU test layer passed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

SKIP_ENV = "RWKVSLICE_SKIP_SELFCHECK"

_verdicts: dict[tuple, bool] = {}


def reset() -> None:
    """Forget every verdict (tests)."""
    _verdicts.clear()


def skipped() -> bool:
    return os.environ.get(SKIP_ENV) == "1"


def rms_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """RMS(got - want) / RMS(want) in fp64."""
    want = want.detach().double()
    diff = got.detach().double() - want
    return (diff.square().mean().sqrt() / want.square().mean().sqrt().clamp_min(1e-30)).item()


def compare(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], tol: float) -> str | None:
    """None when every (got, want) pair agrees within tol; else one line naming each that did not."""
    bad = []
    for name, (got, want) in pairs.items():
        if got.shape != want.shape:
            bad.append(f"{name} shape {tuple(got.shape)} != {tuple(want.shape)}")
        elif not bool(torch.isfinite(got).all()):
            bad.append(f"{name} has non-finite values")
        else:
            err = rms_rel(got, want)
            if not err <= tol:
                bad.append(f"{name} RMS-relative {err:.1e}")
    return None if not bad else ", ".join(bad) + f" (tolerance {tol:.0e})"


def decide(key: tuple, run: Callable[[], str | None], what: str, consequence: str) -> bool:
    """The cached verdict for key; the first time, run() (None = agrees, else what differed) decides and a
    failure warns once."""
    if skipped():
        return True
    if key not in _verdicts:
        try:
            problem = run()
        except Exception as e:  # a failing kernel is a verdict, never a crash of the caller
            problem = f"it raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if problem is not None:
            warnings.warn(
                f"rwkvslice: self-check failed: {what}: {problem}; {consequence} from now on "
                f"({SKIP_ENV}=1 skips these checks)",
                stacklevel=4,
            )
        _verdicts[key] = problem is None
    return _verdicts[key]
