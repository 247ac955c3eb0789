"""Loading official `.pth` checkpoints: layouts we must accept and bad files we must reject clearly."""

from __future__ import annotations

import argparse
import json

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
    _expect_error(tmp_path / "obj.pth", "refusing to load", "arbitrary Python objects (argparse.Namespace)")
    with pytest.raises(CheckpointError) as info:  # torch's advice to load it anyway is not passed on
        RWKV7.from_official(tmp_path / "obj.pth")
    assert "weights_only=False" not in str(info.value) and "trust" not in str(info.value)


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
    (tmp_path / "ok" / "rwkvslice_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        RWKV7.from_pretrained(tmp_path / "ok")


@pytest.mark.parametrize("drop, needle", [
    ("emb.weight", "missing key 'emb.weight'"),
    ("blocks.0.att.r_k", "missing key 'blocks.0.att.r_k'"),
])
def test_missing_key_the_config_is_inferred_from(official, tmp_path, drop, needle):
    _, _, sd = official
    bad = {k: v for k, v in sd.items() if k != drop}
    torch.save(bad, tmp_path / "nocfg.pth")
    _expect_error(tmp_path / "nocfg.pth", needle)


def test_head_shape_that_is_not_two_dimensional(official, tmp_path):
    _, _, sd = official
    torch.save({**sd, "blocks.0.att.r_k": torch.zeros(32)}, tmp_path / "rk.pth")
    _expect_error(tmp_path / "rk.pth", "'blocks.0.att.r_k' has shape (32,)", "(n_head, head_size)")


def test_a_block_missing_in_the_middle(official, tmp_path):
    _, _, sd = official
    # blocks 0 and 2 present, block 1 entirely absent: the depth is 3 by the highest index
    shifted = {k.replace("blocks.1.", "blocks.2."): v for k, v in sd.items()}
    torch.save(shifted, tmp_path / "gap.pth")
    _expect_error(tmp_path / "gap.pth", "missing every key of block 1")


def test_inconsistent_shapes_are_a_checkpoint_error(official, tmp_path):
    _, _, sd = official
    # width 32 with head size 24 cannot be split into heads: RWKV7Config refuses it
    torch.save({**sd, "blocks.0.att.r_k": torch.zeros(1, 24)}, tmp_path / "heads.pth")
    _expect_error(tmp_path / "heads.pth", "inconsistent shapes", "multiple of head_size (24)")


def test_lora_rank_absent_from_every_block_falls_back_to_the_default_then_fails(official, tmp_path):
    _, _, sd = official
    bad = {k: v for k, v in sd.items() if not k.endswith(".att.g1")}
    torch.save(bad, tmp_path / "nog1.pth")
    # the rank is unknown, so the config uses its default; the load then names the first absent key
    _expect_error(tmp_path / "nog1.pth", "missing key 'blocks.0.att.g1'", "(and 1 more)")


def test_failed_official_save_leaves_no_partial_file(official, tmp_path, monkeypatch):
    m, _, _ = official
    target = tmp_path / "out" / "m.pth"

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        m.save_official(target)
    assert list(target.parent.iterdir()) == []  # neither the target nor the temporary file


@pytest.mark.parametrize("config_name, weights_name", [("rwkvslice_config.json", "rwkvslice_model.safetensors"),
                                                       ("config.json", "model.safetensors")])  # rwkvslice <= 0.1
@pytest.mark.parametrize("config_text, needles", [
    ("{not json", ["not valid JSON"]),
    ("[1, 2]", ["expected a JSON object"]),
    ('{"model_type": "rwkv7", "vocab_size": 64, "n_embd": 32}', ["missing field(s) n_layer"]),
    ('{"vocab_size": 64, "n_embd": 32, "n_layer": 2, "head_size": 16, "dropout": 0.1}',
     ["unknown field(s) dropout"]),
])
def test_pretrained_config_errors_name_the_config_file(official, tmp_path, config_text, needles, config_name,
                                                       weights_name):
    m, _, _ = official
    m.save_pretrained(tmp_path / "d")
    (tmp_path / "d" / "rwkvslice_config.json").unlink()
    (tmp_path / "d" / "rwkvslice_model.safetensors").rename(tmp_path / "d" / weights_name)
    (tmp_path / "d" / config_name).write_text(config_text)
    with pytest.raises(CheckpointError) as info:
        RWKV7.from_pretrained(tmp_path / "d")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "d" / config_name))
    for needle in needles:
        assert needle in msg


def _save_safetensors(sd, directory, config):
    from safetensors.torch import save_file

    directory.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory / "model.safetensors"


@pytest.mark.parametrize("edit, needle", [
    (lambda sd: sd.pop("blocks.1.ffn.value.weight"), "missing key 'blocks.1.ffn.value.weight'"),
    (lambda sd: sd.update({"ln_out.weight": torch.ones(31)}), "'ln_out.weight' has shape (31,), expected (32,)"),
    (lambda sd: sd.update({"blocks.0.extra": torch.ones(2)}), "unexpected key 'blocks.0.extra'"),
])
def test_pretrained_weight_errors_name_the_weights_file(official, tmp_path, edit, needle):
    m, _, _ = official
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    edit(sd)
    weights = _save_safetensors(sd, tmp_path / "d", m.config.to_dict())
    with pytest.raises(CheckpointError) as info:
        RWKV7.from_pretrained(tmp_path / "d")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(weights)) and needle in msg, msg
