"""model/hf.py without rwkv7-hf: the weight-name map and config mapping against the documented HF layout
(shared/research/peft_interop.md section 5, written out by hand below), bit-exact round trips, the errors
for broken directories, atomic writing, the native directory and what `load_base` accepts.
rwkv7-hf itself runs in tests/integration/test_interop_hf.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.errors import CheckpointError, ConfigError
from rwkvslice.model import hf

pytestmark = pytest.mark.component("HF Interop")

# (official name, HF name, how the tensor changes), from the documented table
NAME_TABLE = [
    ("emb.weight", "model.embeddings.weight", "same"),
    ("blocks.0.ln0.weight", "model.layers.0.pre_norm.weight", "same"),
    ("blocks.0.ln0.bias", "model.layers.0.pre_norm.bias", "same"),
    ("blocks.3.ln1.weight", "model.layers.3.attn_norm.weight", "same"),
    ("blocks.3.ln2.bias", "model.layers.3.ffn_norm.bias", "same"),
    ("blocks.1.att.x_r", "model.layers.1.attn.x_r", "same"),
    ("blocks.1.att.x_g", "model.layers.1.attn.x_g", "same"),
    ("blocks.1.att.w0", "model.layers.1.attn.w_lora.lora.2.bias", "flat"),
    ("blocks.1.att.a0", "model.layers.1.attn.a_lora.lora.2.bias", "flat"),
    ("blocks.1.att.v0", "model.layers.1.attn.v_lora.lora.2.bias", "flat"),
    ("blocks.1.att.w1", "model.layers.1.attn.w_lora.lora.0.weight", "t"),
    ("blocks.1.att.g1", "model.layers.1.attn.g_lora.lora.0.weight", "t"),
    ("blocks.1.att.a2", "model.layers.1.attn.a_lora.lora.2.weight", "t"),
    ("blocks.1.att.v2", "model.layers.1.attn.v_lora.lora.2.weight", "t"),
    ("blocks.1.att.k_k", "model.layers.1.attn.k_k", "flat"),
    ("blocks.1.att.k_a", "model.layers.1.attn.k_a", "flat"),
    ("blocks.1.att.r_k", "model.layers.1.attn.r_k", "same"),
    ("blocks.2.att.receptance.weight", "model.layers.2.attn.r_proj.weight", "same"),
    ("blocks.2.att.key.weight", "model.layers.2.attn.k_proj.weight", "same"),
    ("blocks.2.att.value.weight", "model.layers.2.attn.v_proj.weight", "same"),
    ("blocks.2.att.output.weight", "model.layers.2.attn.o_proj.weight", "same"),
    ("blocks.2.att.ln_x.weight", "model.layers.2.attn.g_norm.weight", "same"),
    ("blocks.2.att.ln_x.bias", "model.layers.2.attn.g_norm.bias", "same"),
    ("blocks.2.ffn.x_k", "model.layers.2.ffn.x_k", "flat"),
    ("blocks.2.ffn.key.weight", "model.layers.2.ffn.key.weight", "same"),
    ("blocks.2.ffn.value.weight", "model.layers.2.ffn.value.weight", "same"),
    ("ln_out.weight", "model.norm.weight", "same"),
    ("ln_out.bias", "model.norm.bias", "same"),
    ("head.weight", "lm_head.weight", "same"),
]


def randomized(model: RWKV7, seed: int = 0) -> RWKV7:
    """Every parameter random (the official init leaves zeros and repeated values a map mix-up would hide)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture
def model():
    cfg = RWKV7Config(vocab_size=96, n_embd=128, n_layer=2, head_size=64, d_decay=16, d_aaa=24, d_mv=8, d_gate=40)
    return randomized(RWKV7(cfg))


@pytest.mark.parametrize("official, expected, how", NAME_TABLE)
def test_name_map_is_the_documented_table(official, expected, how):
    assert hf.hf_name(official) == (expected, how)


@pytest.mark.parametrize("name", ["blocks.0.att.g0", "blocks.0.att.bogus", "blocks.0.ffn.receptance.weight",
                                  "blocks.0.ln1.gamma", "lm.head", "blocks.x.att.w1"])
def test_names_outside_the_layout_are_refused(name):
    with pytest.raises(KeyError):
        hf.hf_name(name)


