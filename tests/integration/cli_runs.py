"""Running `rwkvslice` from a test: in this process, or as a real process only where the test needs one.

A CLI process costs ~5 s before its first step (importing torch, and torch._dynamo, which torch.optim
imports when the optimizer is built), more on busy cores. A reference run or a `--resume` only reads
and writes files, so the process boundary proves nothing there: they run in the test's process through
the CLI's own main(). The run that is SIGKILLed or SIGTERMed, and DDP ranks, are real processes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
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


def signal_after_steps(args, out: Path, steps: int, rng, sig=signal.SIGKILL, jitter: float = 0.3,
                       env=None, timeout: float = 240) -> int:
    """Start `rwkvslice ARGS` as a process, wait until it has logged `steps` steps, wait a random moment
    more (up to `jitter` s: anywhere in the next step, its forward, backward or checkpoint write) and send
    `sig`. Returns the process's exit status; the process is always reaped."""
    proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
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
        proc.wait(timeout=30)
    return proc.returncode
