"""The compile-check cache (tests/compile_check_cache.py) replays only successes, and only while every
input of the compile is unchanged: a cached pass must never hide a source that stopped compiling."""

from __future__ import annotations

import shutil
import sys

import pytest

import compile_check_cache as ccc

pytestmark = pytest.mark.component("CUDA Kernels")


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    monkeypatch.setattr(ccc, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.delenv("RWKVSLICE_COMPILE_CACHE", raising=False)
    src = tmp_path / "src"
    src.mkdir()
    (src / "k.cu").write_text("ok\n")
    (src / "k.cuh").write_text("// header\n")
    return src


def _cmd(src, out, code="ok"):
    # a stand-in "compiler": fails unless every source says `code`, writes the output, reports on stderr
    script = (
        "import sys, pathlib; d = pathlib.Path(sys.argv[1]);"
        f"bad = [p.name for p in d.iterdir() if p.read_text().strip() not in ('{code}', '// header')];"
        "sys.stderr.write('report ' + ','.join(bad));"
        "pathlib.Path(sys.argv[2]).write_text('obj') if not bad else None;"
        "sys.exit(1 if bad else 0)"
    )
    return [sys.executable, "-c", script, str(src), str(out)]


def test_success_is_replayed_with_its_stderr_and_output(sandbox, tmp_path):
    out = tmp_path / "a.o"
    first, hit = ccc.run_compile(_cmd(sandbox, out), source_dir=sandbox, output=out)
    assert (first.returncode, hit) == (0, False)
    out.unlink()
    again, hit = ccc.run_compile(_cmd(sandbox, out), source_dir=sandbox, output=out)
    assert (again.returncode, hit, again.stderr) == (0, True, first.stderr)
    assert out.read_text() == "obj"  # the output file comes back too


def test_a_changed_source_or_flag_recompiles_and_a_failure_is_never_cached(sandbox, tmp_path):
    out = tmp_path / "a.o"
    assert ccc.run_compile(_cmd(sandbox, out), source_dir=sandbox, output=out)[0].returncode == 0
    (sandbox / "k.cuh").write_text("broken\n")  # a header the compiled file includes
    for _ in range(2):
        proc, hit = ccc.run_compile(_cmd(sandbox, out), source_dir=sandbox, output=out)
        assert (proc.returncode, hit) == (1, False) and "k.cuh" in proc.stderr
    (sandbox / "k.cuh").write_text("// header\n")
    assert ccc.run_compile(_cmd(sandbox, out), source_dir=sandbox, output=out)[1] is True
    flagged = [*_cmd(sandbox, out), "-O0"]
    assert ccc.run_compile(flagged, source_dir=sandbox, output=out)[1] is False  # new flags: new key
    assert ccc.run_compile(_cmd(sandbox, out), source_dir=sandbox, output=out, extra="torch 9")[1] is False


def test_ignored_paths_do_not_split_the_key_and_the_switch_turns_it_off(sandbox, tmp_path, monkeypatch):
    a, b = tmp_path / "a.o", tmp_path / "b.o"
    assert ccc.run_compile(_cmd(sandbox, a), source_dir=sandbox, output=a)[1] is False
    assert ccc.run_compile(_cmd(sandbox, b), source_dir=sandbox, output=b)[1] is True
    monkeypatch.setenv("RWKVSLICE_COMPILE_CACHE", "0")
    assert ccc.run_compile(_cmd(sandbox, b), source_dir=sandbox, output=b)[1] is False
    shutil.rmtree(ccc.CACHE_DIR)
    assert ccc.run_compile(_cmd(sandbox, b), source_dir=sandbox, output=b)[1] is False
    assert not ccc.CACHE_DIR.exists()  # disabled: nothing written
