"""Build the WKV-7 kernel sources on first use, into a cache keyed by a hash of sources and flags.

Two builds:
- the host library (wkv7_host.cpp + wkv7_core.cuh) compiled by the C++ compiler into a shared library
  loaded with ctypes. It takes a second or two and needs no torch headers, so every CI session can afford it;
- the CUDA torch extension (wkv7_cuda.cu + wkv7_op.cpp) through torch.utils.cpp_extension, which registers
  the ops torch.ops.rwkvslice.wkv7_forward / wkv7_backward.

The cache directory is $RWKVSLICE_BUILD_DIR, else ~/.cache/rwkvslice. Outputs are compiled under a temporary
name and renamed into place, so parallel processes (pytest-xdist, DDP ranks) never load a half-written file.
Every failure raises KernelBuildError with one line; the compiler's output goes to a log file it names.

This module imports torch only inside `load_cuda_extension`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

from rwkvslice.errors import RWKVSliceError

SOURCE_DIR = Path(__file__).resolve().parent
HOST_SOURCES = ("wkv7_core.cuh", "wkv7_host.cpp")
CUDA_SOURCES = ("wkv7_core.cuh", "wkv7_launch.h", "wkv7_cuda.cu", "wkv7_op.cpp")
HOST_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC")
# The official kernel's flags. fast-math turns expf into __expf and the backstepping division into an
# approximate one; the core already uses __expf explicitly on the device.
CUDA_FLAGS = ("-O3", "--use_fast_math", "-Xptxas", "-O3", "--extra-device-vectorization")


class KernelBuildError(RWKVSliceError):
    """A kernel could not be built or loaded (missing compiler, compile error, no CUDA toolkit)."""


def build_root() -> Path:
    """The cache directory for compiled kernels ($RWKVSLICE_BUILD_DIR or ~/.cache/rwkvslice)."""
    env = os.environ.get("RWKVSLICE_BUILD_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rwkvslice"


def source_hash(names: tuple[str, ...], *extra: str) -> str:
    """A short hash of the named source files' contents and any extra strings (flags, compiler version)."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    for item in extra:
        h.update(item.encode() + b"\0")
    return h.hexdigest()[:16]


