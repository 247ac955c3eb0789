"""Checkpoint interop: the official x070 `.pth` layout, and our own safetensors directory
(rwkvslice_model.safetensors with the official names + rwkvslice_config.json). The HF layout is in hf.py.

Official layout (RWKV-LM `torch.save(state_dict)`, loaded by the `rwkv` pip package):
  emb.weight [V,C]; blocks.0.ln0.*; blocks.i.{ln1,ln2}.*; blocks.i.att.{x_r..x_g,w0,a0,v0,k_k,k_a} [1,1,C];
  blocks.i.att.{w1,a1,v1,g1} [C,D], {w2,a2,v2,g2} [D,C]; blocks.i.att.r_k [H,N];
  blocks.i.att.{receptance,key,value,output}.weight [C,C]; blocks.i.att.ln_x.*; blocks.i.ffn.x_k [1,1,C];
  blocks.i.ffn.key.weight [4C,C]; blocks.i.ffn.value.weight [C,4C]; ln_out.*; head.weight [V,C].
Our module names are the official ones, so a state dict maps one to one. Block 0's v0/v1/v2 are created
but never used by the official trainer; some released files have them and some don't: we accept both and
do not write them (the `rwkv` package ignores them too).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch

from rwkvslice.errors import CheckpointError
from rwkvslice.model.config import RWKV7Config
from rwkvslice.model.hf import is_hf_dir, load_hf

_IGNORED_KEYS = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
# Our directory (save_pretrained): its own config file name and model_type, see save_pretrained.
NATIVE_CONFIG_FILE = "rwkvslice_config.json"
NATIVE_WEIGHTS_FILE = "rwkvslice_model.safetensors"
NATIVE_MODEL_TYPE = "rwkvslice"
# rwkvslice <= 0.1 wrote these names (the Hugging Face ones, with our field names and official weight names)
OLD_CONFIG_FILE, OLD_WEIGHTS_FILE = "config.json", "model.safetensors"
_PREFIXES = ("_forward_module.", "module.")  # DeepSpeed / DDP wrappers


def torch_load_weights_only(path, map_location="cpu"):
    """`torch.load(path, weights_only=True)`; a pickle that holds more than tensors and plain containers is
    a one-line CheckpointError naming the file and the objects, not torch's advice on how to load it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(exc))))
        which = f" ({', '.join(names)})" if names else ""
        raise CheckpointError(
            f"{path}: refusing to load: it holds arbitrary Python objects{which}, not only tensors, and "
            "unpickling them could run any code; rwkvslice reads torch files with weights_only=True"
        ) from None


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch_load_weights_only(path)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or not a torch file): {first}") from None
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: not a state dict of tensors (got {type(obj).__name__})")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: not a state dict of tensors (entry {key!r} is a {type(value).__name__})"
            )
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _shape(sd: dict, key: str, path: Path) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"{path}: missing key '{key}'")
    return tuple(sd[key].shape)


def config_from_state_dict(sd: dict, path: Path) -> RWKV7Config:
    """Infer the config from tensor shapes: vocab, width, depth, head size and every LoRA rank."""
    V, C = _shape(sd, "emb.weight", path)
    r_k = _shape(sd, "blocks.0.att.r_k", path)
    if len(r_k) != 2:
        raise CheckpointError(f"{path}: 'blocks.0.att.r_k' has shape {r_k}, expected (n_head, head_size)")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    n_layer = max(layers) + 1
    missing_layers = sorted(set(range(n_layer)) - layers)
    if missing_layers:
        raise CheckpointError(f"{path}: missing every key of block {missing_layers[0]}")

    def rank(name: str) -> int:
        for i in [*range(1, n_layer), 0]:  # block 0's v1 is unused (and may be absent): read it last
            key = f"blocks.{i}.att.{name}"
            if key in sd:
                return int(sd[key].shape[-1])
        return None  # type: ignore[return-value]

    try:
        return RWKV7Config(
            vocab_size=int(V), n_embd=int(C), n_layer=n_layer, head_size=int(r_k[1]),
            d_decay=rank("w1"), d_aaa=rank("a1"), d_mv=rank("v1"), d_gate=rank("g1"),
        )
    except Exception as exc:
        raise CheckpointError(f"{path}: inconsistent shapes: {exc}") from None


