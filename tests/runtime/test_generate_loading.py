"""load_model: which tokenizer an inference command uses (flag, run.json, else the vocab size), and the
errors when it cannot tell or the tokenizer does not fit the model."""

from __future__ import annotations

import json

import pytest
import torch

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.data import ByteTokenizer, WorldTokenizer
from rwkvslice.errors import ConfigError
from rwkvslice.generate.loading import guess_tokenizer_name, load_model

pytestmark = pytest.mark.component("Generation")


def _saved(tmp_path, vocab_size, name="m"):
    model = RWKV7(RWKV7Config(vocab_size=vocab_size, n_embd=32, n_layer=1, head_size=16))
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def test_guess_by_vocab_size():
    assert guess_tokenizer_name(320) == "byte" == ByteTokenizer.name
    assert guess_tokenizer_name(65536) == "world" == WorldTokenizer.name
    assert guess_tokenizer_name(321) is None
    assert guess_tokenizer_name(64) is None


def test_tokenizer_from_the_vocab_size_without_run_json(tmp_path):
    model, path = _saved(tmp_path, 320)
    loaded, tok, weights, run_info = load_model(path)
    assert tok.name == "byte" and weights == path and run_info == {}
    assert not loaded.training
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_run_json_wins_over_the_guess_and_the_flag_over_both(tmp_path):
    _, path = _saved(tmp_path, 65536)  # the guess would be "world" (not loaded here: it needs `rwkv`)
    (path / "run.json").write_text(json.dumps({"tokenizer": "byte", "args": {"seed": 3}}))
    _, tok, _, run_info = load_model(path)
    assert tok.name == "byte" and run_info == {"tokenizer": "byte", "args": {"seed": 3}}
    (path / "run.json").write_text(json.dumps({"tokenizer": "world"}))
    assert load_model(path, tokenizer="byte")[1].name == "byte"


def test_unknown_vocab_without_a_tokenizer_is_a_config_error(tmp_path):
    _, path = _saved(tmp_path, 64)
    with pytest.raises(ConfigError) as info:
        load_model(path)
    assert str(info.value) == (f"--ckpt {path}: cannot tell which tokenizer the model (vocab 64) uses; "
                               "pass --tokenizer byte|world")


def test_tokenizer_larger_than_the_model_vocab_is_a_config_error(tmp_path):
    _, path = _saved(tmp_path, 64)
    (path / "run.json").write_text(json.dumps({"tokenizer": "byte"}))
    with pytest.raises(ConfigError) as info:
        load_model(path)
    assert str(info.value) == "--tokenizer byte: its vocab (320) is larger than the model's (64)"
    with pytest.raises(ConfigError, match=r"^--tokenizer byte: its vocab \(320\)"):
        load_model(path, tokenizer="byte")


def test_a_model_vocab_larger_than_the_tokenizer_is_fine(tmp_path):
    _, path = _saved(tmp_path, 384)  # e.g. a vocab padded to a multiple of 128
    _, tok, _, _ = load_model(path, tokenizer="byte")
    assert tok.vocab_size == 320
