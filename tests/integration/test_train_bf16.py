"""bf16 training: torch.autocast (CPU here, CUDA in the GPU layer) over fp32 master weights, no GradScaler."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import rwkvslice
from rwkvslice.data import DemoTask
from rwkvslice.errors import ConfigError
from rwkvslice.train.trainer import TrainConfig, train

pytestmark = pytest.mark.component("BFloat16")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return DemoTask(seed=5).write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", 200, "train")


def run(out, data, precision, device, steps=12, after_step=None):
    cfg = TrainConfig(out=str(out), data=str(data), model="demo", ctx_len=32, batch_size=8, steps=steps,
                      lr=2e-3, warmup_steps=2, precision=precision, progress=False, device=str(device))
    res = train(cfg, after_step=after_step, log=lambda m: None)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return res, [r["loss"] for r in recs]


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path, data, device):
    seen = {}

    def record(module, inputs, output):
        seen.setdefault("linear_out", output.dtype)  # returns None: the output is left alone

    def probe(step, model):
        if step == 1:  # record the dtype the linear layers compute in during the next step
            model.blocks[0].att.receptance.register_forward_hook(record)

    res, bf16 = run(tmp_path / "bf16", data, "bf16", device, after_step=probe)
    assert seen["linear_out"] == torch.bfloat16  # autocast was on
    assert all(p.dtype == torch.float32 for p in res.model.parameters())  # master weights stay fp32
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert sum(bf16[-3:]) / 3 < 0.5 * bf16[0]

    _, fp32 = run(tmp_path / "fp32", data, "fp32", device)
    # same init, same first batch: the loss before any update differs only by bf16 rounding
    assert bf16[0] == pytest.approx(fp32[0], rel=1e-2)


def test_fp16_is_refused_with_a_clear_message(tmp_path, data):
    with pytest.raises(ConfigError, match="fp16 is not supported .*bf16"):
        run(tmp_path, data, "fp16", "cpu")


def test_no_grad_scaler_anywhere():
    """bf16 has fp32's exponent range: loss scaling is unnecessary, and the trainer never uses it."""
    src = Path(rwkvslice.__file__).parent
    offenders = []
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):  # code, not strings (messages may name it)
            name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
            if name == "GradScaler" or (isinstance(node, ast.alias) and node.name.endswith("GradScaler")):
                offenders.append(f"{path}:{node.lineno}")
    assert offenders == []
