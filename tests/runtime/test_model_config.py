"""RWKV7Config from JSON: every way a config file can be wrong is one ConfigError naming the file."""

from __future__ import annotations

import json

import pytest

from rwkvslice import RWKV7Config
from rwkvslice.errors import ConfigError

pytestmark = pytest.mark.component("Architecture")


def test_from_json_round_trip_fills_the_lora_ranks(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"vocab_size": 320, "n_embd": 256, "n_layer": 2}))
    cfg = RWKV7Config.from_json(path)
    assert (cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.head_size) == (320, 256, 2, 64)
    # max(32, round(f * sqrt(256) / 32) * 32) with f = 2.5, 2.5, 1.7, 5.0: f * 16 / 32 = 1.25, 1.25, 0.85,
    # 2.5 -> 32, 32, 32, 64 (Python's round is half-to-even, as in the official trainer: round(2.5) == 2)
    assert cfg.lora_ranks == (32, 32, 32, 64)
    path.write_text(json.dumps(cfg.to_dict()))
    assert RWKV7Config.from_json(str(path)) == cfg


@pytest.mark.parametrize("payload, message", [
    ([1, 2], "RWKV7Config: expected a JSON object, got list"),
    ({"vocab_size": 320, "n_layer": 2}, "RWKV7Config: missing field(s) n_embd"),
    ({"head_size": 64}, "RWKV7Config: missing field(s) vocab_size, n_embd, n_layer"),
    ({"vocab_size": 320, "n_embd": 100, "n_layer": 2}, "RWKV7Config: n_embd (100) must be a multiple of "
                                                       "head_size (64)"),
])
def test_from_dict_errors(payload, message):
    with pytest.raises(ConfigError) as info:
        RWKV7Config.from_dict(payload)
    assert str(info.value) == message


def test_from_json_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as info:
        RWKV7Config.from_json(missing)
    assert str(info.value) == f"{missing}: no such config file"

    broken = tmp_path / "broken.json"
    broken.write_text('{"vocab_size": 320,')
    with pytest.raises(ConfigError) as info:
        RWKV7Config.from_json(broken)
    assert str(info.value).startswith(f"{broken}: not a JSON config: ") and "\n" not in str(info.value)

    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe{")
    with pytest.raises(ConfigError, match="not a JSON config"):
        RWKV7Config.from_json(binary)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vocab_size": 320, "n_embd": 64, "n_layer": 0}))
    with pytest.raises(ConfigError) as info:
        RWKV7Config.from_json(bad)
    assert str(info.value) == f"{bad}: RWKV7Config: n_layer must be a positive integer, got 0"
