"""train/sharding.py in one process: the refusals (no distributed launch, no FSDP2), and a sharded
checkpoint's round trip through a world-size-1 gloo group (save, publish, list, restore, export-load).
Two real ranks: tests/integration/test_fsdp.py."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.cli import main
from rwkvslice.errors import CheckpointError, ConfigError
from rwkvslice.train import checkpoint as ckpt_io
from rwkvslice.train import sharding
from rwkvslice.train.distributed import DistEnv
from rwkvslice.train.optim import build_optimizer
from rwkvslice.train.step import LossModule, train_step

pytestmark = pytest.mark.component("Sharding (FSDP)")

CPU = torch.device("cpu")
TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
needs_cpu_fsdp = pytest.mark.skipif(TORCH_VERSION < (2, 6), reason="FSDP2 runs on CPU from torch 2.6 "
                                    "(older torch: test_fsdp_api_refuses_in_one_line covers the refusal)")


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def _hide(monkeypatch, public: bool, private: bool) -> None:
    """Make `from torch.distributed.fsdp import fully_shard` and/or the 2.5 path fail to import."""
    import torch.distributed.fsdp as fsdp

    if public and hasattr(fsdp, "fully_shard"):
        monkeypatch.delattr(fsdp, "fully_shard")
    if private:
        monkeypatch.setitem(sys.modules, "torch.distributed._composable.fsdp", None)


def test_fsdp_api_refuses_in_one_line(monkeypatch):
    _hide(monkeypatch, public=True, private=False)
    with pytest.raises(ConfigError) as info:  # torch 2.5: FSDP2 only under _composable, CUDA only
        sharding.fsdp_api(CPU)
    assert _one_line(info).startswith(f"--shard fsdp on CPU needs torch >= 2.6 (FSDP2 in torch {torch.__version__}")
    _hide(monkeypatch, public=True, private=True)
    with pytest.raises(ConfigError) as info:  # no FSDP2 at all
        sharding.fsdp_api(torch.device("cuda", 0))
    assert _one_line(info).startswith("--shard fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard)")


def test_fsdp_api_falls_back_to_the_torch_2_5_path_on_cuda(monkeypatch):
    pytest.importorskip("torch.distributed._composable.fsdp")
    _hide(monkeypatch, public=True, private=False)
    from torch.distributed._composable.fsdp import fully_shard

    assert sharding.fsdp_api(torch.device("cuda", 0)).fully_shard is fully_shard


def test_check_launch_refuses_fsdp_in_a_single_process_and_unknown_modes():
    single = DistEnv(0, 1, 0, CPU)
    sharding.check_launch("none", single)
    with pytest.raises(ConfigError) as info:
        sharding.check_launch("fsdp", single)
    assert "single process" in _one_line(info) and "torchrun --nproc-per-node" in str(info.value)
    with pytest.raises(ConfigError) as info:
        sharding.check_launch("zero3", single)
    assert _one_line(info) == "--shard must be one of none, fsdp, got 'zero3'"


@pytest.mark.parametrize("argv, message", [
    (["--data", "d.txt", "--shard", "fsdp"], "rwkvslice: error: --shard fsdp shards over the processes"),
    (["--demo", "--shard", "fsdp"], "rwkvslice: error: --demo evaluates its small model in one process"),
])
def test_cli_refusals_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "d.txt").write_text("hello world " * 200)
    assert main(["train", "--out", "run", "--no-progress", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "run").exists()


def test_local_state_bytes_of_an_unsharded_model_is_the_whole():
    model = RWKV7(RWKV7Config(vocab_size=64, n_embd=32, n_layer=1, head_size=16))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    sizes = sharding.local_state_bytes(model, opt)
    assert sizes["optim_full"] == 0  # AdamW's moments appear at the first step
    model.loss(torch.randint(0, 64, (1, 8)), torch.randint(0, 64, (1, 8))).backward()
    opt.step()
    sizes = sharding.local_state_bytes(model, opt)
    total = sum(p.numel() * 4 for p in model.parameters())
    assert sizes == {"params_local": total, "params_full": total, "optim_local": 2 * total, "optim_full": 2 * total}


@pytest.fixture
def group(tmp_path):
    """A world-size-1 gloo group in this process, always destroyed (FSDP2 needs a process group)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        yield DistEnv(0, 1, 0, CPU)
    finally:
        dist.destroy_process_group()


def _plain(seed: int):
    torch.manual_seed(seed)
    return RWKV7(RWKV7Config(vocab_size=320, n_embd=32, n_layer=2, head_size=16))  # the byte vocab


def _sharded(seed: int, precision: str = "fp32"):
    model = _plain(seed)
    sharding.shard_model(model, DistEnv(0, 2, 0, CPU), precision=precision)  # (only env.device is read)
    return model, build_optimizer(model, lr=1e-2, weight_decay=0.1)


