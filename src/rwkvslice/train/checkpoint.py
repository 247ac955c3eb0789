"""Atomic training checkpoints: a checkpoint directory appears complete or not at all.

Layout of OUT/checkpoints/step-00000120/:
    rwkvslice_model.safetensors, rwkvslice_config.json   weights and model config (`RWKV7.save_pretrained`;
                                     rwkvslice <= 0.1 wrote model.safetensors + config.json, still read)
    optimizer.pt                     optimizer.state_dict()
    trainer_state.pt                 step, schedule, RNG states of every rank, data-loader position
    run.json                         human-readable: step, tokenizer, training arguments
A sharded run (`--shard fsdp`, train/sharding.py) writes dcp/ (torch.distributed.checkpoint: the model
and optimizer shards of every rank) and rwkvslice_config.json instead of the weights + optimizer.pt.

Writing: everything goes into a hidden temporary directory next to the final one, every file and the
directory are fsync'ed, then one `os.rename` publishes it and the parent directory is fsync'ed. A process
killed at any moment leaves either the previous set of checkpoints or the new one, plus at most a stale
`.tmp-*`/`.trash-*` directory that is ignored and cleaned up on the next start. Old checkpoints are
first renamed to `.trash-*` (atomic) and only then deleted, so a half-deleted directory never looks like
a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from rwkvslice.errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d+)$")
WEIGHTS_FILE = "rwkvslice_model.safetensors"
WEIGHT_FILES = (WEIGHTS_FILE, "rwkvslice_config.json")
REQUIRED_FILES = (*WEIGHT_FILES, "optimizer.pt", "trainer_state.pt", "run.json")
# A LoRA / state run (rwkvslice.peft) writes only its trainable tensors and the base's identity instead
# of the weights: peft.safetensors + peft.json (+ the model config).
TUNED_REQUIRED_FILES = ("peft.safetensors", "peft.json", "rwkvslice_config.json", "optimizer.pt",
                        "trainer_state.pt", "run.json")
# A sharded run (--shard fsdp, train/sharding.py): the ranks' DCP shards instead of the weights and optimizer.
SHARDED_REQUIRED_FILES = ("dcp/.metadata", "rwkvslice_config.json", "trainer_state.pt", "run.json")
# the names of rwkvslice <= 0.1 checkpoints (HF directories use them too), read as well
OLD_NAMES = {WEIGHTS_FILE: "model.safetensors", "rwkvslice_config.json": "config.json"}


def _first_missing(path: Path, files) -> str | None:
    """The first of `files` not in `path`, where an older checkpoint's name stands in for ours."""
    for f in files:
        if not (path / f).is_file() and not (f in OLD_NAMES and (path / OLD_NAMES[f]).is_file()):
            return f
    return None


