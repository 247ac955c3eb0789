"""Checkpoint writing edge cases: numpy arrays in the trainer state, plain nn.Modules, re-saving a step,
a stale temporary of this very process, keep < 1, and run.json reading."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rwkvslice.errors import CheckpointError
from rwkvslice.train import checkpoint as ck

pytestmark = pytest.mark.component("Checkpoints")


@pytest.fixture()
def plain():
    """A plain nn.Module (no save_pretrained) and a stepped optimizer."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model, opt


def _save(root, step, model, opt, state=None, keep=3):
    return ck.save_checkpoint(root, step, model=model, optimizer=opt, trainer_state=state or {},
                              run_info={"tokenizer": "byte"}, keep=keep)


def test_to_plain_turns_numpy_into_weights_only_types():
    arr = np.arange(6, dtype=np.int64).reshape(2, 3)
    out = ck.to_plain({"a": [np.int32(3), (np.float64(0.5), arr)], "b": "x"})
    assert out["a"][0] == 3 and type(out["a"][0]) is int
    assert out["a"][1][0] == 0.5 and type(out["a"][1][0]) is float
    assert isinstance(out["a"][1], tuple) and isinstance(out["a"], list)  # container types are kept
    t = out["a"][1][1]
    assert isinstance(t, torch.Tensor) and t.tolist() == [[0, 1, 2], [3, 4, 5]]
    arr[0, 0] = 99  # a copy: the checkpoint does not alias the live loader state
    assert t[0, 0].item() == 0


def test_numpy_array_in_trainer_state_survives_a_weights_only_load(tmp_path, plain):
    model, opt = plain
    order = np.array([4, 1, 3, 0, 2], dtype=np.int64)
    path = _save(tmp_path, 1, model, opt, state={"loader": {"order": order}})
    _, trainer_state, _ = ck.load_trainer_files(path)  # torch.load(weights_only=True) inside
    assert trainer_state["loader"]["order"].tolist() == [4, 1, 3, 0, 2]


def test_plain_module_checkpoint_holds_its_weights(tmp_path, plain):
    model, opt = plain
    path = _save(tmp_path, 3, model, opt)
    assert sorted(os.listdir(path)) == sorted(ck.REQUIRED_FILES)
    weights = load_file(str(path / ck.WEIGHTS_FILE))
    assert weights.keys() == {"weight", "bias"}
    assert torch.equal(weights["weight"], model.weight.detach())
    assert json.loads((path / "rwkvslice_config.json").read_text()) == {}


def test_resaving_a_step_replaces_it_whole(tmp_path, plain):
    model, opt = plain
    _save(tmp_path, 5, model, opt, state={"marker": 1})
    with torch.no_grad():
        model.weight.fill_(2.5)
    path = _save(tmp_path, 5, model, opt, state={"marker": 2})
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [5]
    assert ck.load_trainer_files(path)[1]["marker"] == 2
    assert torch.equal(load_file(str(path / ck.WEIGHTS_FILE))["weight"], torch.full((2, 3), 2.5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005"]  # no .trash-* left behind


def test_stale_temporary_of_this_process_is_replaced(tmp_path, plain):
    model, opt = plain
    stale = tmp_path / f".tmp-step-00000004-{os.getpid()}"
    stale.mkdir()
    (stale / "junk.bin").write_bytes(b"half-written")
    path = _save(tmp_path, 4, model, opt)
    assert sorted(os.listdir(path)) == sorted(ck.REQUIRED_FILES)  # the junk did not get published
    assert not stale.exists()


def test_keep_below_one_keeps_every_checkpoint(tmp_path, plain):
    model, opt = plain
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, keep=0)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1, 2, 3, 4]


def test_read_run_info(tmp_path):
    assert ck.read_run_info(tmp_path) == {}  # no run.json (e.g. a save_pretrained directory)
    (tmp_path / "run.json").write_text('{"tokenizer": "world", "args": {"ctx_len": 64}}')
    assert ck.read_run_info(tmp_path) == {"tokenizer": "world", "args": {"ctx_len": 64}}
    (tmp_path / "run.json").write_text('{"tokenizer": ')
    with pytest.raises(CheckpointError) as info:
        ck.read_run_info(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'run.json'}: invalid JSON")