def test_every_model_weight_maps_once_with_the_documented_shapes(model):
    sd = model.state_dict()
    out = hf.to_hf_state_dict(sd)
    assert len(out) == len(sd)  # one to one
    C, L = 128, 2
    assert out["model.layers.1.attn.w_lora.lora.0.weight"].shape == (16, C)
    assert out["model.layers.1.attn.w_lora.lora.2.weight"].shape == (C, 16)
    assert out["model.layers.0.attn.g_lora.lora.0.weight"].shape == (40, C)
    assert out["model.layers.1.attn.v_lora.lora.2.bias"].shape == (C,)
    assert out["model.layers.0.attn.k_k"].shape == (C,) and out["model.layers.0.ffn.x_k"].shape == (C,)
    assert out["model.layers.0.attn.x_r"].shape == (1, 1, C)
    assert out["model.layers.1.attn.r_k"].shape == (2, 64)
    assert not any(k.startswith("model.layers.0.attn.v_lora") for k in out)  # layer 0 has no value residual
    assert sum(k.endswith("pre_norm.weight") for k in out) == 1 and L == 2
    # values: transposed LoRA matrices, flattened vectors
    assert torch.equal(out["model.layers.1.attn.a_lora.lora.0.weight"], sd["blocks.1.att.a1"].t())
    assert torch.equal(out["model.layers.1.attn.w_lora.lora.2.bias"], sd["blocks.1.att.w0"].view(-1))


def test_config_fields(model):
    d = hf.hf_config_dict(model.config, torch.bfloat16)
    expected = {"model_type": "rwkv7", "vocab_size": 96, "hidden_size": 128, "num_hidden_layers": 2,
                "num_heads": 2, "head_dim": 64, "intermediate_size": 512, "decay_low_rank_dim": 16,
                "a_low_rank_dim": 24, "v_low_rank_dim": 8, "gate_low_rank_dim": 40, "norm_eps": 1e-5,
                "norm_bias": True, "tie_word_embeddings": False, "architectures": ["RWKV7ForCausalLM"],
                "pad_token_id": 0, "eos_token_id": 0, "bos_token_id": 1, "dtype": "bfloat16"}
    assert {k: d[k] for k in expected} == expected
    assert hf.config_from_hf(d, hf.Path("config.json")) == model.config


def test_save_and_load_are_bit_exact(model, tmp_path):
    model.save_hf(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "model.safetensors", "rwkv7_hf_entry.py"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "rwkv7_hf_entry.RWKV7ForCausalLM")
    again = RWKV7.from_hf(tmp_path / "out")
    assert again.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert RWKV7.from_pretrained(tmp_path / "out").config == model.config  # from_pretrained reads HF dirs too
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]  # no temporary left


