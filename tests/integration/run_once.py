"""Build a read-only test artifact once per pytest run, shared by the pytest-xdist workers."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path


def build_once_per_run(tmp_path_factory, name: str, build) -> Path:
    """`build(directory)` once per pytest run, shared by every pytest-xdist worker of that run.

    A module fixture runs once per worker that gets one of the module's tests; for an expensive read-only
    artifact (a trained run directory from a CLI subprocess) that doubles the cost. Under xdist the
    workers' base temp dirs share a parent unique to the run: the first worker builds there under an
    exclusive lock and marks it done, the others wait and reuse it. A failed build leaves nothing behind,
    so every worker that needs it fails the same way.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        directory = tmp_path_factory.mktemp(name)
        build(directory)
        return directory
    root = tmp_path_factory.getbasetemp().parent
    directory = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if build() raises
        if not (directory / ".built").is_file():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            try:
                build(directory)
            except BaseException:
                shutil.rmtree(directory, ignore_errors=True)
                raise
            (directory / ".built").write_text("")
    return directory
