"""train/stopping.py: the --max-time parser, and the signal/timer control a training loop asks after each
step (first signal: stop after the step; second: ForcedStop at once; handlers restored afterwards)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from rwkvslice.cli import main
from rwkvslice.errors import ConfigError
from rwkvslice.train.distributed import DistEnv
from rwkvslice.train.stopping import MAX_TIME, ForcedStop, StopControl, format_duration, parse_duration

pytestmark = pytest.mark.component("Clean Stop")

SINGLE = DistEnv(0, 1, 0, torch.device("cpu"))


@pytest.mark.parametrize("text, seconds", [
    ("2h30m", 9000), ("90m", 5400), ("1h", 3600), ("45s", 45), ("3600", 3600), ("0.5", 0.5),
    ("1.5h", 5400), ("1d12h", 129600), ("1h0m5s", 3605), (" 2H30M ", 9000), ("10m30s", 630), (".5m", 30),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "2h2h", "30m2h", "1x", "h", "1h 30m", "2h30", "-5", "0", "0s",
                                  "inf", "nan", "1e400", "-1h", "1..5h"])
def test_parse_duration_refuses_bad_values(text):
    with pytest.raises(ConfigError) as info:
        parse_duration(text)
    assert str(info.value).startswith("--max-time") and "\n" not in str(info.value)


def test_bad_max_time_on_the_command_line_is_one_line_and_status_2(tmp_path, capsys):
    (tmp_path / "d.txt").write_text("hello world\n")
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", str(tmp_path / "d.txt"), "--out", str(tmp_path / "X"), "--max-time", "2h2h"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-time" in err[0] and "'2h2h'" in err[0], err
    assert not (tmp_path / "X").exists()


def test_format_duration():
    assert [format_duration(s) for s in (9000, 45, 3605, 0.2)] == ["2h30m", "45s", "1h5s", "0s"]


needs_main_thread = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                       reason="signal handlers can only be installed in the main thread")


@needs_main_thread
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_first_signal_asks_to_stop_second_forces(sig, code):
    before = signal.getsignal(sig)
    with StopControl(SINGLE) as stop:
        assert signal.getsignal(sig) != before
        assert not stop.should_stop()
        os.kill(os.getpid(), sig)  # delivered to the main thread before os.kill returns to Python code
        assert stop.should_stop() and stop.exit_code == code
        assert stop.describe() == f"stopped by {signal.Signals(sig).name}"
        with pytest.raises(ForcedStop) as info:
            os.kill(os.getpid(), sig)
            time.sleep(1)  # never reached: the handler raises
        assert info.value.signum == sig and str(info.value) == f"second {signal.Signals(sig).name}"
    assert signal.getsignal(sig) == before  # restored


def test_max_time_stops_once_the_wall_time_has_passed():
    stop = StopControl(SINGLE, max_time=3600)
    assert not stop.should_stop() and stop.reason is None and stop.exit_code == 0
    late = StopControl(SINGLE, max_time=5, start=time.monotonic() - 6)
    assert late.should_stop() and late.reason == MAX_TIME and late.exit_code == 0
    assert late.describe() == "--max-time 5s reached"


def test_without_a_deadline_or_signal_it_never_stops():
    stop = StopControl(SINGLE)
    assert not any(stop.should_stop() for _ in range(3)) and stop.describe() == "not stopped"