def find_cxx() -> str:
    """The C++ compiler: $CXX if set, else c++ or g++ on PATH."""
    env = os.environ.get("CXX")
    candidates = [env] if env else ["c++", "g++"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    wanted = f"CXX={env!r} is not an executable" if env else "no C++ compiler (c++ or g++) on PATH"
    raise KernelBuildError(f"cannot build the WKV-7 host kernel: {wanted}; install g++ or set CXX")


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except OSError as e:
        raise KernelBuildError(f"cannot run the C++ compiler {cxx}: {e}") from None
    return out.stdout.splitlines()[0] if out.stdout else ""


def host_library_path() -> Path:
    """Path of the compiled WKV-7 host library, building it first if the cache has none for these sources."""
    return _host_library("wkv7_host", HOST_SOURCES, "the WKV-7 host kernel")


def _host_library(stem: str, sources: tuple[str, ...], what: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile SOURCE_DIR/<stem>.cpp (+ its headers in `sources`) into a cached shared library."""
    cxx = find_cxx()
    flags = (*HOST_FLAGS, *extra_flags)
    key = source_hash(sources, cxx, _compiler_version(cxx), *flags)
    root = build_root()
    target = root / f"{stem}-{key}.so"
    if target.exists():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelBuildError(f"cannot create the kernel build directory {root}: {e}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}-{key}-", suffix=".so", dir=root)
    os.close(fd)
    cmd = [cxx, *flags, "-I", str(SOURCE_DIR), str(SOURCE_DIR / f"{stem}.cpp"), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log = root / f"{stem}-{key}.log"
            log.write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
            raise KernelBuildError(f"building {what} with {cxx} failed (exit {proc.returncode}); see {log}")
        os.replace(tmp, target)  # atomic: a concurrent builder's identical file is simply replaced
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_PTR = ctypes.c_void_p
_INT = ctypes.c_int


@functools.cache
def load_host_library() -> ctypes.CDLL:
    """The host library with argument types set (built on first use; cached per process)."""
    path = host_library_path()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelBuildError(f"cannot load the WKV-7 host kernel {path}: {e}") from None
    lib.rwkvslice_wkv7_host_forward.argtypes = [_INT] * 4 + [_PTR] * 13
    lib.rwkvslice_wkv7_host_forward.restype = _INT
    lib.rwkvslice_wkv7_host_backward.argtypes = [_INT] * 4 + [_PTR] * 21
    lib.rwkvslice_wkv7_host_backward.restype = _INT
    lib.rwkvslice_wkv7_chunk_len.argtypes = []
    lib.rwkvslice_wkv7_chunk_len.restype = _INT
    return lib


RNN_STEP_SOURCES = ("rnn_step_host.cpp",)


@functools.cache
def load_rnn_step_library() -> ctypes.CDLL:
    """The fused CPU generation kernels (rnn_step_host.cpp), built on first use; cached per process."""
    # -O3 vectorises the state-update loops (no -march: the kernel cache may be shared by machines)
    path = _host_library("rnn_step_host", RNN_STEP_SOURCES, "the fused CPU generation kernels", ("-O3",))
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelBuildError(f"cannot load the fused CPU generation kernels {path}: {e}") from None
    ptr = _PTR
    lib.rwkvslice_step_layer.argtypes = [_INT, ptr, _INT, ctypes.c_float, ctypes.c_float, ptr, *[ptr] * 11]
    lib.rwkvslice_step_layer.restype = _INT
    lib.rwkvslice_step_set_sgemm.argtypes = [ptr]
    lib.rwkvslice_step_set_sgemm.restype = _INT
    lib.rwkvslice_step_linear_probe.argtypes = [_INT, _INT, _INT, ptr, ptr, ptr]
    lib.rwkvslice_step_linear_probe.restype = _INT
    lib.rwkvslice_step_n_params.argtypes = []
    lib.rwkvslice_step_n_params.restype = _INT
    return lib


def cuda_extension_name() -> str:
    """The torch extension's name; it embeds the source hash so an edited kernel is rebuilt, not reused."""
    return "rwkvslice_wkv7_" + source_hash(CUDA_SOURCES, *CUDA_FLAGS)


@functools.cache
def load_cuda_extension() -> str:
    """JIT-build (first time) and load the CUDA extension, registering torch.ops.rwkvslice.wkv7_*.

    Returns the extension name. Raises KernelBuildError with one line when nvcc or the build fails.
    """
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise KernelBuildError(
            f"the CUDA WKV-7 kernel needs a CUDA build of torch (this is {torch.__version__})"
        )
    if cpp_extension.CUDA_HOME is None or not shutil.which(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    ):
        raise KernelBuildError("the CUDA WKV-7 kernel needs nvcc: install the CUDA toolkit or set CUDA_HOME")
    # cpp_extension runs ninja on every first load in a process, even when its cache is up to date.
    if not cpp_extension.is_ninja_available():
        raise KernelBuildError(
            "the CUDA WKV-7 kernel needs ninja on PATH to build: pip install ninja (or rwkvslice[cuda])"
        )
    name = cuda_extension_name()
    directory = build_root() / name
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelBuildError(f"cannot create the kernel build directory {directory}: {e}") from None
    with build_guard(directory):
        _load_cuda_extension(cpp_extension, name, directory)
    return name


# cpp_extension's own lock: a file it creates in the build directory and removes when its build ends. A
# process killed mid-build leaves it behind, and every later load then waits on it forever, silently.
CPP_EXTENSION_LOCK = "lock"
# Where the OS cannot lock files (some network filesystems), a cpp_extension lock older than this is stale.
STALE_LOCK_AGE_S = 1800.0


@contextlib.contextmanager
def build_guard(directory: Path, timeout_s: float = 3600.0, poll_s: float = 0.5, warn_after_s: float = 10.0):
    """Serialise our builds of one extension under an OS file lock (flock), which the OS releases when its
    owner dies. Holding it, a cpp_extension `lock` file in `directory` belongs to no living build of ours,
    so it is removed with a one-line warning. While another process builds, wait for at most timeout_s
    (one warning once warn_after_s passed: DDP ranks loading a cached build wait a second, silently), then
    raise KernelBuildError. Without flock support, the lock file's age decides."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None  # type: ignore[assignment]
    guard = directory / "rwkvslice-build.flock"
    try:
        fd = os.open(guard, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as e:
        raise KernelBuildError(f"cannot open the kernel build lock {guard}: {e}") from None
    try:
        held = False
        if fcntl is not None:
            start, warned = time.monotonic(), False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = True
                    break
                except BlockingIOError:
                    pass
                except OSError:  # the filesystem cannot lock: fall back to the lock file's age
                    break
                waited = time.monotonic() - start
                if waited > timeout_s:
                    raise KernelBuildError(
                        f"another process has been building the CUDA WKV-7 kernel in {directory} for over "
                        f"{timeout_s:.0f} s (it holds {guard}); stop it or remove that directory"
                    )
                if not warned and waited >= warn_after_s:
                    warnings.warn(
                        f"rwkvslice: waiting for another process building the CUDA WKV-7 kernel in {directory}",
                        stacklevel=3,
                    )
                    warned = True
                time.sleep(poll_s)
        _clear_stale_cpp_extension_lock(directory / CPP_EXTENSION_LOCK, owner_gone=held)
        yield
    finally:
        os.close(fd)  # releases the flock


def _clear_stale_cpp_extension_lock(lock: Path, owner_gone: bool) -> None:
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if not owner_gone and age < STALE_LOCK_AGE_S:
        return  # maybe a live build on a filesystem without flock: let cpp_extension wait for it
    why = "no process holds the build" if owner_gone else f"{age:.0f} s old"
    try:
        lock.unlink()
    except FileNotFoundError:
        return
    warnings.warn(
        f"rwkvslice: removed the stale build lock {lock} ({why}; left by a build that was killed)", stacklevel=4
    )


def _load_cuda_extension(cpp_extension, name: str, directory: Path) -> None:
    try:
        cpp_extension.load(
            name=name,
            sources=[str(SOURCE_DIR / "wkv7_op.cpp"), str(SOURCE_DIR / "wkv7_cuda.cu")],
            extra_include_paths=[str(SOURCE_DIR)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=list(CUDA_FLAGS),
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:
        # cpp_extension raises RuntimeError/OSError/CalledProcessError carrying pages of compiler output.
        log = directory / "build-error.log"
        try:
            log.write_text(f"{type(e).__name__}: {e}\n")
        except OSError:
            pass
        raise KernelBuildError(
            f"building the CUDA WKV-7 kernel failed ({type(e).__name__}); see {log}"
        ) from None