def test_bf16_file(model, tmp_path):
    model.save_hf(tmp_path / "bf", dtype=torch.bfloat16)
    tensors = load_file(str(tmp_path / "bf" / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    again = RWKV7.from_hf(tmp_path / "bf")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v.to(torch.bfloat16).float()), k


def test_sharded_directory_loads(model, tmp_path):
    """fla-hub / large rwkv7-hf conversions: model.safetensors.index.json naming several shards."""
    d = tmp_path / "sharded"
    d.mkdir()
    sd = hf.to_hf_state_dict(model.state_dict())
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(d / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(hf.hf_config_dict(model.config)))
    again = RWKV7.from_hf(d)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_head_size_other_than_64_is_refused_and_nothing_is_written(tmp_path):
    m = RWKV7(RWKV7Config(vocab_size=64, n_embd=64, n_layer=2, head_size=32))
    with pytest.raises(ConfigError) as info:
        m.save_hf(tmp_path / "out")
    msg = str(info.value)
    assert "\n" not in msg and "head_size 32" in msg and "0.00032" in msg and "64e-5" in msg
    assert list(tmp_path.iterdir()) == []


def test_head_size_32_loads_with_a_warning(tmp_path):
    """An HF directory with head_dim 32 (rwkv7-hf's converter writes them): the weights load exactly, and
    the warning says rwkv7-hf would run its GroupNorm with another eps."""
    m = randomized(RWKV7(RWKV7Config(vocab_size=64, n_embd=64, n_layer=2, head_size=32)))
    d = tmp_path / "h32"
    d.mkdir()
    save_file(hf.to_hf_state_dict(m.state_dict()), str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(hf.hf_config_dict(m.config)))
    with pytest.warns(UserWarning, match="head_dim 32.*0.00032"):
        again = RWKV7.from_hf(d)
    for k, v in m.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_existing_output_is_refused(model, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="already exists and is not an empty directory"):
        model.save_hf(tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    model.save_hf(tmp_path / "empty")  # an empty directory is fine
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_a_failed_write_leaves_nothing(model, tmp_path, monkeypatch):
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_hf(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- broken directories


def _hf_dir(tmp_path, model, *, config_edit=None, weights_edit=None):
    d = tmp_path / "bad"
    d.mkdir()
    cfg = hf.hf_config_dict(model.config)
    sd = hf.to_hf_state_dict(model.state_dict())
    if config_edit:
        config_edit(cfg)
    if weights_edit:
        weights_edit(sd)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("edit, needles", [
    (lambda c: c.pop("hidden_size"), ["missing field 'hidden_size'"]),
    (lambda c: c.pop("v_low_rank_dim"), ["missing field 'v_low_rank_dim'"]),
    (lambda c: (c.pop("head_dim"), c.pop("num_heads")), ["missing field 'head_dim'"]),
    (lambda c: c.update(num_heads=4), ["'num_heads' (4) x 'head_dim' (64) != 'hidden_size' (128)"]),
    (lambda c: c.update(num_attention_heads=3), ["'num_attention_heads' (3) contradicts 'num_heads' (2)"]),
    (lambda c: c.update(intermediate_size=256), ["'intermediate_size' (256)"]),
    (lambda c: c.update(attention_hidden_size=64), ["'attention_hidden_size' (64)"]),
    (lambda c: c.update(norm_eps=1e-6), ["'norm_eps' (1e-06)"]),
    (lambda c: c.update(tie_word_embeddings=True), ["'tie_word_embeddings' is True"]),
    (lambda c: c.update(model_type="llama"), ["'model_type' is 'llama'"]),
    (lambda c: c.update(vocab_size="96"), ["'vocab_size' must be a positive integer"]),
])
def test_bad_config_names_the_file_and_the_field(model, tmp_path, edit, needles):
    d = _hf_dir(tmp_path, model, config_edit=edit)
    with pytest.raises(CheckpointError) as info:
        RWKV7.from_hf(d)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(d / "config.json")), msg
    for needle in needles:
        assert needle in msg, msg


@pytest.mark.parametrize("edit, needle", [
    (lambda sd: sd.pop("model.layers.1.attn.k_k"), "missing weight 'model.layers.1.attn.k_k'"),
    (lambda sd: sd.update({"model.layers.0.attn.w_lora.lora.0.weight": torch.zeros(8, 128)}),
     "'model.layers.0.attn.w_lora.lora.0.weight' has shape (8, 128), expected (16, 128)"),
    (lambda sd: sd.update({"model.layers.0.attn.extra": torch.zeros(2)}),
     "unexpected weight 'model.layers.0.attn.extra'"),
    (lambda sd: sd.update({"model.norm.bias": torch.zeros(128, dtype=torch.int32)}), "'model.norm.bias' has dtype"),
])
def test_bad_weights_name_the_file_and_the_weight(model, tmp_path, edit, needle):
    d = _hf_dir(tmp_path, model, weights_edit=edit)
    with pytest.raises(CheckpointError) as info:
        RWKV7.from_hf(d)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(d / "model.safetensors")) and needle in msg, msg


def test_unused_layer0_value_lora_is_dropped(model, tmp_path):
    """Like block 0's v0/v1/v2 in official files: present in some conversions, never used."""
    d = _hf_dir(tmp_path, model, weights_edit=lambda sd: sd.update(
        {"model.layers.0.attn.v_lora.lora.2.bias": torch.ones(128)}))
    assert RWKV7.from_hf(d).config == model.config


def test_missing_files(model, tmp_path):
    d = _hf_dir(tmp_path, model)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors .or model.safetensors.index.json."):
        RWKV7.from_hf(d)
    with pytest.raises(CheckpointError, match="config.json: missing"):
        RWKV7.from_hf(tmp_path / "nothing")
    (d / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        RWKV7.from_hf(d)


# ---------------------------------------------------------------------- the native directory, load_base


def test_native_directory_is_not_an_hf_config(model, tmp_path):
    model.save_pretrained(tmp_path / "native")
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == [
        "rwkvslice_config.json", "rwkvslice_model.safetensors"]
    meta = json.loads((tmp_path / "native" / "rwkvslice_config.json").read_text())
    assert meta["model_type"] == "rwkvslice"
    assert not hf.is_hf_dir(tmp_path / "native")


def test_directory_of_an_older_rwkvslice_still_loads(model, tmp_path):
    """rwkvslice <= 0.1 wrote config.json = {"model_type": "rwkv7", **config.to_dict()} next to the
    official-named weights; built here the way that code wrote it."""
    d = tmp_path / "old"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model_type": "rwkv7", **model.config.to_dict()}, indent=2) + "\n")
    assert not hf.is_hf_dir(d)
    again = RWKV7.from_pretrained(d)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert hf.load_base(d, RWKV7).config == model.config
    again.save_pretrained(d)  # re-saving replaces the old config file: nothing left that HF would misread
    assert sorted(p.name for p in d.iterdir()) == ["rwkvslice_config.json", "rwkvslice_model.safetensors"]


def test_checkpoint_of_an_older_rwkvslice_still_resumes(model, tmp_path):
    """A training checkpoint with the old weight/config names is still listed, resumable and loadable."""
    from rwkvslice.train import checkpoint as ck

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = ck.save_checkpoint(tmp_path, 4, model=model, optimizer=opt, trainer_state={}, run_info={})
    (path / "rwkvslice_model.safetensors").rename(path / "model.safetensors")
    (path / "rwkvslice_config.json").unlink()
    (path / "config.json").write_text(json.dumps({"model_type": "rwkv7", **model.config.to_dict()}))
    assert ck.latest_checkpoint(tmp_path) == path
    assert ck.load_trainer_files(path)[1]["step"] == 4
    assert ck.resolve_weights_dir(tmp_path.parent / tmp_path.name / path.name) == path
    assert RWKV7.from_pretrained(path).config == model.config


def test_load_base_tells_the_formats_apart(model, tmp_path):
    model.save_official(tmp_path / "base.pth")
    model.save_hf(tmp_path / "hf")
    model.save_pretrained(tmp_path / "ours")
    for path in (tmp_path / "base.pth", tmp_path / "hf", tmp_path / "ours"):
        loaded = hf.load_base(path, RWKV7)
        for k, v in model.state_dict().items():
            assert torch.equal(v, loaded.state_dict()[k]), (path, k)
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        hf.load_base(tmp_path / "neither", RWKV7)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "neither"))
    assert "no config.json (Hugging Face layout) or rwkvslice_config.json (rwkvslice)" in msg
    with pytest.raises(CheckpointError, match="no such file or directory"):
        hf.load_base(tmp_path / "absent", RWKV7)


