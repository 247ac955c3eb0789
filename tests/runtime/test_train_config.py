"""TrainConfig validation and model construction, in-process and without training (tests/integration/
test_train_loop.py checks that `train` stops on these before creating the run directory)."""

from __future__ import annotations

import json

import pytest

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.data import ByteTokenizer
from rwkvslice.errors import ConfigError
from rwkvslice.train.trainer import TrainConfig, build_model, build_model_config, validate

pytestmark = pytest.mark.component("Training Loop")


def cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{"out": str(tmp_path / "run"), "data": "d.txt", **kw})


def error(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("kw, message", [
    ({"keep": 0}, "--keep must be >= 1, got 0"),
    ({"grad_accum": -2}, "--grad-accum must be >= 1, got -2"),
    ({"ctx_len": 1}, "--ctx-len must be >= 2, got 1"),
    ({"save_every": -1}, "--save-every must be >= 0 (0 = only at the end), got -1"),
    ({"lr": 0.0}, "--lr must be a positive number, got 0.0"),
    ({"lr": float("inf")}, "--lr must be a positive number, got inf"),
    ({"lr": float("nan")}, "--lr must be a positive number, got nan"),
    ({"lr": 1e-3, "min_lr": -1e-4}, "--min-lr must be between 0 and --lr (0.001), got -0.0001"),
    ({"warmup_steps": -1}, "--warmup-steps must be >= 0, got -1"),
    ({"grad_clip": -0.5}, "--grad-clip must be >= 0 (0 = off), got -0.5"),
    ({"num_workers": -1}, "--num-workers must be >= 0, got -1"),
    ({"data": None}, "no training data: pass --data PATH (or --demo)"),
])
def test_validate_names_the_flag(tmp_path, kw, message):
    assert error(validate, cfg(tmp_path, **kw)) == message


def test_validate_accepts_the_edges(tmp_path):
    # the boundary values themselves are valid: validate() would raise ConfigError on any of them
    edges = cfg(tmp_path, ctx_len=2, save_every=0, min_lr=0.0, warmup_steps=0, grad_clip=0.0, num_workers=0,
                grad_checkpoint_len=1)
    assert validate(edges) is None
    assert validate(cfg(tmp_path, lr=1e-3, min_lr=1e-3)) is None  # min_lr == lr: a constant schedule


def test_defaults_of_min_lr_and_warmup(tmp_path):
    c = cfg(tmp_path, lr=2e-3, steps=50)
    assert c.resolved_min_lr() == pytest.approx(2e-4) and c.resolved_warmup() == 5
    assert cfg(tmp_path, steps=5000).resolved_warmup() == 100  # capped at 100


def test_model_config_from_a_json_file_fills_the_vocab(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"model_type": "rwkv7", "n_embd": 64, "n_layer": 1, "head_size": 32}))
    c = build_model_config(cfg(tmp_path, model=str(path)), 320)
    assert (c.vocab_size, c.n_embd, c.n_layer, c.head_size) == (320, 64, 1, 32)
    path.write_text(json.dumps({"vocab_size": 512, "n_embd": 64, "n_layer": 1, "head_size": 32}))
    assert build_model_config(cfg(tmp_path, model=str(path)), 320).vocab_size == 512  # the file wins


def test_model_config_errors_name_the_flag(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("[64, 1]")
    assert error(build_model_config, cfg(tmp_path, model=str(path)), 320) == (
        f"--model {path}: RWKV7Config: expected a JSON object, got list")
    path.write_text(json.dumps({"n_embd": 64, "n_layer": 1, "head_size": 48}))
    assert error(build_model_config, cfg(tmp_path, model=str(path)), 320) == (
        f"--model {path}: RWKV7Config: n_embd (64) must be a multiple of head_size (48)")
    assert error(build_model_config, cfg(tmp_path, model=str(tmp_path / "none.json")), 320) == (
        f"--model {tmp_path / 'none.json'}: no such config file")
    assert error(build_model_config, cfg(tmp_path, model="huge"), 320).startswith(
        "--model: unknown model preset 'huge'; choose one of demo, tiny")


def test_model_config_file_that_is_not_json(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"n_embd": 64,')
    assert error(build_model_config, cfg(tmp_path, model=str(path)), 320) == (
        f"--model {path}: not valid JSON (line 1, column 15: Expecting property name enclosed in double quotes)")


def test_init_from_must_exist(tmp_path):
    assert error(build_model, cfg(tmp_path, init_from=str(tmp_path / "base.pth")), ByteTokenizer()) == (
        f"--init-from {tmp_path / 'base.pth'}: no such file")


def test_a_model_vocab_smaller_than_the_tokenizer_is_refused(tmp_path):
    RWKV7(RWKV7Config(vocab_size=256, n_embd=32, n_layer=1, head_size=16)).save_official(tmp_path / "b.pth")
    assert error(build_model, cfg(tmp_path, init_from=str(tmp_path / "b.pth")), ByteTokenizer()) == (
        "the model's vocab_size 256 is smaller than the byte tokenizer's 320; use --tokenizer world?")
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"vocab_size": 100, "n_embd": 32, "n_layer": 1, "head_size": 16}))
    assert "vocab_size 100 is smaller" in error(build_model, cfg(tmp_path, model=str(path)), ByteTokenizer())


def test_resume_refuses_a_changed_argument_or_world_size(tmp_path):
    from rwkvslice.train.trainer import _args_dict, _check_resume_args

    c = cfg(tmp_path, lr=1e-3, steps=10)
    saved = {"args": {**_args_dict(c), "steps": 5, "keep": 1, "retired_flag": 1}, "world_size": 1}
    _check_resume_args(c, saved, tmp_path / "ck", 1)  # steps/keep may change; unknown old keys are ignored
    assert error(_check_resume_args, cfg(tmp_path, lr=1e-3, steps=10, seed=4), saved, tmp_path / "ck", 1) == (
        f"--resume: --seed is 4 but {tmp_path / 'ck'} was trained with 0; resume with the same arguments")
    assert error(_check_resume_args, c, {**saved, "world_size": 2}, tmp_path / "ck", 1) == (
        f"--resume: {tmp_path / 'ck'} was written by 2 process(es), this run has 1; the data order would differ")
    # a checkpoint without world_size counts as one process
    assert "this run has 2; the data order would differ" in error(_check_resume_args, c, {"args": {}},
                                                                  tmp_path / "ck", 2)


def test_progress_bar_and_plain_messages(capsys):
    from rwkvslice.train.trainer import _Progress

    plain = _Progress(enabled=False, total=5, initial=0)
    plain.update(1.0, 10.0, 0.5, 1e-3)  # no bar: nothing to draw
    plain.write("saved step 1")
    plain.close()
    assert capsys.readouterr().err == "saved step 1\n"

    bar = _Progress(enabled=True, total=5, initial=2)
    bar.update(1.23456, 12345.6, 0.25, 1e-3)
    assert bar.bar.n == 3 and bar.bar.total == 5
    assert bar.bar.postfix == "loss 1.2346 | 12,346 tok/s | kept 25% | lr 1.00e-03"
    bar.write("saved step 3")
    bar.close()
    err = capsys.readouterr().err
    assert "saved step 3\n" in err and "3/5" in err
