"""Suite-wide pytest setup. Torch-free on purpose: the `static` layer runs in an environment without
torch and loads this file too. Torch-dependent fixtures live in tests/runtime and tests/integration.

- Hypothesis profiles: "ci" (derandomised, no deadline, no example database) is loaded when CI is set
  or HYPOTHESIS_PROFILE=ci (the nox sessions set it); "dev" otherwise.
- gpu-marked tests skip with a reason when torch sees no CUDA device; RWKVSLICE_REQUIRE_CUDA=1 (set by
  the e2e_gpu session once it found a GPU, or by hand on a GPU machine) makes that a failure instead.
- Fixtures `device` and `dtype`: the layer's device and compute dtype (RWKVSLICE_TEST_DEVICE /
  RWKVSLICE_TEST_DTYPE, set by the nox sessions: cpu/float32 in e2e_cpu, cuda/bfloat16 in e2e_gpu;
  default cpu/float32). torch is imported inside them, never at module level.
- `slow`-marked tests are collected first (longest-first scheduling for pytest-xdist), those with the
  largest `slow(seconds=N)` estimate first of all.
- `@pytest.mark.component("Loss Computation")` tags a test with its coverage-table row; the tag goes
  into the JUnit XML as a property, which tools/coverage_table.py counts.
"""

from __future__ import annotations

import os

import pytest

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is in the test group; a bare `pytest` without it still runs
    settings = None

if settings is not None:
    # deadline=None: the first call of a torch op pays allocator/dispatcher warm-up.
    settings.register_profile(
        "ci",
        derandomize=True,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile("dev", deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


def pytest_report_header(config: pytest.Config) -> str:
    """The torch under test heads every run's output (the torch-matrix legs differ only in it)."""
    try:
        import torch
    except ImportError:
        return "torch: not installed (static layer)"
    return f"torch: {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"


def _cuda_status() -> tuple[bool, str]:
    try:
        import torch
    except ImportError as exc:
        return False, f"torch is not installed ({exc})"
    if not torch.cuda.is_available():
        return False, f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False)"
    return True, torch.cuda.get_device_name(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Longest first: `slow` tests start before the rest (stable order otherwise), so with pytest-xdist a long
    # test never starts last and leaves the other workers idle at the end of the run. `slow(seconds=N)`
    # ranks the few much longer ones (e.g. `train --demo`) ahead of the other slow tests.
    def longest_first(item: pytest.Item) -> tuple[bool, float]:
        slow = item.get_closest_marker("slow")
        return slow is None, -float(slow.kwargs.get("seconds", 0)) if slow else 0.0

    items.sort(key=longest_first)
    for item in items:
        for mark in item.iter_markers("component"):
            if len(mark.args) != 1 or not isinstance(mark.args[0], str):
                raise pytest.UsageError(f"{item.nodeid}: use @pytest.mark.component('<table row>')")
            item.user_properties.append(("component", mark.args[0]))

    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    available, why = _cuda_status()
    if available:
        return
    if os.environ.get("RWKVSLICE_REQUIRE_CUDA") == "1":
        raise pytest.UsageError(f"RWKVSLICE_REQUIRE_CUDA=1 but {why}: {len(gpu_items)} gpu tests cannot run")
    skip = pytest.mark.skip(reason=why)
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def device():
    """The device this layer runs on (torch.device)."""
    import torch

    name = os.environ.get("RWKVSLICE_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        if os.environ.get("RWKVSLICE_REQUIRE_CUDA") == "1":
            pytest.fail(f"RWKVSLICE_TEST_DEVICE={name} and RWKVSLICE_REQUIRE_CUDA=1 but no CUDA device")
        pytest.skip(f"RWKVSLICE_TEST_DEVICE={name} but no CUDA device")
    return torch.device(name)


@pytest.fixture(scope="session")
def dtype():
    """The compute dtype this layer runs in: float32 on CPU, bfloat16 on CUDA (autocast / weights)."""
    import torch

    name = os.environ.get("RWKVSLICE_TEST_DTYPE", "float32")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise pytest.UsageError(f"RWKVSLICE_TEST_DTYPE={name!r} is not a torch dtype")
    return value
