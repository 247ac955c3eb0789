"""Precision names and the autocast context of a training step (the numerics of bf16 training are in
test_e2e.py::test_e2e_bf16_training_without_grad_scaler)."""

from __future__ import annotations

import pytest
import torch

from rwkvslice.errors import ConfigError
from rwkvslice.slicing.loss import compute_dtype
from rwkvslice.train.step import autocast_context, check_precision

pytestmark = pytest.mark.component("BFloat16")


@pytest.mark.parametrize("name, message", [
    ("fp16", "--precision fp16 is not supported (it needs loss scaling); use bf16, which has fp32's range "
             "and trains without a GradScaler"),
    ("fp64", "--precision must be one of fp32, bf16, got 'fp64'"),
    ("BF16", "--precision must be one of fp32, bf16, got 'BF16'"),
])
def test_unsupported_precisions_are_config_errors(name, message):
    with pytest.raises(ConfigError) as info:
        check_precision(name)
    assert str(info.value) == message


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_supported_precisions_pass(name):
    check_precision(name)


def test_bf16_context_is_cpu_autocast_and_fp32_context_is_none():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with autocast_context("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert compute_dtype(x, w) == torch.bfloat16
        assert compute_dtype(x.double(), w.double()) == torch.float64  # autocast leaves fp64 alone
        assert torch.nn.functional.linear(x, w).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with autocast_context("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
        assert compute_dtype(x, w) == torch.float32
        assert compute_dtype(x.bfloat16(), w) == torch.float32  # promotion with an fp32 master weight
        assert torch.nn.functional.linear(x, w).dtype == torch.float32
