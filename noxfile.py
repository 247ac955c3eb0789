#!/usr/bin/env -S uv run --script
# /// script
# dependencies = ["nox>=2025.2.9"]
# ///
"""The rwkvslice test matrix. `nox` with no arguments is the project's test command.

Layers (TESTING.md explains what each one proves):
  static        torch-free checks: AST invariants, docs/config agreement, ruff, mypy, nvcc compile
  e2e_cpu       tests/runtime in fp32 on CPU (gpu-marked tests excluded)
  e2e_gpu       tests/runtime (gpu-marked included) in bf16 on CUDA; skipped, never passed, without a GPU
  integration   tests/integration: multi-step training, resume, DDP (gloo), CLI subprocesses, interop
  torch_matrix  runtime + integration layers (fast subset) on the oldest supported torch and on 2.13.0
  torch_matrix_extra  (opt-in) the same on the newest release
  coverage      merges every session's coverage data into reports/coverage.md, coverage.xml and html/
  mutation      (opt-in) mutmut on the core logic, written to reports/mutation.md

Every session that installs torch pins it (RWKVSLICE_TORCH, default 2.13.0): an unpinned torch pulls
GBs of CUDA wheels. Artifacts (coverage data, JUnit XML, per-session status) go to build/nox/.
"""

from __future__ import annotations

import configparser
import functools
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "uv|virtualenv"
# torch environments are GBs: reuse them when they exist (`nox -R` also skips the install steps)
nox.options.reuse_venv = "yes"

ROOT = Path(__file__).resolve().parent
ARTIFACTS = ROOT / "build" / "nox"
COVERAGE_DIR = ARTIFACTS / "coverage"
JUNIT_DIR = ARTIFACTS / "junit"
STATUS_DIR = ARTIFACTS / "status"
# nox writes its own summary of every session here at the end of each invocation, `nox` alone included
nox.options.report = str(ARTIFACTS / "nox-report.json")

PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
# coverage>=7.13 ships the .pth that measures subprocesses; pytest-xdist runs the CPU layers in parallel;
# setuptools: torch.utils.cpp_extension imports it (torch 2.5 requires it only on Python >= 3.12, and
# uv venvs, unlike `python -m venv` on 3.11, start without it).
TEST_DEPS = [
    *nox.project.dependency_groups(PYPROJECT, "test"),
    "coverage>=7.13",
    "pytest-xdist>=3.5",
    "setuptools",
]
LINT_DEPS = nox.project.dependency_groups(PYPROJECT, "lint")

# The torch every CPU session installs (a local CPU wheel on the project's machines).
TORCH = os.environ.get("RWKVSLICE_TORCH", "2.13.0")
# The GPU layer needs a CUDA build; by default the same version without the local "+cpu" wheel.
TORCH_GPU = os.environ.get("RWKVSLICE_TORCH_GPU", TORCH.split("+")[0])
# Torch versions of the runtime + integration layers. By default: the oldest supported, pyproject's
# `torch>=2.5` floor, and TORCH (fast subset each, `torch_matrix`; e2e_cpu and integration also run
# everything on TORCH). `torch_matrix_extra` (opt-in) adds the newest release, a ~4 GB CUDA build.
TORCH_OLDEST = "2.5.1"
TORCH_NEWEST = "2.15.0"


def _versions(var: str, default: str) -> list[str]:
    return [v.strip() for v in os.environ.get(var, default).split(",") if v.strip()]


TORCH_MATRIX = _versions("RWKVSLICE_TORCH_MATRIX", f"{TORCH_OLDEST},{TORCH}")
TORCH_MATRIX_EXTRA = _versions("RWKVSLICE_TORCH_MATRIX_EXTRA", TORCH_NEWEST)
# The matrix runs the fast subset; e2e_cpu and integration run everything. HF interop tests (marker `hf`)
# need rwkv7-hf + transformers, which only the integration session installs (on the pinned torch).
MATRIX_MARKERS = "not gpu and not slow and not hf"
# rwkv7-hf (the HF reference of tests/integration/test_interop_hf.py) and the transformers it was tested
# with, HF peft (the reader of our adapter files, test_peft_interop.py) and tensorboard (the reader of
# --tensorboard's event files, test_train_eval.py); installed in one command together with the pinned
# torch, so the resolver cannot move torch.
HF_INTEROP_DEPS = ["rwkv7-hf==0.9.0", "transformers==5.24.0", "peft==0.21.2", "tensorboard==2.21.0"]

# Optional extras the torch sessions install: the World tokenizer / `rwkv` interop reference and the loss plot.
EXTRAS = "world,plot"

