"""Self-check of the chunked loss's low-precision CUDA gradient path (see rwkvslice/selfcheck.py): its
gradients with bf16/fp16 GEMMs against its fp32 gradient GEMMs on the same inputs, once per (device, dtype).
"""

from __future__ import annotations

import torch

from rwkvslice.selfcheck import compare, decide

# Low-precision dlogits carry bf16 (fp16) rounding, ~4e-3 (5e-4) RMS-relative in the gradients.
GRAD_GEMM_RMS_REL = {torch.bfloat16: 3e-2, torch.float16: 1e-2}


def check_low_precision_grad_gemm(device, dtype: torch.dtype) -> str | None:
    """The chunked loss's gradients with low-precision GEMMs against its fp32 gradient GEMMs, same inputs
    (64 rows in 4 chunks, C=64, V=257, fp32 x and master weight); None when within GRAD_GEMM_RMS_REL."""
    from rwkvslice.slicing import chunked

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(64, 64, generator=g).to(device)
    weight = (0.3 * torch.randn(257, 64, generator=g)).to(device)
    target = torch.randint(0, 257, (64,), generator=g).to(device)
    with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, enabled=False):
        results = {
            low: chunked._forward(x, weight, target, 16, dtype, True, True, grad_gemm_low=low)
            for low in (True, False)
        }
    names = ("loss", "grad_x", "grad_w")
    pairs = {n: (a, b) for n, a, b in zip(names, results[True], results[False], strict=True)}
    return compare(pairs, GRAD_GEMM_RMS_REL[dtype])


def low_precision_grad_gemm_trusted(device, dtype: torch.dtype) -> bool:
    """Whether the chunked loss may use its low-precision gradient GEMMs on `device` for `dtype`."""
    if dtype not in GRAD_GEMM_RMS_REL:
        return False
    return decide(
        ("grad_gemm", str(device), dtype),
        lambda: check_low_precision_grad_gemm(device, dtype),
        f"the chunked loss's {str(dtype).removeprefix('torch.')} gradient GEMMs on {device} against its "
        "fp32 gradient path",
        "the chunked loss uses the fp32 gradient path",
    )
