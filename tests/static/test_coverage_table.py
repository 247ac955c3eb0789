"""tools/coverage_table.py, the generator of reports/coverage.md, on synthetic inputs: its mapping of
code to components, its reading of JUnit XML, and a whole run over a fake package whose coverage data,
test results and session records are known, so every cell of the table has an expected value.

Torch-free (the tool imports only coverage); it runs in the static session."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import pytest
from sourcetree import ROOT

pytestmark = pytest.mark.component("Project-wide")


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("coverage_table", ROOT / "tools" / "coverage_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("coverage_table", module)
    spec.loader.exec_module(module)
    return module


def test_function_patterns_beat_module_patterns_and_nested_functions_inherit(table):
    assert table.component_of_region("rwkvslice/model/rwkv7.py", "RWKV7.forward") == "Architecture"
    assert table.component_of_region("rwkvslice/model/rwkv7.py", "RWKV7.loss") == "Loss Computation"
    assert table.component_of_region("rwkvslice/model/rwkv7.py", "RWKV7.loss.inner") == "Loss Computation"
    assert table.component_of_region("rwkvslice/train/step.py", "autocast_context") == "BFloat16"
    assert table.component_of_region("rwkvslice/train/step.py", "train_step") == "Training Loop"
    # a longer literal module pattern beats a wildcard one: train/checkpoint.py is a checkpoint, not the loop
    assert table.component_of_region("rwkvslice/train/checkpoint.py", "") == "Checkpoints"
    assert (
        table.component_of_region("rwkvslice/ops/wkv7_torch.py", "_WKV7Chunked.backward") == "Backward Pass"
    )
    assert table.component_of_region("rwkvslice/ops/wkv7_cuda.py", "_WKV7Cuda.backward") == "CUDA Kernels"
    assert table.component_of_region("rwkvslice/nowhere.py", "") is None


def test_test_files_are_attributed_by_marker_then_by_name(table):
    assert table.component_of_test("tests/runtime/test_x.py", "Dataset") == "Dataset"
    assert table.component_of_test("tests/runtime/test_train_checkpoint.py", None) == "Checkpoints"
    assert table.component_of_test("tests/integration/test_train_bf16.py", None) == "BFloat16"
    assert table.component_of_test("tests/runtime/test_wkv7_host.py", None) == "CUDA Kernels"
    assert table.component_of_test("tests/runtime/test_mystery.py", None) is None


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="3">
<testcase classname="tests.runtime.test_data_windows" name="test_ok" time="0.1">
  <properties><property name="component" value="Dataset"/></properties></testcase>
<testcase classname="tests.runtime.test_cli.TestParser" name="test_bad" time="0.2">
  <failure message="assert 1 == 2">boom</failure></testcase>
<testcase classname="tests.runtime.test_wkv7_cuda" name="test_gpu" time="0.0">
  <skipped type="pytest.skip" message="no CUDA device">skip</skipped></testcase>
</testsuite></testsuites>"""


def test_junit_reading(table, tmp_path):
    path = tmp_path / "j.xml"
    path.write_text(JUNIT)
    cases = table.read_junit(path)
    assert [(c["file"], c["outcome"], c["component"]) for c in cases] == [
        ("tests/runtime/test_data_windows.py", "passed", "Dataset"),
        ("tests/runtime/test_cli.py", "failed", None),
        ("tests/runtime/test_wkv7_cuda.py", "skipped", None),
    ]
    assert cases[1]["message"] == "assert 1 == 2" and cases[2]["message"] == "no CUDA device"


def _record(tmp, slug, layer, result, reason="", run_id="run-1", **extra):
    status = tmp / "artifacts" / "status"
    status.mkdir(parents=True, exist_ok=True)
    (status / f"{slug}.json").write_text(
        json.dumps(
            {
                "session": slug,
                "slug": slug,
                "layer": layer,
                "result": result,
                "reason": reason,
                "run_id": run_id,
                "started": "2026-01-01 00:00:00",
                "duration_s": 1.0,
                **extra,
            }
        )
    )


