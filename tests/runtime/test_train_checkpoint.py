"""Atomic checkpoint directories, rotation, stale temporaries, RNG capture and metrics truncation."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.errors import CheckpointError
from rwkvslice.train import checkpoint as ck
from rwkvslice.train.metrics import MetricsLog, plot_loss, read_metrics
from rwkvslice.train.optim import build_optimizer
from rwkvslice.train.rng import capture_rng_state, restore_rng_state

pytestmark = pytest.mark.component("Checkpoints")


@pytest.fixture()
def parts():
    model = RWKV7(RWKV7Config(vocab_size=64, n_embd=32, n_layer=1, head_size=16))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return model, opt


def _save(root, step, model, opt, keep=3):
    state = {"schedule": {"last_step": step}, "loader": {"epoch": np.int64(1), "index": step},
             "rng": [capture_rng_state()]}
    return ck.save_checkpoint(root, step, model=model, optimizer=opt, trainer_state=state,
                              run_info={"tokenizer": "byte"}, keep=keep)


def test_round_trip(tmp_path, parts):
    model, opt = parts
    path = _save(tmp_path, 7, model, opt)
    assert path.name == "step-00000007"
    assert sorted(os.listdir(path)) == sorted(ck.REQUIRED_FILES)
    optim_state, trainer_state, run_info = ck.load_trainer_files(path)
    assert trainer_state["step"] == 7 and trainer_state["loader"] == {"epoch": 1, "index": 7}
    assert isinstance(trainer_state["loader"]["epoch"], int)  # numpy scalars became python ints
    assert run_info == {"tokenizer": "byte", "step": 7}
    # optimizer moments survive exactly
    for a, b in zip(opt.state_dict()["state"].values(), optim_state["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    loaded = RWKV7.from_pretrained(path)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_keeps_the_newest_k(tmp_path, parts):
    model, opt = parts
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, model, opt, keep=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [6, 8]
    assert sorted(os.listdir(tmp_path)) == ["step-00000006", "step-00000008"]  # no leftovers
    assert ck.latest_checkpoint(tmp_path).name == "step-00000008"


def test_crash_before_publish_leaves_previous_checkpoints(tmp_path, parts, monkeypatch):
    model, opt = parts
    _save(tmp_path, 3, model, opt)

    def crash(src, dst):
        raise OSError("simulated power cut")

    monkeypatch.setattr(ck.os, "rename", crash)
    with pytest.raises(OSError, match="power cut"):
        _save(tmp_path, 6, model, opt)
    monkeypatch.undo()
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3]
    assert sorted(os.listdir(tmp_path)) == ["step-00000003"]  # the temporary directory was removed


def test_incomplete_and_stale_directories_are_ignored_and_cleaned(tmp_path, parts):
    model, opt = parts
    _save(tmp_path, 3, model, opt)
    # what a SIGKILL mid-write or mid-delete can leave behind
    (tmp_path / ".tmp-step-00000006-123").mkdir()
    (tmp_path / ".tmp-step-00000006-123" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".trash-step-00000001-99").mkdir()
    half = tmp_path / "step-00000009"  # a step directory missing files is not a checkpoint
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"x")
    assert ck.latest_checkpoint(tmp_path).name == "step-00000003"
    ck.clean_stale(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["step-00000003", "step-00000009"]


def test_corrupt_checkpoint_is_a_checkpoint_error(tmp_path, parts):
    model, opt = parts
    path = _save(tmp_path, 3, model, opt)
    (path / "trainer_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="trainer_state|cannot read"):
        ck.load_trainer_files(path)
    (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="missing optimizer.pt"):
        ck.load_trainer_files(path)


def test_resolve_weights_dir(tmp_path, parts):
    model, opt = parts
    run = tmp_path / "run"
    _save(run / "checkpoints", 3, model, opt)
    _save(run / "checkpoints", 5, model, opt)
    assert ck.resolve_weights_dir(run).name == "step-00000005"
    assert ck.resolve_weights_dir(run / "checkpoints" / "step-00000003").name == "step-00000003"
    with pytest.raises(CheckpointError, match="no such"):
        ck.resolve_weights_dir(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no model here"):
        ck.resolve_weights_dir(tmp_path)


def test_atomic_write_replaces_whole_file(tmp_path, monkeypatch):
    target = tmp_path / "eval.json"
    ck.atomic_write_text(target, "old\n")

    def crash(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(ck.os, "replace", crash)
    with pytest.raises(OSError):
        ck.atomic_write_text(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["eval.json"]


def test_rng_round_trip_survives_torch_save(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
    assert got == expected


def test_metrics_truncated_to_checkpoint_and_torn_line_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 8)]
    path.write_text("\n".join(lines) + '\n{"step": 8, "lo')  # killed while writing step 8
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 8))
    log = MetricsLog(path)
    log.start(keep_up_to=5)
    log.write({"step": 6, "loss": 0.5})
    log.close()
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["loss"] == 0.5 and records[2]["loss"] == 1.0 / 3
    assert path.read_text().endswith("\n")


def test_plot_loss(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional; the plot is skipped without it")
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in range(1, 5)))
    note = plot_loss(path, tmp_path / "loss.png")
    assert note.startswith("wrote")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------- found by mutation testing (mutmut)


def test_default_keep_is_three_and_keep_one_keeps_only_the_newest(tmp_path, parts):
    """save_checkpoint without keep= keeps the newest 3; keep=1 keeps exactly the newest one."""
    model, opt = parts
    state = {"schedule": {}, "loader": {}, "rng": []}
    for step in (1, 2, 3, 4, 5):
        ck.save_checkpoint(tmp_path / "a", step, model=model, optimizer=opt, trainer_state=state, run_info={})
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "a")] == [3, 4, 5]
    for step in (1, 2, 3):
        _save(tmp_path / "b", step, model, opt, keep=1)
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "b")] == [3]


def test_run_json_is_indented_and_stringifies_other_values(tmp_path, parts):
    """run.json is human-readable (one key per line, 2-space indent) and values JSON cannot hold (a Path)
    are written as their str()."""
    model, opt = parts
    path = ck.save_checkpoint(tmp_path, 4, model=model, optimizer=opt, trainer_state={},
                              run_info={"data": tmp_path / "train.bin"})
    text = (path / "run.json").read_text()
    assert text == '{\n  "data": "' + str(tmp_path / "train.bin") + '",\n  "step": 4\n}\n'


def _undeletable_rmtree(path, ignore_errors=False, onerror=None, **kwargs):
    """shutil.rmtree on a file system where nothing can be deleted (root cannot simulate that with
    permissions): an error unless ignore_errors, and nothing removed either way."""
    if not ignore_errors:
        raise PermissionError(f"simulated: cannot delete {path}")


def test_failed_deletes_never_fail_training(tmp_path, parts, monkeypatch):
    """Deleting old checkpoints, stale temporaries or a failed save's temporary directory may fail: the
    save still succeeds (the old checkpoint is already renamed out of the listing), clean_stale does not
    raise, and a failing save re-raises its own error, not the cleanup's."""
    model, opt = parts
    _save(tmp_path, 1, model, opt, keep=1)
    monkeypatch.setattr(ck.shutil, "rmtree", _undeletable_rmtree)
    _save(tmp_path, 2, model, opt, keep=1)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2]
    assert any(p.name.startswith(".trash-step-00000001") for p in tmp_path.iterdir())
    ck.clean_stale(tmp_path)

    def crash(*args):
        raise OSError("simulated power cut")

    monkeypatch.setattr(ck.os, "rename", crash)
    with pytest.raises(OSError, match="power cut"):
        _save(tmp_path, 3, model, opt, keep=1)


