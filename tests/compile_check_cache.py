"""A result cache for the compile checks (nvcc on the kernel, c++ -fsyntax-only on the torch binding).

The checks take 4-10 s each and run in several nox sessions on unchanged sources. Like ccache in its
direct mode, a *successful* compile is remembered under a key made of everything that decides its
outcome: the command line (output paths left out), the content of every file in the kernel's source
folder and of the compiled file, the compiler binary (path, size, mtime) and an extra string (the
torch version and include paths for the binding). Any change to these recompiles; failures are never
cached, so a broken source fails every time. The stored stderr (ptxas' register report) and output
file come back on a hit, so the assertions on them still run.

RWKVSLICE_COMPILE_CACHE=0 disables it; the cache lives in build/compile-check-cache/ (git-ignored).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

CACHE_DIR = Path(__file__).resolve().parents[1] / "build" / "compile-check-cache"


def _file_digest(h, path: Path) -> None:
    h.update(str(path.name).encode() + b"\0")
    h.update(path.read_bytes())
    h.update(b"\0")


def _compiler_identity(exe: str) -> str:
    real = os.path.realpath(exe)
    st = os.stat(real)
    return f"{real}:{st.st_size}:{st.st_mtime_ns}"


def cache_key(cmd: list[str], source_dir: Path, extra: str = "", ignore: tuple[str, ...] = ()) -> str:
    """`ignore`: strings whose arguments are left out of the key (output files, temporary include dirs)."""
    h = hashlib.sha256()
    h.update(_compiler_identity(cmd[0]).encode())
    h.update(json.dumps([a for a in cmd[1:] if not any(i in a for i in ignore)]).encode())
    h.update(extra.encode())
    for path in sorted(p for p in Path(source_dir).iterdir() if p.is_file()):
        _file_digest(h, path)
    for arg in cmd[1:]:  # the compiled file itself, wherever it lives (e.g. a test's tmp_path)
        p = Path(arg)
        if p.suffix in (".cu", ".cpp", ".cc") and p.is_file():
            _file_digest(h, p)
    return h.hexdigest()


def run_compile(cmd: list[str], *, source_dir: Path, extra: str = "", output: Path | None = None,
                ignore: str | None = None, timeout: int = 600) -> tuple[subprocess.CompletedProcess, bool]:
    """Run `cmd` (a compile), or replay its cached success. Returns (process result, came from cache).

    `output`: the file the compile writes (kept with the entry, copied back on a hit); `ignore`: a
    temporary path in the command that must not be part of the key."""
    enabled = os.environ.get("RWKVSLICE_COMPILE_CACHE", "1") != "0"
    key = cache_key(cmd, source_dir, extra, tuple(str(x) for x in (output, ignore) if x is not None))
    entry = CACHE_DIR / key
    if enabled and (entry / "ok").is_file():
        if output is not None:
            shutil.copyfile(entry / "output", output)
        stderr = (entry / "stderr").read_text()
        return subprocess.CompletedProcess(cmd, 0, "", stderr), True
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if enabled and proc.returncode == 0:
        tmp = CACHE_DIR / f".{key}.{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "stderr").write_text(proc.stderr)
        if output is not None:
            shutil.copyfile(output, tmp / "output")
        (tmp / "ok").write_text("")
        try:
            tmp.rename(entry)  # atomic; a concurrent writer of the same key wins and this copy goes
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return proc, False
