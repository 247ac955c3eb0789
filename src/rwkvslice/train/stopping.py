"""A clean stop: on SIGTERM/SIGINT or after --max-time, finish the step, checkpoint, exit.

A cluster stops a job by signal: SLURM sends SIGTERM at the time limit or on preemption (then SIGKILL
after KillWait, 30 s by default), torchrun forwards SIGTERM to its workers, Ctrl-C is SIGINT. The
trainer asks `StopControl.should_stop()` after every optimizer step; the first signal only sets a flag,
so the step in flight completes, then the trainer writes a checkpoint (atomically) and returns. A second
signal raises `ForcedStop` at once: a checkpoint being written is abandoned (its temporary directory is
removed; the earlier checkpoints are untouched) and the process exits.

Under DDP `should_stop` all-reduces the flag (a MAX over one small tensor per step), so every rank stops
after the same step even when the signal reaches them at different moments, or reaches only one.
"""

from __future__ import annotations

import re
import signal
import threading
import time

import torch
import torch.distributed as dist

from rwkvslice.errors import ConfigError
from rwkvslice.train.distributed import DistEnv

HANDLED = (signal.SIGTERM, signal.SIGINT)
MAX_TIME = -1  # the stop reason of --max-time (signals use their number)
MAX_TIME_CODE = 1  # its value in the all-reduced flag: below every handled signal's number, so a signal
# that arrives on some rank in the same step names the stop

_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([dhms])")


def parse_duration(text: str) -> float:
    """Seconds in "2h30m", "90m", "1h", "45s", "1d12h", "1.5h" or plain seconds ("3600"); ConfigError else.

    Units go from days to seconds, each at most once ("30m2h" and "1h1h" are refused); the total is > 0.
    """
    s = str(text).strip().lower()
    bad = ConfigError(f"--max-time: cannot read {text!r} as a duration; use e.g. 2h30m, 90m, 45s or seconds")
    try:
        seconds = float(s)
    except ValueError:
        pos, seconds, last_unit = 0, 0.0, -1
        if not s:
            raise bad from None
        for m in _DURATION.finditer(s):
            order = list(_UNITS).index(m.group(2))
            if m.start() != pos or order <= last_unit:
                raise bad from None
            seconds += float(m.group(1)) * _UNITS[m.group(2)]
            pos, last_unit = m.end(), order
        if pos != len(s):
            raise bad from None
    if not (seconds > 0 and seconds < float("inf")):
        raise ConfigError(f"--max-time must be a positive duration, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (sec, "s")) if v) or "0s"


class ForcedStop(BaseException):
    """A second signal while stopping: abandon what is running (BaseException: nothing may swallow it)."""

    def __init__(self, signum: int):
        super().__init__(f"second {signal.Signals(signum).name}")
        self.signum = signum


class StopControl:
    """Signal handlers and the wall-clock budget of one training loop (a context manager).

    Handlers are installed only in the main thread (Python allows no other) and restored on exit.
    """

    def __init__(self, env: DistEnv, max_time: float | None = None, start: float | None = None):
        self.env = env
        self.deadline = None if max_time is None else (time.monotonic() if start is None else start) + max_time
        self.max_time = max_time
        self.signum: int | None = None  # the first signal received by this process
        self.reason: int | None = None  # agreed stop code once should_stop() said yes: a signal number or MAX_TIME
        self._previous: dict = {}

    def install(self) -> StopControl:
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before install()."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopControl:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise ForcedStop(signum)
        self.signum = signum

    def should_stop(self) -> bool:
        """After an optimizer step: whether to checkpoint and stop now (every rank gets the same answer)."""
        code = 0
        if self.signum is not None:
            code = self.signum
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            code = MAX_TIME_CODE
        if self.env.distributed:
            flag = torch.tensor([code], dtype=torch.int64, device=self.env.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        if code == 0:
            return False
        self.reason = MAX_TIME if code == MAX_TIME_CODE else code
        return True

    @property
    def exit_code(self) -> int:
        """128 + the signal number (the shell's convention: 143 for SIGTERM, 130 for SIGINT); 0 for --max-time."""
        return 0 if self.reason in (None, MAX_TIME) else 128 + int(self.reason)

    def describe(self) -> str:
        if self.reason == MAX_TIME:
            return f"--max-time {format_duration(self.max_time or 0)} reached"
        if self.reason is None:
            return "not stopped"
        return f"stopped by {signal.Signals(self.reason).name}"
