"""Running `rwkvslice` from a test: in this process, or as a forked process where the test needs one.

A fresh interpreter costs ~5 s before its first step (importing torch, and torch._dynamo, which torch.optim
imports when the optimizer is built), more on busy cores. So:
- a reference run or a `--resume` only reads and writes files, and the process boundary proves nothing
  there: run_in_process() calls the CLI's own main() in the test's process;
- a run that is SIGKILLed or SIGTERMed, and DDP ranks, must be processes of their own: fork() starts one
  as a fork of the test's process, where torch is already imported, and runs `python -m rwkvslice.cli
  ARGS` or `python -c SCRIPT ARGS` there. A fork is a real process (own pid, own signal handlers, gloo
  between ranks, killed for real); what it does not check, the console entry point itself, the
  subprocess tests of test_cli.py, test_train_demo.py and torchrun in test_stop.py do.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "rwkvslice.cli"]


def run_in_process(args) -> None:
    """`rwkvslice ARGS` through rwkvslice.cli.main in this process; it must succeed."""
    from rwkvslice.cli import main

    args = [str(a) for a in args]
    rc = main(args)
    assert rc == 0, f"`rwkvslice {' '.join(args)}` exited {rc} (its stderr is in the captured output)"


def metric_lines(out: Path) -> int:
    p = Path(out) / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.is_file() else 0


class Forked:
    """A forked child running a Python command line; the subset of subprocess.Popen the tests use.

    `argv` is what would follow the interpreter: ["-m", "rwkvslice.cli", ...] or ["-c", SCRIPT, ...]. The
    child gets exactly `env` as its environment (variables torch reads once at import, such as
    OMP_NUM_THREADS, keep this process's values), and its stdout / stderr go to files read back by
    communicate(). returncode follows Popen: the exit status, or -N when signal N ended it.
    """

    def __init__(self, argv, env=None):
        argv = [str(a) for a in argv]
        if argv[:2] != ["-m", "rwkvslice.cli"] and argv[:1] != ["-c"]:
            raise ValueError(f"fork() runs `-m rwkvslice.cli ...` or `-c SCRIPT ...`, not {argv[:2]}")
        self._dir = tempfile.mkdtemp(prefix="rwkvslice-fork-")
        self._out, self._err = os.path.join(self._dir, "stdout"), os.path.join(self._dir, "stderr")
        env = dict(os.environ if env is None else env)
        self._proc = multiprocessing.get_context("fork").Process(
            target=_child, args=(argv, env, self._out, self._err), daemon=False)
        sys.stdout.flush(), sys.stderr.flush()  # nothing buffered here gets written twice
        self._proc.start()
        self.pid = self._proc.pid

    @property
    def returncode(self):
        return self._proc.exitcode

    def poll(self):
        return self._proc.exitcode

    def wait(self, timeout=None):
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(f"fork {self.pid}", timeout)
        return self._proc.exitcode

    def send_signal(self, sig):
        if self._proc.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout=None):
        """Wait, then return (stdout, stderr) and remove the files that held them."""
        self.wait(timeout)
        try:
            return Path(self._out).read_text(), Path(self._err).read_text()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)


def _child(argv, env, out_path, err_path):
    """In the fork: stdout/stderr to files, the given environment, then the command line. It ends through
    multiprocessing, which flushes the streams and leaves with os._exit (no atexit of the test process)."""
    out, err = open(out_path, "w", buffering=1), open(err_path, "w", buffering=1)  # noqa: SIM115
    os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
    sys.stdout, sys.stderr = out, err
    signal.signal(signal.SIGTERM, signal.SIG_DFL), signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(env)
    if argv[0] == "-m":
        from rwkvslice.cli import main

        sys.argv = ["rwkvslice", *argv[2:]]
        sys.exit(main(argv[2:]))
    sys.argv = ["-c", *argv[2:]]
    exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})


@functools.cache
def _import_once() -> None:
    """What every training run imports, imported here once before the first fork, so no fork imports it
    again (under coverage's tracer torch._dynamo alone, imported by torch.optim, takes 5-10 s)."""
    import matplotlib.pyplot  # noqa: F401  (loss.png)
    import torch

    import rwkvslice.cli.train  # noqa: F401
    import rwkvslice.train.trainer  # noqa: F401

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo the way torch.optim does


def fork(argv, env=None) -> Forked:
    """Start `python ARGV` as a fork of this process (see the module docstring)."""
    _import_once()
    return Forked(argv, env)


def signal_after_steps(args, out: Path, steps: int, rng, sig=signal.SIGKILL, jitter: float = 0.3,
                       env=None, timeout: float = 240) -> int:
    """Start `rwkvslice ARGS` as a process, wait until it has logged `steps` steps, wait a random moment
    more (up to `jitter` s: anywhere in the next step, its forward, backward or checkpoint write) and send
    `sig`. Returns the process's exit status; the process is always reaped."""
    proc = fork(["-m", "rwkvslice.cli", *args], env=env)
    try:
        deadline = time.monotonic() + timeout
        while metric_lines(out) < steps and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, jitter))
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    return proc.returncode