def test_export_refuses_weights_outside_the_layout():
    with pytest.raises(ConfigError, match="'blocks.0.att.receptance.lora_A' is not a weight"):
        hf.to_hf_state_dict({"blocks.0.att.receptance.lora_A": torch.zeros(2, 2)})


def test_export_hf_command(tmp_path, capsys):
    """`rwkvslice export --hf` in-process (the subprocess runs are in tests/integration/test_interop_hf.py)."""
    from rwkvslice.cli import main

    model = randomized(RWKV7(RWKV7Config(vocab_size=320, n_embd=64, n_layer=2, head_size=64)))
    model.save_pretrained(tmp_path / "ckpt")
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--hf", str(tmp_path / "out"), "--tokenizer", "byte",
                 "--dtype", "bf16"]) == 0
    again = RWKV7.from_hf(tmp_path / "out")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v.to(torch.bfloat16).float()), k
    assert not (tmp_path / "out" / "tokenizer_config.json").exists()  # byte vocab: no HF tokenizer
    capsys.readouterr()
    assert main(["export", "--ckpt", str(tmp_path / "ckpt"), "--hf", str(tmp_path / "out"), "--tokenizer", "byte"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rwkvslice: error: --hf {tmp_path / 'out'}: already exists and is not an empty directory"]


@pytest.mark.parametrize("keep, drop", [("head_dim", "num_heads"), ("num_heads", "head_dim")])
def test_either_head_field_alone_is_enough(model, keep, drop):
    d = hf.hf_config_dict(model.config)
    del d[drop]
    assert hf.config_from_hf(d, hf.Path("config.json")) == model.config
