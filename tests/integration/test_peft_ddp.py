"""DDP (2 gloo ranks) with LoRA and with state tuning equals one process with twice the batch.

The ranks run `rwkvslice train` with torchrun's environment (file:// rendezvous, see test_ddp.py);
the single process runs the same command at batch 2b, through the CLI's main() in the test's process.
Tolerance as in test_ddp.py: losses rel 1e-5 (fp32 sums in another order), trainable tensors
norm-relative 1e-3 after AdamW (a float-noise gradient element can take a +-lr step on one side only; a
normalisation bug moves every element by O(lr)).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.data import DemoTask

pytestmark = [pytest.mark.ddp, pytest.mark.component("PEFT")]

sys.path.insert(0, os.path.dirname(__file__))
from test_ddp import assert_tensors_close_after_adamw, ranks_vs_one_process  # noqa: E402


@pytest.mark.slow  # 2 CLI processes (the ranks) and one run in this process per case
@pytest.mark.parametrize("tune", [["--tune", "lora", "--lora-r", "4"], ["--tune", "state"]], ids=["lora", "state"])
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, tune):
    data = DemoTask(seed=4).write_jsonl(tmp_path / "train.jsonl", 64, "train")
    torch.manual_seed(0)  # a base whose every weight matters (the official init zeroes att.output, which
    model = RWKV7(RWKV7Config(vocab_size=320, n_embd=64, n_layer=2, head_size=32))  # blocks a state's grad)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_official(tmp_path / "base.pth")
    common = ["--data", str(data), "--init-from", str(tmp_path / "base.pth"), "--ctx-len", "32", "--steps", "3",
              "--lr", "2e-2", "--warmup-steps", "1", "--no-progress", "--device", "cpu", *tune]
    ddp_out, single_out = ranks_vs_one_process(tmp_path, common)  # losses per step: test_ddp.py
    a = load_file(str(ddp_out / "checkpoints" / "step-00000003" / "peft.safetensors"))
    b = load_file(str(single_out / "checkpoints" / "step-00000003" / "peft.safetensors"))
    assert_tensors_close_after_adamw(a, b)
    assert max(t.abs().max().item() for t in b.values()) > 0  # they trained (the state starts at zero, B at zero)
