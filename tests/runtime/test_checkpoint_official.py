"""Loading official `.pth` checkpoints: layouts we must accept and bad files we must reject clearly."""

from __future__ import annotations

import argparse

import pytest
import torch

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.errors import CheckpointError, RWKVSliceError


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    torch.manual_seed(0)
    m = RWKV7(RWKV7Config(vocab_size=64, n_embd=32, n_layer=2, head_size=16))
    path = tmp_path_factory.mktemp("ckpt") / "m.pth"
    m.save_official(path)
    return m, path, torch.load(path, weights_only=True)


def test_round_trip_is_exact(official):
    m, path, _ = official
    again = RWKV7.from_official(path)
    for (k, a), (_, b) in zip(m.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_accepts_layer0_v_lora_wrapper_prefix_squeezed_vectors_and_half_precision(official, tmp_path):
    m, _, sd = official
    C = m.config.n_embd
    variant = {"_forward_module." + k: v.to(torch.float16) for k, v in sd.items()}
    variant["_forward_module.blocks.0.att.x_r"] = sd["blocks.0.att.x_r"].reshape(C)  # squeezed (C,)
    variant["blocks.0.att.v0"] = torch.zeros(1, 1, C)  # created by the trainer, unused in layer 0
    variant["blocks.0.att.v1"] = torch.zeros(C, 8)
    variant["blocks.0.att.v2"] = torch.zeros(8, C)
    torch.save(variant, tmp_path / "v.pth")
    loaded = RWKV7.from_official(tmp_path / "v.pth")
    assert loaded.emb.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.blocks[1].att.w0, sd["blocks.1.att.w0"].half().float())
    torch.testing.assert_close(loaded.blocks[0].att.x_r, sd["blocks.0.att.x_r"])
    assert all(p.requires_grad for p in loaded.parameters())


def _expect_error(path, *needles):
    with pytest.raises(CheckpointError) as info:
        RWKV7.from_official(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    for needle in needles:
        assert needle in msg
    assert isinstance(info.value, RWKVSliceError)


def test_missing_key(official, tmp_path):
    _, _, sd = official
    bad = dict(sd)
    del bad["blocks.1.att.k_a"]
    torch.save(bad, tmp_path / "missing.pth")
    _expect_error(tmp_path / "missing.pth", "missing key", "blocks.1.att.k_a")


def test_wrong_shape(official, tmp_path):
    _, _, sd = official
    bad = dict(sd)
    bad["blocks.1.att.key.weight"] = torch.zeros(32, 31)
    torch.save(bad, tmp_path / "shape.pth")
    _expect_error(tmp_path / "shape.pth", "blocks.1.att.key.weight", "(32, 31)", "(32, 32)")


def test_unexpected_key(official, tmp_path):
    _, _, sd = official
    torch.save({**sd, "blocks.0.ffn.s_emb.weight": torch.zeros(4, 4)}, tmp_path / "extra.pth")
    _expect_error(tmp_path / "extra.pth", "unexpected key", "s_emb")


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    _expect_error(tmp_path / "list.pth", "not a state dict")
    torch.save({"emb.weight": torch.zeros(3), "step": 7}, tmp_path / "mixed.pth")
    _expect_error(tmp_path / "mixed.pth", "not a state dict", "step")


def test_truncated_file(official, tmp_path):
    _, path, _ = official
    data = path.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path / "trunc.pth", "cannot read checkpoint")


def test_pickle_that_is_not_weights_only(tmp_path):
    torch.save({"emb.weight": torch.zeros(2, 2), "args": argparse.Namespace(lr=1)}, tmp_path / "obj.pth")
    _expect_error(tmp_path / "obj.pth", "refusing to load", "weights_only=True")


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.pth", "no such checkpoint file")


def test_integer_tensor(official, tmp_path):
    _, _, sd = official
    bad = dict(sd)
    bad["ln_out.bias"] = torch.zeros(32, dtype=torch.int64)
    torch.save(bad, tmp_path / "int.pth")
    _expect_error(tmp_path / "int.pth", "ln_out.bias", "floating-point")


def test_pretrained_dir_errors(official, tmp_path):
    m, _, _ = official
    with pytest.raises(CheckpointError, match="missing"):
        RWKV7.from_pretrained(tmp_path / "empty")
    m.save_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        RWKV7.from_pretrained(tmp_path / "ok")
