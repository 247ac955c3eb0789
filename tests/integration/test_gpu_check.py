"""tools/gpu_check.sh on a machine without a CUDA device: it says so in one line, writes a summary that
checks nothing, and exits 3 (never 0, never a hang). On a GPU machine the script is the GPU check itself
(minutes), so this test skips there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.component("CUDA Kernels")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the script would run the real check")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_without_a_device_says_so_and_exits_3(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    # the script's Python probes import torch, not rwkvslice: coverage's tracer there (started in every
    # Python process by this variable) measures nothing and triples their import time
    env.pop("COVERAGE_PROCESS_CONFIG", None)
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=240, env=env)
    expected = (f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
                "torch.cuda.is_available() is False)")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        f"gpu_check: {expected}; nothing was checked. Results: {tmp_path / 'results' / 'summary.md'}"
    ]
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert f"| all | not run: {expected} | 0 |" in summary
    assert "passed" not in summary