def is_complete(path: Path) -> bool:
    """Does `path` hold a whole checkpoint (full weights, a tuned run's trainable tensors, or shards)?"""
    return any(_first_missing(path, files) is None
               for files in (REQUIRED_FILES, TUNED_REQUIRED_FILES, SHARDED_REQUIRED_FILES))


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories make a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory, fsync and os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_path(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def to_plain(obj):
    """Turn numpy scalars/arrays (e.g. in a loader state) into types `torch.load(weights_only=True)` accepts."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    return obj


def _write_weights(model, directory: Path, trainable: dict | None = None) -> None:
    spec = getattr(model, "peft_spec", None)
    if spec is not None and spec.kind != "full":
        from rwkvslice.peft.tuning import save_tuned

        save_tuned(model, directory, model.peft_base, trainable)
    elif hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
    else:  # a plain nn.Module (tests): weights only
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                  str(directory / WEIGHTS_FILE))
        (directory / "rwkvslice_config.json").write_text("{}\n")


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    run_info: dict,
    keep: int = 3,
    protect: tuple[str, ...] = (),
    sharded_state: Path | None = None,
    tuned_state: tuple[dict, dict] | None = None,
) -> Path:
    """Write OUT/checkpoints/step-XXXXXXXX atomically, then delete all but the newest `keep`.

    `model` is the unwrapped model (not the DDP wrapper); `protect` names checkpoint directories that
    are never rotated away (the --keep-best one). Returns the final directory.
    `sharded_state`: a directory of DCP shards every rank wrote (sharding.save_shards); it is moved in as
    dcp/ in place of the weights and optimizer.pt, and only the model config is written from `model`.
    `tuned_state`: (trainable tensors, optimizer state) of a sharded tuned run, gathered whole
    (sharding.gather_trainable); written as a non-sharded tuned run's files.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        if sharded_state is not None:
            os.rename(sharded_state, tmp / "dcp")
            from rwkvslice.model.official import NATIVE_CONFIG_FILE, NATIVE_MODEL_TYPE

            config = {"model_type": NATIVE_MODEL_TYPE, **model.config.to_dict()}
            (tmp / NATIVE_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        else:
            trainable, optim_state = tuned_state if tuned_state is not None else (None, optimizer.state_dict())
            _write_weights(model, tmp, trainable)
            torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(to_plain(dict(trainer_state, step=step)), tmp / "trainer_state.pt")
        (tmp / "run.json").write_text(json.dumps(dict(run_info, step=step), indent=2, default=str) + "\n")
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        if final.exists():  # re-saving the same step (e.g. the final save of a resumed run)
            _trash(final)
        os.rename(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rotate_checkpoints(root, keep, protect)
    return final


def _trash(path: Path) -> None:
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def rotate_checkpoints(root: str | os.PathLike, keep: int, protect: tuple[str, ...] = ()) -> None:
    if keep < 1:
        return
    for _, path in list_checkpoints(root)[:-keep]:
        if path.name not in protect:
            _trash(path)


def clean_stale(root: str | os.PathLike) -> None:
    """Remove temporaries left by a process killed while writing or deleting a checkpoint."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)


def load_trainer_files(ckpt: str | os.PathLike, map_location="cpu") -> tuple[dict | None, dict, dict]:
    """(optimizer_state, trainer_state, run_info) of a checkpoint; CheckpointError if unreadable.

    A sharded checkpoint has no optimizer.pt (its optimizer state is in dcp/): optimizer_state is None.
    """
    ckpt = Path(ckpt)
    sharded = _first_missing(ckpt, SHARDED_REQUIRED_FILES) is None
    files = (SHARDED_REQUIRED_FILES if sharded else TUNED_REQUIRED_FILES if (ckpt / "peft.json").is_file()
             else REQUIRED_FILES)
    missing = _first_missing(ckpt, files)
    if missing:
        raise CheckpointError(f"{ckpt}: not a training checkpoint (missing {missing})")
    from rwkvslice.model.official import torch_load_weights_only

    try:
        optim_state = None if sharded else torch_load_weights_only(ckpt / "optimizer.pt", map_location=map_location)
        trainer_state = torch_load_weights_only(ckpt / "trainer_state.pt", map_location="cpu")
        run_info = json.loads((ckpt / "run.json").read_text())
    except CheckpointError:  # a refused pickle: the message names the file already
        raise
    except Exception as exc:  # torch/pickle/json raise many types for a corrupt file
        raise CheckpointError(f"{ckpt}: cannot read checkpoint: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    return optim_state, trainer_state, run_info


def resolve_weights_dir(path: str | os.PathLike) -> Path:
    """Accept a checkpoint directory, a run directory (its newest checkpoint) or a save_pretrained dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (_first_missing(path, WEIGHT_FILES) is None or (path / "peft.json").is_file()
            or (path / "dcp" / ".metadata").is_file()):  # ours, older, HF, tuned, or sharded (sharding.py reads it)
        return path
    latest = latest_checkpoint(path / "checkpoints")
    if latest is not None:
        return latest
    raise CheckpointError(f"{path}: no model here ({WEIGHTS_FILE} + rwkvslice_config.json, or model.safetensors "
                          "+ config.json) and no checkpoints/step-* inside")


def read_run_info(weights_dir: str | os.PathLike) -> dict:
    """run.json next to the weights (tokenizer name, training arguments), or {} if absent."""
    p = Path(weights_dir) / "run.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{p}: invalid JSON: {exc}") from exc
