"""train/tensorboard.py: --tensorboard writes the numeric fields of metrics.jsonl as scalars (read back with
tensorboard's own EventAccumulator), and a missing tensorboard package is a one-line ConfigError."""

from __future__ import annotations

import sys

import pytest

from rwkvslice.errors import ConfigError

pytestmark = pytest.mark.component("Training Loop")

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="the optional tensorboard package is not installed")


def read_scalars(log_dir) -> dict:
    acc = event_accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_numeric_fields_become_scalars(tmp_path):
    from rwkvslice.train.tensorboard import TensorBoardLog

    log = TensorBoardLog(str(tmp_path / "tb"))
    log.write({"step": 1, "loss": 2.5, "tokens": 64, "grad_norm": None, "skipped": "loss"})
    log.write({"step": 2, "loss": 2.0, "tokens": 64, "eval_loss": 2.25, "grad_norm": float("inf")})
    log.close()
    got = read_scalars(tmp_path / "tb")
    assert got == {"loss": [(1, 2.5), (2, 2.0)], "tokens": [(1, 64.0), (2, 64.0)], "eval_loss": [(2, 2.25)]}


def test_missing_package_is_a_one_line_config_error(monkeypatch):
    from rwkvslice.train.tensorboard import check_available

    check_available()  # installed here
    for name in list(sys.modules):
        if name == "tensorboard" or name.startswith(("tensorboard.", "torch.utils.tensorboard")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    with pytest.raises(ConfigError) as info:
        check_available()
    msg = str(info.value)
    assert msg.startswith("--tensorboard needs the tensorboard package (pip install tensorboard)")
    assert "\n" not in msg
