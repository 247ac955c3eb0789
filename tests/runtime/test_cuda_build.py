"""cuda/build.py, the CUDA extension's JIT build on a machine without a GPU: the checks before the build
(nvcc, ninja) and the stale cpp_extension lock. A "CUDA toolkit" is stood in for by a CUDA_HOME whose
bin/nvcc is a shell script, torch.version.cuda is patched, and cpp_extension.load is replaced by a fake
that behaves like the real one towards its lock file (it waits while build_dir/lock exists).
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from torch.utils import cpp_extension

from rwkvslice.cuda import build


def _executable(path, text="#!/bin/sh\necho 'stand-in'\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def toolkit(tmp_path, monkeypatch):
    """A CUDA torch with nvcc and ninja on PATH (stand-ins), builds cached under tmp_path/cache; returns
    the list of cpp_extension.load calls the fake recorded."""
    cuda_home = tmp_path / "cuda"
    _executable(cuda_home / "bin" / "nvcc")
    tools = tmp_path / "tools"
    _executable(tools / "ninja", "#!/bin/sh\necho 1.11.1\n")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(cuda_home))
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    monkeypatch.setenv("RWKVSLICE_BUILD_DIR", str(tmp_path / "cache"))
    loads = []

    def fake_load(name, build_directory, **kwargs):
        lock = os.path.join(build_directory, "lock")
        deadline = time.monotonic() + 2.0
        while os.path.exists(lock):  # cpp_extension's FileBaton.wait(): forever; here 2 s, then fail
            if time.monotonic() > deadline:
                raise AssertionError(f"fake cpp_extension.load hung on {lock}")
            time.sleep(0.05)
        loads.append(name)

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    return loads


def test_the_stand_in_toolkit_builds(toolkit):
    """Positive control for the tests below: with nvcc and ninja present the (fake) build runs."""
    assert build.load_cuda_extension.__wrapped__() == build.cuda_extension_name()
    assert toolkit == [build.cuda_extension_name()]


def test_missing_ninja_is_a_one_line_error(toolkit, monkeypatch, tmp_path):
    only_sh = tmp_path / "bin-without-ninja"
    only_sh.mkdir()
    monkeypatch.setenv("PATH", str(only_sh))
    assert not cpp_extension.is_ninja_available()
    with pytest.raises(build.KernelBuildError) as e:
        build.load_cuda_extension.__wrapped__()
    assert str(e.value) == (
        "the CUDA WKV-7 kernel needs ninja on PATH to build: pip install ninja (or rwkvslice[cuda])"
    )
    assert toolkit == []  # refused before any build started


def test_missing_nvcc_is_a_one_line_error(toolkit, monkeypatch, tmp_path):
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "no-cuda-here"))
    with pytest.raises(build.KernelBuildError, match="needs nvcc: install the CUDA toolkit") as e:
        build.load_cuda_extension.__wrapped__()
    assert "\n" not in str(e.value) and toolkit == []


def test_a_stale_lock_left_by_a_killed_build_is_removed_with_one_warning(toolkit):
    """A process killed mid-build leaves build_dir/lock; no process holds the build, so it is stale."""
    directory = build.build_root() / build.cuda_extension_name()
    directory.mkdir(parents=True)
    (directory / "lock").write_text("")
    with pytest.warns(UserWarning) as record:
        build.load_cuda_extension.__wrapped__()
    assert [str(w.message) for w in record] == [
        f"rwkvslice: removed the stale build lock {directory / 'lock'} (no process holds the build; left by "
        "a build that was killed)"
    ]
    assert toolkit == [build.cuda_extension_name()] and not (directory / "lock").exists()


def test_a_live_build_is_waited_for_not_broken(tmp_path):
    """While another process holds the build (its flock), its lock file is not touched; we wait, warn
    once, and go on when it finishes."""
    import fcntl

    (tmp_path / "lock").write_text("")
    holder = os.open(tmp_path / "rwkvslice-build.flock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)

    def finish():
        time.sleep(0.3)
        os.unlink(tmp_path / "lock")  # the live build ends: cpp_extension removes its lock...
        os.close(holder)  # ...and the OS releases the flock

    threading.Thread(target=finish).start()
    with pytest.warns(UserWarning, match="waiting for another process building the CUDA WKV-7 kernel") as record:
        with build.build_guard(tmp_path, timeout_s=10, poll_s=0.02, warn_after_s=0.1):
            assert not (tmp_path / "lock").exists()
    assert len(record) == 1  # the wait, and no "removed a stale lock"


def test_a_short_wait_is_silent(tmp_path):
    """DDP ranks loading a cached build wait on each other for a moment: no warning before warn_after_s."""
    import fcntl

    holder = os.open(tmp_path / "rwkvslice-build.flock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    threading.Timer(0.2, os.close, (holder,)).start()
    t0 = time.monotonic()
    with _no_warnings():
        with build.build_guard(tmp_path, timeout_s=10, poll_s=0.02, warn_after_s=5):
            pass
    assert time.monotonic() - t0 >= 0.15  # it did wait for the holder


def test_a_build_that_never_finishes_times_out_in_one_line(tmp_path):
    import fcntl

    holder = os.open(tmp_path / "rwkvslice-build.flock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.warns(UserWarning, match="waiting"), pytest.raises(build.KernelBuildError) as e:
            with build.build_guard(tmp_path, timeout_s=0.2, poll_s=0.02, warn_after_s=0):
                pass
    finally:
        os.close(holder)
    assert str(e.value).startswith(f"another process has been building the CUDA WKV-7 kernel in {tmp_path} for ")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("age_s, removed", [(10.0, False), (2 * build.STALE_LOCK_AGE_S, True)])
def test_without_flock_the_lock_files_age_decides(tmp_path, monkeypatch, age_s, removed):
    """On a filesystem that cannot lock (flock raises OSError), a lock younger than STALE_LOCK_AGE_S may be
    a live build (kept, cpp_extension waits); an older one is stale (removed, one warning)."""
    import fcntl

    def no_locks(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = tmp_path / "lock"
    lock.write_text("")
    then = time.time() - age_s
    os.utime(lock, (then, then))
    with pytest.warns(UserWarning) if removed else _no_warnings() as record:
        with build.build_guard(tmp_path):
            pass
    assert lock.exists() is not removed
    if removed:
        assert str(record[0].message).startswith(f"rwkvslice: removed the stale build lock {lock} (")
        assert " s old; left by a build that was killed)" in str(record[0].message)


class _no_warnings:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")
        return []

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
