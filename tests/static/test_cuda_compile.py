"""The kernel sources compile: every .cu with nvcc for sm_80 and sm_90, the host build with the C++ compiler.

No torch: the .cu files include no torch headers, so plain `nvcc -c` is the whole check. Without nvcc the
nvcc tests skip with the reason, unless RWKVSLICE_REQUIRE_NVCC=1 (CI images that ship the toolkit) turns
the skip into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from compile_check_cache import run_compile

CUDA_DIR = Path(__file__).resolve().parents[2] / "src" / "rwkvslice" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("80", "90")
# What the JIT build passes: our flags (cuda/build.py CUDA_FLAGS), plus the C++ standard and the defines that
# torch.utils.cpp_extension adds to every nvcc call (they disable implicit bf16/half conversions); plus
# warnings as errors.
NVCC_FLAGS = [
    "-O3",
    "--use_fast_math",
    "-Xptxas",
    "-O3",
    "--extra-device-vectorization",
    "-std=c++20",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
    "-Werror",
    "all-warnings",
]


def _nvcc() -> str:
    candidates = [shutil.which("nvcc")]
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(str(Path(os.environ[env]) / "bin" / "nvcc"))
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    reason = "nvcc not found (put it on PATH or set CUDA_HOME)"
    if os.environ.get("RWKVSLICE_REQUIRE_NVCC") == "1":
        pytest.fail(reason + " and RWKVSLICE_REQUIRE_NVCC=1")
    pytest.skip(reason)


def _cxx() -> str:
    cxx = shutil.which(os.environ.get("CXX", "")) or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler (c++ or g++) on PATH")
    return cxx


def _compile(nvcc: str, cu: Path, arch: str, out: Path, *extra: str, cached: bool = False
             ) -> subprocess.CompletedProcess:
    """nvcc -c; `cached`: replay an earlier success of the same sources, flags and nvcc
    (tests/compile_check_cache.py)."""
    cmd = [
        nvcc,
        "-c",
        *NVCC_FLAGS,
        "-gencode",
        f"arch=compute_{arch},code=sm_{arch}",
        *extra,
        str(cu),
        "-o",
        str(out),
    ]
    if cached:
        return run_compile(cmd, source_dir=CUDA_DIR, output=out)[0]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_there_are_kernel_sources():
    assert [p.name for p in CU_FILES] == ["wkv7_cuda.cu"]


@pytest.mark.nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(cu, arch, tmp_path):
    nvcc = _nvcc()
    obj = tmp_path / (cu.stem + ".o")
    proc = _compile(nvcc, cu, arch, obj, "-Xptxas", "-v", cached=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert obj.stat().st_size > 0
    if cu.name == "wkv7_cuda.cu":
        _check_register_use(proc.stderr)


def _check_register_use(ptxas_log: str) -> None:
    """The per-thread state arrays stay in registers.

    Forward: one N-float row per thread, no spill at all. Backward: three N-float arrays (192 floats at N=64)
    against a 255-register limit; ptxas spills a few dozen bytes, which is tolerated, but the arrays themselves
    landing in local memory (a stack frame of >= 3 * N * 4 bytes) would make it several times slower.
    """
    entries = re.findall(
        r"Function properties for (\w+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores", ptxas_log
    )
    kernels = {}
    for name, stack, spill in entries:
        m = re.search(r"wkv7_(forward|backward)_kernel.*?Li(\d+)E", name)
        assert m, name
        kernels.setdefault((m.group(1), int(m.group(2))), []).append((int(stack), int(spill)))
    assert {n for _, n in kernels} == {16, 32, 64}
    for (kind, n), usage in kernels.items():
        for stack, spill in usage:
            if kind == "forward":
                assert (stack, spill) == (0, 0), f"forward N={n} spills: {usage}"
            else:
                assert stack < 3 * n * 4 // 2, (
                    f"backward N={n} keeps its state arrays in local memory: {usage}"
                )


@pytest.mark.nvcc
def test_nvcc_rejects_a_broken_kernel(tmp_path):
    """The compile check can fail: the same command on a source with an undefined name exits non-zero."""
    nvcc = _nvcc()
    broken = tmp_path / "broken.cu"
    broken.write_text('#include "wkv7_core.cuh"\n__global__ void k(float* p) { p[0] = undefined_name; }\n')
    proc = _compile(nvcc, broken, ARCHS[0], tmp_path / "broken.o", "-I", str(CUDA_DIR))
    assert proc.returncode != 0 and "undefined_name" in proc.stderr


@pytest.mark.parametrize("source", ["wkv7_host.cpp", "rnn_step_host.cpp"])
def test_host_build_compiles(source):
    """The host libraries pass -fsyntax-only with warnings as errors: wkv7_host.cpp (the CUDA core header
    compiled as plain C++) and rnn_step_host.cpp (the fused CPU generation kernels)."""
    cxx = _cxx()
    proc = subprocess.run(
        [
            cxx,
            "-fsyntax-only",
            "-std=c++17",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-I",
            str(CUDA_DIR),
            str(CUDA_DIR / source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