# One id per `nox` invocation: the coverage report tells this run's results from older ones.
RUN_ID = os.environ.get("RWKVSLICE_NOX_RUN_ID") or f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"


def _pip_setting(key: str) -> str | None:
    """A pip setting (env var, then the config files pip reads), so uv finds the same local wheels."""
    env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
    if env:
        return env
    files = [
        "/etc/xdg/pip/pip.conf",
        "/etc/pip.conf",
        "~/.pip/pip.conf",
        "~/.config/pip/pip.conf",
        os.path.join(sys.prefix, "pip.conf"),
        os.environ.get("PIP_CONFIG_FILE", ""),
    ]
    parser = configparser.ConfigParser()
    parser.read([os.path.expanduser(f) for f in files if f])
    for section in ("install", "global"):
        if parser.has_option(section, key):
            return parser.get(section, key)
    return None


def _configure_uv() -> None:
    """uv ignores pip's config: hand it pip's find-links / extra indexes (local torch wheels)."""
    find_links = _pip_setting("find-links")
    extra_index = _pip_setting("extra-index-url")
    if find_links and "UV_FIND_LINKS" not in os.environ:
        os.environ["UV_FIND_LINKS"] = ",".join(find_links.split())
    if extra_index and "UV_EXTRA_INDEX_URL" not in os.environ:
        os.environ["UV_EXTRA_INDEX_URL"] = " ".join(extra_index.split())
        # pip semantics: best version across all indexes (the local index holds only one torch)
        os.environ.setdefault("UV_INDEX_STRATEGY", "unsafe-best-match")


_configure_uv()


def _slug(session: nox.Session) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", session.name).strip("-")


# Extra fields a session adds to its status record (e.g. the torch version its environment holds).
_STATUS_EXTRA: dict[str, dict[str, str]] = {}


def _write_status(session: nox.Session, layer: str, result: str, reason: str, started: float) -> None:
    STATUS_DIR.mkdir(parents=True, exist_ok=True)
    record = {
        "session": session.name,
        "slug": _slug(session),
        "layer": layer,
        "result": result,
        "reason": reason,
        "run_id": RUN_ID,
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        **_STATUS_EXTRA.pop(session.name, {}),
    }
    (STATUS_DIR / f"{_slug(session)}.json").write_text(json.dumps(record, indent=1) + "\n")


def recorded(layer: str):
    """Record the session's outcome (success / failed / skipped + reason) for the coverage table.

    nox's own --report is written only after the whole invocation, too late for the coverage session
    of the same run, so each session writes its own record as it ends. Stale data of the session's
    previous run is removed first, so a skipped or failed session never reports old numbers.
    """

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(session: nox.Session, *args, **kwargs):
            slug = _slug(session)
            for old in [
                *COVERAGE_DIR.glob(f".coverage.{slug}"),
                *COVERAGE_DIR.glob(f".coverage.{slug}.*"),
                JUNIT_DIR / f"{slug}.xml",
                STATUS_DIR / f"{slug}.json",
            ]:
                old.unlink(missing_ok=True)
            started = time.time()
            layer_name = layer.format(**kwargs)  # e.g. "torch-{torch}" -> "torch-2.5.1"
            try:
                fn(session, *args, **kwargs)
            except BaseException as exc:
                skipped = type(exc).__name__ == "_SessionSkip"
                _write_status(session, layer_name, "skipped" if skipped else "failed", str(exc), started)
                raise
            _write_status(session, layer_name, "success", "", started)

        return wrapper

    return decorate


def _layer_env(
    session: nox.Session, layer: str, device: str = "cpu", dtype: str = "float32"
) -> dict[str, str]:
    COVERAGE_DIR.mkdir(parents=True, exist_ok=True)
    return {
        "RWKVSLICE_LAYER": layer,  # coverage static context (pyproject [tool.coverage.run] context)
        "COVERAGE_FILE": str(COVERAGE_DIR / f".coverage.{_slug(session)}"),
        "RWKVSLICE_TEST_DEVICE": device,
        "RWKVSLICE_TEST_DTYPE": dtype,
        "HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "ci"),
        "PYTHONHASHSEED": "0",
    }


# pytest-xdist workers for the CPU layers ("auto" = one per CPU; "0" = serial). Each worker (and every
# process a test starts) gets one torch thread, so workers do not fight over cores; measured on 2 busy
# cores, the runtime layer took 53 s with 2 workers vs 89 s serially.
WORKERS = os.environ.get("RWKVSLICE_PYTEST_WORKERS", "auto")


def _parallel(env: dict[str, str]) -> list[str]:
    if WORKERS == "0":
        return []
    env["OMP_NUM_THREADS"] = "1"
    return ["-n", WORKERS, "--dist", "worksteal"]