def test_whole_table_from_known_data(table, tmp_path, monkeypatch):
    """A fake package with one Dataset module (4 statements, 2 branches) run half-way by e2e_cpu, and a
    CLI module run fully by integration; e2e_gpu skipped. Every cell is then known in advance."""
    coverage = pytest.importorskip("coverage", reason="the coverage session's tool needs coverage")
    pkg = tmp_path / "src" / "rwkvslice"
    (pkg / "data").mkdir(parents=True)
    (pkg / "cli").mkdir()
    (pkg / "data" / "x.py").write_text(
        textwrap.dedent("""
        def f(a):
            if a:
                return 1
            return 2
    """)
    )
    (pkg / "cli" / "y.py").write_text("def g():\n    return 3\n")
    (tmp_path / "pyproject.toml").write_text(
        "[tool.coverage.run]\nbranch = true\n[tool.coverage.report]\nfail_under = 50\n"
    )
    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / "artifacts" / "coverage"
    data_dir.mkdir(parents=True)
    runs = (("e2e_cpu", pkg / "data" / "x.py", "f", (True,)), ("integration", pkg / "cli" / "y.py", "g", ()))
    for layer, path, name, args in runs:
        cov = coverage.Coverage(
            data_file=str(data_dir / f".coverage.{layer}.1"),
            branch=True,
            context=layer,
            config_file=False,
            source=[str(pkg)],
        )
        namespace: dict = {}
        cov.start()
        exec(compile(path.read_text(), str(path), "exec"), namespace)  # traced by file name, never imported
        namespace[name](*args)
        cov.stop()
        cov.save()
    junit = tmp_path / "artifacts" / "junit"
    junit.mkdir()
    (junit / "e2e_cpu.xml").write_text(JUNIT)
    _record(tmp_path, "e2e_cpu", "e2e_cpu", "failed", "Returned code 1")
    _record(tmp_path, "e2e_gpu", "e2e_gpu", "skipped", "no CUDA device: nvidia-smi not found")
    _record(tmp_path, "integration", "integration", "success", run_id="run-0")  # from an earlier `nox`
    # a matrix leg that took e2e_cpu + integration's result (noxfile._ran_in_this_run): no tests of its own
    _record(tmp_path, "torch_matrix-2.13.0", "torch-2.13.0", "success", note="ran as e2e_cpu + integration")

    rc = table.main(["--artifacts", "artifacts", "--reports", "reports", "--run-id", "run-1"])
    text = (tmp_path / "reports" / "coverage.md").read_text()
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| Component") and not line.startswith("| Session")
    }
    # Dataset: f has 4 statements (def, if, return 1, return 2) and 2 branches; e2e_cpu ran def/if/return 1
    # and one branch: (3 + 1) / (4 + 2). Integration measured the file but ran none of it. No static run.
    assert rows["Dataset"] == [
        "not run",
        "66.7 %",
        "not run: no CUDA device",
        "0.0 %",
        "66.7 %",
        "pass (1 tests in e2e_cpu)",
    ]
    assert rows["CLI"][:5] == ["not run", "0.0 %", "not run: no CUDA device", "100.0 %", "100.0 %"]
    assert rows["CLI"][5] == "**FAIL**: 1 failed in e2e_cpu"  # test_cli.py is attributed to CLI by name
    assert rows["Architecture"][1] == "—" and rows["Architecture"][5] == "no tests ran"
    # merged: (3 + 2 lines + 1 branch) / (6 lines + 2 branches); e2e_cpu alone 4/8, integration 2/8
    assert rows["**Total (merged)**"][1:4] == ["50.0 %", "—", "25.0 %"]
    assert rows["**Total (merged)**"][4].startswith("**75.0 %** (5/6 lines, 1/2 branches)")
    assert rows["e2e_cpu"][:2] == ["FAILED", "1 / 1 / 1"] and rows["e2e_gpu"][0] == "skipped"
    assert rows["integration"][0] == "passed (earlier run, 2026-01-01 00:00:00)"
    assert rows["torch_matrix-2.13.0"][:2] == ["passed", "—"] and rows["torch_matrix-2.13.0"][-1] == (
        "ran as e2e_cpu + integration"
    )
    assert rc == 0
    assert table.main(["--artifacts", "artifacts", "--reports", "reports", "--fail-under", "80"]) == 1
    assert (tmp_path / "reports" / "coverage.xml").is_file() and (
        tmp_path / "reports" / "html" / "index.html"
    ).is_file()
