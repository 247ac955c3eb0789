"""Project-wide static tools: ruff (lint) on the code and tests, mypy (types) on the package, and the
torch-free environment of the static layer itself."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
from sourcetree import ROOT

pytestmark = pytest.mark.component("Project-wide")

IN_STATIC_SESSION = os.environ.get("RWKVSLICE_LAYER") == "static"
LINT_PATHS = [p for p in ("src", "tests", "tools", "benchmarks", "noxfile.py") if (ROOT / p).exists()]


def _tool(name: str) -> str:
    """The tool next to this interpreter (the nox venv's), else on PATH. Missing in the static session
    is a failure (the session installs it); elsewhere it is a reasoned skip."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    path = here if os.path.exists(here) else shutil.which(name)
    if path is None:
        if IN_STATIC_SESSION:
            pytest.fail(f"{name} is not installed in the static session")
        pytest.skip(f"{name} is not installed (the nox static session installs it)")
    return path


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_lint_passes():
    """ruff check (pyproject [tool.ruff]) on src, tests, tools, benchmarks and the noxfile."""
    out = _run([_tool("ruff"), "check", "--no-cache", "--output-format", "concise", *LINT_PATHS])
    assert out.returncode == 0, f"ruff check failed:\n{out.stdout}{out.stderr}"


def test_mypy_passes_on_the_package():
    """mypy (pyproject [tool.mypy]) on src/. In the static session torch is absent, so torch types are
    Any: this checks the package's own annotations and calls, quickly."""
    out = _run([_tool("mypy"), "src"])
    assert out.returncode == 0, f"mypy src failed:\n{out.stdout}{out.stderr}"


def test_static_environment_has_no_torch():
    """The static layer proves its checks need no torch: in the nox static session `import torch`
    fails (so no static test can quietly depend on it)."""
    if not IN_STATIC_SESSION:
        pytest.skip("only meaningful in the torch-free `nox -s static` environment")
    assert importlib.util.find_spec("torch") is None, "torch is importable in the static session"
    with pytest.raises(ImportError):
        importlib.import_module("torch")


def test_static_tests_import_neither_torch_nor_the_package():
    """tests/static parse the code; importing torch or rwkvslice there would make them runtime tests."""
    import ast

    from sourcetree import parse, py_files, rel

    bad = []
    for path in py_files("tests/static"):
        for node in ast.walk(parse(path)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            bad += [
                f"{rel(path)}:{node.lineno}: import {n}"
                for n in names
                if n.split(".")[0] in {"torch", "rwkvslice"}
            ]
    assert not bad, "\n".join(bad)
