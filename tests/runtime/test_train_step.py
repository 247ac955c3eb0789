"""train_step's cross-rank agreement without spawning ranks: the all-reduce is replaced by one that adds
what a second rank would contribute (tests/integration/test_ddp.py runs real gloo ranks)."""

from __future__ import annotations

import copy

import pytest
import torch

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.train import step as step_mod
from rwkvslice.train.distributed import DistEnv

pytestmark = pytest.mark.component("Training Loop")


def _setup():
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(vocab_size=40, n_embd=32, n_layer=1, head_size=16))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 40, (2, 6), generator=g)
    targets = torch.randint(0, 40, (2, 6), generator=g)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return model, opt, [(idx, targets)], env


def test_a_nonfinite_step_on_another_rank_stops_this_one(monkeypatch):
    model, opt, micro, env = _setup()
    before = copy.deepcopy(model.state_dict())
    real = step_mod.all_reduce_sum

    def with_a_bad_peer(t, env):
        t = real(t, env)
        if t.shape == (1,):  # the non-finite flag: the other rank saw a NaN
            t += 1.0
        return t

    monkeypatch.setattr(step_mod, "all_reduce_sum", with_a_bad_peer)
    stats = step_mod.train_step(step_mod.LossModule(model), opt, micro, env, grad_clip=1.0)
    assert stats.nonfinite == "loss or gradient on another rank" and not stats.applied
    assert stats.loss > 0 and stats.grad_norm != stats.grad_norm  # finite loss here; no norm (nan)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # the update was skipped on this rank too
    assert all(p.grad is None for p in model.parameters())  # and the gradients were dropped


def test_clipping_reports_the_norm_before_clipping():
    model, opt, micro, env = _setup()
    reference = copy.deepcopy(model)
    loss = reference.loss(*micro[0])
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in reference.parameters()
                                                 if p.grad is not None])).item()
    clip = norm / 4
    stats = step_mod.train_step(step_mod.LossModule(model), opt, micro, env, grad_clip=clip)
    assert stats.applied and stats.grad_norm == pytest.approx(norm, rel=1e-5)
    # SGD(lr=0.1) applied the clipped gradient: g * clip / norm
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.detach(), q.detach() - 0.1 * q.grad * (clip / norm), rtol=1e-4, atol=1e-6,
                                       msg=name)