def _pytest(session: nox.Session, layer: str, *args: str, env: dict[str, str], coverage: bool = True) -> None:
    JUNIT_DIR.mkdir(parents=True, exist_ok=True)
    junit = f"--junitxml={JUNIT_DIR / (_slug(session) + '.xml')}"
    runner = ["coverage", "run", "-m", "pytest", "--durations=10"] if coverage else ["pytest"]
    session.run(*runner, junit, *args, *session.posargs, env=env)


def _install_torch_layer(session: nox.Session, torch_version: str) -> None:
    # torch pinned in the same resolve as the package so `torch` (unpinned in pyproject) can't float.
    session.install(f"torch=={torch_version}", "-e", f".[{EXTRAS}]", *TEST_DEPS)
    # The version the environment really holds (`-R` skips installs): from its metadata, no torch import.
    probe = "import importlib.metadata as m; print(m.version('torch'))"
    installed = str(session.run("python", "-c", probe, silent=True) or "").strip()
    _STATUS_EXTRA[session.name] = {"torch": installed}
    session.log(f"torch {installed}")


@nox.session(default=True)
@recorded("static")
def static(session: nox.Session) -> None:
    """Torch-free checks: AST invariants, docs/config agreement, ruff, mypy, nvcc compile."""
    session.install(*TEST_DEPS, *LINT_DEPS)
    env = {"RWKVSLICE_LAYER": "static", "HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "ci")}
    _pytest(session, "static", "tests/static", env=env, coverage=False)


@nox.session(default=True)
@recorded("e2e_cpu")
def e2e_cpu(session: nox.Session) -> None:
    """tests/runtime in fp32 on CPU (gpu-marked tests are the e2e_gpu layer's)."""
    _install_torch_layer(session, TORCH)
    env = _layer_env(session, "e2e_cpu")
    _pytest(session, "e2e_cpu", "tests/runtime", "-m", "not gpu", *_parallel(env), env=env)


def _cuda_device() -> tuple[bool, str]:
    """Is there an NVIDIA GPU? Asked of the driver, so no 3 GB torch is installed just to learn 'no'."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"no CUDA device: `nvidia-smi -L` failed ({exc})"
        if out.returncode == 0 and "GPU" in out.stdout:
            return True, out.stdout.splitlines()[0]
        said = (out.stdout + out.stderr).strip()[:160]
        return False, f"no CUDA device: nvidia-smi -L exited {out.returncode}: {said}"
    devices = sorted(glob.glob("/dev/nvidia[0-9]*"))
    if devices:
        return True, f"{devices[0]} present (no nvidia-smi)"
    return False, "no CUDA device: nvidia-smi not found and no /dev/nvidia* device"


@nox.session(default=True)
@recorded("e2e_gpu")
def e2e_gpu(session: nox.Session) -> None:
    """tests/runtime + gpu-marked tests in bf16 on CUDA. Skipped (never passed) without a GPU;
    RWKVSLICE_REQUIRE_CUDA=1 turns that skip into a failure."""
    require = os.environ.get("RWKVSLICE_REQUIRE_CUDA") == "1"
    found, why = _cuda_device()

    def unavailable(reason: str) -> None:
        if require:
            session.error(f"RWKVSLICE_REQUIRE_CUDA=1 but {reason}")
        session.skip(reason)

    if not found:
        unavailable(why)
    session.log(f"CUDA device: {why}")
    # A CUDA build of torch: "===" (PEP 440 arbitrary equality) matches the version string exactly, so the
    # local "2.13.0+cpu" wheel that "==2.13.0" would also accept is left out of the resolve.
    # the cuda extra brings ninja, which the JIT build of the CUDA kernel runs on every first load
    session.install(f"torch==={TORCH_GPU}", "-e", f".[{EXTRAS},cuda]", *TEST_DEPS)
    probe = "import torch; print(torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
    seen = str(session.run("python", "-c", probe, silent=True) or "").strip()
    if not seen.endswith("True"):  # a GPU the driver lists but this torch build cannot use
        unavailable(f"no usable CUDA device for torch ({seen})")
    session.log(f"torch {seen}")
    env = _layer_env(session, "e2e_gpu", device="cuda", dtype="bfloat16")
    env["RWKVSLICE_REQUIRE_CUDA"] = "1"  # a GPU is here: a gpu test that skips for 'no CUDA' is a bug
    _pytest(session, "e2e_gpu", "tests/runtime", env=env)


@nox.session(default=True)
@recorded("integration")
def integration(session: nox.Session) -> None:
    """tests/integration: multi-step training, resume, DDP with 2 gloo processes, CLI, interop with `rwkv`
    and with rwkv7-hf (the Hugging Face layout)."""
    _install_torch_layer(session, TORCH)
    session.install(f"torch=={TORCH}", *HF_INTEROP_DEPS)
    env = _layer_env(session, "integration")
    _pytest(session, "integration", "tests/integration", "-m", "not gpu", *_parallel(env), env=env)


def _ran_in_this_run(torch: str) -> str | None:
    """Did e2e_cpu and integration both pass in this `nox` invocation on this same torch? Then they already
    ran every test of this matrix leg (theirs are a superset: the matrix leaves out only `slow` and `hf` tests), in
    the same interpreter and package set. Returns a note saying so, or None."""
    records = {}
    for name in ("e2e_cpu", "integration"):
        path = STATUS_DIR / f"{name}.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        if record.get("run_id") != RUN_ID or record.get("result") != "success" or record.get("torch") != torch:
            return None
        records[name] = record
    return (
        f"torch {torch}: ran as e2e_cpu + integration of this run (both passed on torch {torch}, a superset "
        "of this leg's tests); RWKVSLICE_MATRIX_RERUN=1 runs them again"
    )


def _torch_version_layers(session: nox.Session, torch: str) -> None:
    _install_torch_layer(session, torch)
    installed = _STATUS_EXTRA.get(session.name, {}).get("torch", "")
    if installed.split("+")[0] != torch.split("+")[0]:
        session.error(f"this environment holds torch {installed!r}, not {torch}: rerun without -R to reinstall")
    # The pinned torch is the one e2e_cpu and integration test: running the same tests again on it in the
    # same invocation proves nothing new (~80 s of a warm run), so this leg takes their result instead.
    # Run alone (`nox -s "torch_matrix(2.13.0)"`), or after either of them failed, it runs its tests.
    note = None if os.environ.get("RWKVSLICE_MATRIX_RERUN") == "1" or session.posargs else _ran_in_this_run(installed)
    if note:
        session.log(note)
        _STATUS_EXTRA[session.name]["note"] = note
        return
    env = _layer_env(session, f"torch-{torch}")
    layers = ("tests/runtime", "tests/integration")
    _pytest(session, f"torch-{torch}", *layers, "-m", MATRIX_MARKERS, *_parallel(env), env=env)


@nox.session(default=True)
@nox.parametrize("torch", TORCH_MATRIX, ids=TORCH_MATRIX)
@recorded("torch-{torch}")
def torch_matrix(session: nox.Session, torch: str) -> None:
    """Runtime + integration layers (fast subset) on the oldest supported torch and on the pinned one."""
    _torch_version_layers(session, torch)


@nox.session(default=False)
@nox.parametrize("torch", TORCH_MATRIX_EXTRA, ids=TORCH_MATRIX_EXTRA)
@recorded("torch-{torch}")
def torch_matrix_extra(session: nox.Session, torch: str) -> None:
    """Opt-in: the same fast subset on the newest release."""
    _torch_version_layers(session, torch)


@nox.session(default=True)
@recorded("coverage")
def coverage(session: nox.Session) -> None:
    """Merge the coverage of every session that ran into reports/coverage.md, coverage.xml, html/."""
    session.install("coverage>=7.13")
    session.install("-e", ".", "--no-deps")  # lets coverage find never-imported modules (no torch here)
    session.run(
        "python",
        "tools/coverage_table.py",
        "--artifacts",
        str(ARTIFACTS),
        "--run-id",
        RUN_ID,
        "--reports",
        "reports",
        *session.posargs,
    )


@nox.session(default=False)
def mutation(session: nox.Session) -> None:
    """mutmut on the core logic against the CPU runtime tests; score in reports/mutation.md."""
    _install_torch_layer(session, TORCH)
    session.install("mutmut==3.8.1")
    env = {
        "OMP_NUM_THREADS": "1",
        "HYPOTHESIS_PROFILE": "ci",
        "RWKVSLICE_TEST_DEVICE": "cpu",
        "RWKVSLICE_TEST_DTYPE": "float32",
        "PYTHONHASHSEED": "0",
    }
    # mutmut forks one child per mutant: one torch thread each (OpenMP pools do not survive fork).
    # Arguments after `--` select mutants, e.g. `nox -s mutation -- "rwkvslice.slicing.*"`.
    session.run("mutmut", "run", "--max-children", str(os.cpu_count() or 2), *session.posargs, env=env)
    command = "nox -s mutation" + (" -- " + " ".join(session.posargs) if session.posargs else "")
    session.run(
        "python", "tools/mutation_report.py", "--out", "reports/mutation.md", "--command", command, env=env
    )


if __name__ == "__main__":
    nox.main()