@needs_cpu_fsdp
def test_sharded_checkpoint_round_trip(tmp_path, group):
    model, opt = _sharded(0)
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    idx = torch.randint(0, 320, (2, 8))
    stats = train_step(sharding.ShardedLossModule(model), opt, [(idx[:1], idx[:1]), (idx[1:], idx[1:])], group,
                       grad_clip=0.5)
    assert stats.applied and stats.grad_norm > 0.5
    root = tmp_path / "checkpoints"
    staged = sharding.save_shards(root, 3, model, opt, group)
    assert staged.name.startswith(".tmp-")  # a stale one is cleaned up after a crash
    path = ckpt_io.save_checkpoint(root, 3, model=model, optimizer=opt, trainer_state={"x": 1},
                                   run_info={"world_size": 1}, sharded_state=staged)
    assert not staged.exists() and sharding.is_sharded_checkpoint(path)
    assert not (path / "rwkvslice_model.safetensors").exists() and not (path / "optimizer.pt").exists()
    assert ckpt_io.latest_checkpoint(root) == path and ckpt_io.resolve_weights_dir(tmp_path) == path
    optim_state, trainer_state, run_info = ckpt_io.load_trainer_files(path)
    assert optim_state is None and trainer_state["step"] == 3 and run_info["step"] == 3

    want = {k: sharding.local_part(v).detach().clone() for k, v in model.state_dict().items()}  # world 1: whole
    plain = sharding.load_full_model(path)  # what `rwkvslice export` reads
    assert plain.config == model.config
    for k, v in plain.state_dict().items():
        assert torch.equal(v, want[k]), k
    from rwkvslice.generate.loading import load_model

    loaded, tok, weights, _ = load_model(tmp_path, tokenizer="byte")  # `rwkvslice generate --ckpt RUN`
    assert weights == path and tok.name == "byte"
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k

    other, other_opt = _sharded(1)  # other weights, fresh AdamW: everything must come from the checkpoint
    sharding.load_shards(path, other, other_opt)
    for k, v in other.state_dict().items():
        assert torch.equal(sharding.local_part(v), want[k]), k
    for (p, q) in zip(opt.param_groups[0]["params"], other_opt.param_groups[0]["params"], strict=True):
        a, b = opt.state[p], other_opt.state[q]
        assert torch.equal(torch.as_tensor(a["step"]), torch.as_tensor(b["step"]))
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sharding.local_part(a[key]), sharding.local_part(b[key])), key


@needs_cpu_fsdp
def test_nonfinite_gradient_shard_skips_the_update(group):
    model, opt = _sharded(0)
    before = {k: sharding.local_part(v).clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 320, (1, 8))
    lm = sharding.ShardedLossModule(model)
    real = lm.forward
    lm.forward = lambda *a: real(*a) * float("inf")  # type: ignore[method-assign]
    stats = train_step(lm, opt, [(idx, idx)], group)
    assert not stats.applied and stats.nonfinite == "loss (micro-batch 1)"
    for k, v in model.state_dict().items():
        assert torch.equal(sharding.local_part(v), before[k]), k


def test_broken_sharded_checkpoints_are_one_line_errors(tmp_path):
    ckpt = tmp_path / "step"
    (ckpt / "dcp").mkdir(parents=True)
    (ckpt / "dcp" / ".metadata").write_bytes(b"not a DCP metadata file")
    (ckpt / "rwkvslice_config.json").write_text("{not json")
    with pytest.raises(CheckpointError) as info:
        sharding.read_config(ckpt)
    assert _one_line(info).startswith(f"{ckpt / 'rwkvslice_config.json'}: cannot read the model config")
    (ckpt / "rwkvslice_config.json").write_text('{"model_type": "rwkvslice", "vocab_size": 64, "n_embd": 32, '
                                                '"n_layer": 1, "head_size": 16}')
    with pytest.raises(CheckpointError) as info:
        sharding.load_full_model(ckpt)
    assert _one_line(info).startswith(f"{ckpt}: cannot read sharded checkpoint")


@needs_cpu_fsdp
def test_bf16_computes_in_bf16_and_keeps_fp32_master_weights_and_gradients(group):
    """MixedPrecisionPolicy(bf16 params, fp32 reduce): the sharded weights, their gradients and AdamW's
    moments stay fp32; the loss equals the unsharded bf16-autocast step's to bf16 precision."""
    idx = torch.randint(0, 320, (2, 16))
    ref_model = _plain(0)
    ref = train_step(LossModule(ref_model), build_optimizer(ref_model, lr=1e-2, weight_decay=0.1), [(idx, idx)],
                     group, precision="bf16")
    model, opt = _sharded(0, precision="bf16")
    grads = {}
    real_step = opt.step

    def step(*args, **kwargs):
        grads.update({n: p.grad for n, p in model.named_parameters()})
        return real_step(*args, **kwargs)

    opt.step = step  # type: ignore[method-assign]
    stats = train_step(sharding.ShardedLossModule(model), opt, [(idx, idx)], group, precision="bf16")
    assert stats.applied
    assert stats.loss == pytest.approx(ref.loss, rel=2e-2)  # bf16 has an 8-bit mantissa: ~0.4 % per op
    assert stats.loss != ref.loss  # the policy's bf16 parameter cast is in effect (it changes the rounding)
    for name, p in model.named_parameters():
        assert sharding.local_part(p).dtype == torch.float32, name
        assert sharding.local_part(grads[name]).dtype == torch.float32, name
    for state in opt.state.values():
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