def load_official(path, cls):
    path = Path(path)
    sd = _read_state_dict(path)
    config = config_from_state_dict(sd, path)
    model = cls(config)
    expected = model.state_dict()
    for key in _IGNORED_KEYS:
        sd.pop(key, None)
    missing = [k for k in expected if k not in sd]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing key '{missing[0]}'{more}")
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected key '{unexpected[0]}' (not an x070 checkpoint, or an unsupported variant)"
        )
    converted = {}
    for key, ref in expected.items():
        t = sd[key]
        if tuple(t.shape) != tuple(ref.shape):
            # the `rwkv` package squeezes (1,1,C) vectors; accept those, nothing else
            if t.numel() == ref.numel() and t.squeeze().shape == ref.squeeze().shape:
                t = t.reshape(ref.shape)
            else:
                raise CheckpointError(
                    f"{path}: '{key}' has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
                )
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: '{key}' has dtype {t.dtype}, expected a floating-point tensor")
        converted[key] = t.to(torch.float32)
    model.load_state_dict(converted, strict=True)
    return model


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_official(model, path, dtype=torch.float32) -> None:
    path = Path(path)
    # a tuned initial state (rwkvslice.peft) is not part of the official weights layout: it has its own
    # file (RWKV-PEFT's blocks.{i}.att.time_state, `rwkvslice export --state`)
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
          if k != "initial_state"}
    _atomic_write(path, lambda tmp: torch.save(sd, tmp))


def save_pretrained(model, directory) -> None:
    """Our own directory: rwkvslice_model.safetensors (official names) + rwkvslice_config.json.

    Both files have names of their own (and the config a model_type of its own, "rwkvslice"), so Hugging
    Face loaders refuse the directory: transformers finds no config.json, which rwkv7-hf's classes would
    silently replace by a default config, and no model.safetensors, which it requires. rwkvslice <= 0.1
    wrote config.json ("model_type": "rwkv7", our fields) + model.safetensors; load_pretrained reads that."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _atomic_write(directory / NATIVE_WEIGHTS_FILE, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    text = json.dumps({"model_type": NATIVE_MODEL_TYPE, **model.config.to_dict()}, indent=2) + "\n"
    _atomic_write(directory / NATIVE_CONFIG_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    # Files of an older rwkvslice (or anyone's HF files) here no longer describe the weights just written.
    for old in (OLD_CONFIG_FILE, OLD_WEIGHTS_FILE):
        (directory / old).unlink(missing_ok=True)


def load_pretrained(directory, cls, map_location="cpu"):
    """An RWKV7 from our directory (either config file name) or from an HF-layout one (model/hf.py)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / NATIVE_CONFIG_FILE, directory / NATIVE_WEIGHTS_FILE
    if not config_path.is_file():
        if is_hf_dir(directory):
            return load_hf(directory, cls, map_location=map_location)
        if (directory / OLD_CONFIG_FILE).is_file():  # written by rwkvslice <= 0.1
            config_path, weights_path = directory / OLD_CONFIG_FILE, directory / OLD_WEIGHTS_FILE
        else:
            raise CheckpointError(f"{config_path}: missing, and no {OLD_CONFIG_FILE} either "
                                  "(not an rwkvslice or Hugging Face model directory)")
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing (not an rwkvslice checkpoint directory)")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    meta.pop("model_type", None)
    try:
        config = RWKV7Config.from_dict(meta)
    except Exception as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None
    try:
        sd = load_file(weights_path, device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: cannot read safetensors file: {exc}") from None
    model = cls(config)
    if "initial_state" in sd:  # saved from a model with a tuned initial state (rwkvslice.peft)
        model.initial_state = torch.nn.Parameter(sd["initial_state"].float(), requires_grad=False)
    expected = model.state_dict()
    for key in expected:
        if key not in sd:
            raise CheckpointError(f"{weights_path}: missing key '{key}'")
        if tuple(sd[key].shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{weights_path}: '{key}' has shape {tuple(sd[key].shape)}, expected {tuple(expected[key].shape)}"
            )
    extra = [k for k in sd if k not in expected]
    if extra:
        raise CheckpointError(f"{weights_path}: unexpected key '{extra[0]}'")
    model.load_state_dict(sd, strict=True)
    return model.to(map_location)
