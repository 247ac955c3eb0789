"""Device resolution and the single-process side of torch.distributed setup (no worker processes here;
tests/integration/test_ddp.py runs two gloo ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rwkvslice.errors import ConfigError
from rwkvslice.train import distributed as D

pytestmark = pytest.mark.component("Training Loop")


def _fake_cuda(monkeypatch, available: bool, count: int = 0):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def _config_error(name, local_rank=0):
    with pytest.raises(ConfigError) as info:
        D.resolve_device(name, local_rank)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_auto_and_cuda_follow_availability_and_local_rank(monkeypatch):
    _fake_cuda(monkeypatch, available=False)
    assert D.resolve_device("auto") == torch.device("cpu")
    assert D.resolve_device("cpu", local_rank=3) == torch.device("cpu")
    _fake_cuda(monkeypatch, available=True, count=2)
    assert D.resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert D.resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert D.resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)  # an explicit index wins


def test_cuda_without_cuda_is_a_config_error(monkeypatch):
    _fake_cuda(monkeypatch, available=False)
    msg = _config_error("cuda")
    assert msg.startswith("--device cuda:") and "CUDA is not available" in msg


def test_cuda_index_beyond_the_visible_devices(monkeypatch):
    _fake_cuda(monkeypatch, available=True, count=2)
    assert _config_error("cuda:2") == "--device cuda:2: only 2 CUDA device(s) visible"
    # torchrun's LOCAL_RANK picks the device when none is named: rank 2 on a 2-GPU machine is an error
    assert "only 2 CUDA device(s)" in _config_error("cuda", local_rank=2)


def test_other_device_types_are_refused():
    assert _config_error("meta") == "--device meta: only cpu, cuda and cuda:N are supported"
    msg = _config_error("gpu0")
    assert msg.startswith("--device: invalid device 'gpu0'")


def test_single_process_env_without_torchrun(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = D.setup_distributed("cpu")
    assert (env.rank, env.world_size, env.local_rank, env.device) == (0, 1, 0, torch.device("cpu"))
    assert env.is_main and not env.distributed and not env.initialized_here
    t = torch.tensor([1.5, 2.0])
    assert D.all_reduce_sum(t, env) is t and t.tolist() == [1.5, 2.0]
    assert D.all_gather_objects({"a": 1}, env) == [{"a": 1}]
    assert D.broadcast_object("x", env) == "x"
    D.barrier(env)  # a no-op: no process group exists
    D.teardown_distributed(env)
    assert not dist.is_initialized()


def test_a_process_group_set_up_by_the_caller_is_reused_and_left_alone(monkeypatch, tmp_path):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        env = D.setup_distributed("cpu")
        assert (env.rank, env.world_size, env.initialized_here) == (0, 1, False)
        D.teardown_distributed(env)
        assert dist.is_initialized()  # not ours to destroy
    finally:
        dist.destroy_process_group()