def test_load_refuses_pickled_objects_and_names_the_error(tmp_path, parts):
    """optimizer.pt / trainer_state.pt are loaded with weights_only=True: a file holding an arbitrary
    pickled object (here a fractions.Fraction) is a one-line CheckpointError naming the file, saying it holds
    arbitrary Python objects (and which), and never passing on torch's advice to load with weights_only=False."""
    import fractions

    model, opt = parts
    for name in ("optimizer.pt", "trainer_state.pt"):
        path = _save(tmp_path / name, 3, model, opt)
        torch.save({"state": {}, "evil": fractions.Fraction(1, 3)}, path / name)
        with pytest.raises(CheckpointError) as info:
            ck.load_trainer_files(path)
        msg = str(info.value)
        assert msg.startswith(f"{path / name}: refusing to load: it holds arbitrary Python objects "
                              "(fractions.Fraction)"), msg
        assert "\n" not in msg and "weights_only=False" not in msg and "trust" not in msg, msg


def test_load_trainer_files_uses_map_location_for_the_optimizer(tmp_path, parts):
    """map_location is applied to the optimizer state (moments go to the training device on resume)."""
    model, opt = parts
    path = _save(tmp_path, 3, model, opt)
    seen = []

    def record(storage, location):
        seen.append(location)
        return storage

    optim_state, _, _ = ck.load_trainer_files(path, map_location=record)
    assert seen and set(seen) == {"cpu"}
    assert len(optim_state["state"]) == len(opt.state_dict()["state"])
