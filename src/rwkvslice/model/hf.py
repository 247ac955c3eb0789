"""The Hugging Face layout of RWKV-7: what rwkv7-hf (PyPI) and fla-hub checkpoints use.

A directory holds config.json (`"model_type": "rwkv7"`, HF field names) and model.safetensors (or shards
listed in model.safetensors.index.json). Weight names, official -> HF:

    emb.weight -> model.embeddings.weight          ln_out.* -> model.norm.*     head.weight -> lm_head.weight
    blocks.i.ln0/ln1/ln2.* -> model.layers.i.pre_norm/attn_norm/ffn_norm.*
    blocks.i.att.{receptance,key,value,output}.weight -> model.layers.i.attn.{r,k,v,o}_proj.weight
    blocks.i.att.ln_x.* -> ...attn.g_norm.*        att.x_{r,w,k,v,a,g}, att.r_k -> attn.* (same shape)
    att.{w,a,v}0 (1,1,C) -> attn.{w,a,v}_lora.lora.2.bias (C,)
    att.{w,a,v,g}1 (C,d) -> attn.{..}_lora.lora.0.weight (d,C), att.{..}2 (d,C) -> ..lora.2.weight (C,d)
    att.k_k, att.k_a, ffn.x_k (1,1,C) -> (C,); ffn.key/value.weight -> same names under model.layers.i.ffn.

Where the two formats disagree (rwkv7-hf 0.9.0):
- its GroupNorm eps is head_dim * norm_eps, and the same norm_eps is the LayerNorms' eps. The official
  code uses 1e-5 for the LayerNorms and 64e-5 for the GroupNorm at every head size, so only head size 64
  has an exact HF config: `save_hf` refuses the others; `load_hf` loads them with a warning (the weights
  are the same; rwkv7-hf would run them with a different GroupNorm eps than we do).
- its embedding has padding_idx = pad_token_id = 0: training in rwkv7-hf never updates the row of token 0
  (RWKV's document separator). Running it is unaffected.
- block 0 has no value-residual LoRA (v0/v1/v2) there, as here.

`save_hf` also writes a small entry-point module so that transformers' Auto* classes with
trust_remote_code=True find rwkv7-hf's classes, and, for the World vocabulary, the files rwkv7-hf's
tokenizer reads, so `AutoTokenizer.from_pretrained(dir, trust_remote_code=True)` works.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from rwkvslice.errors import CheckpointError, ConfigError
from rwkvslice.model.config import RWKV7Config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODEL_TYPE = "rwkv7"
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, as in the official x070 code
EXACT_HEAD_SIZE = 64  # the head size at which rwkv7-hf's GroupNorm eps (head_dim * norm_eps) is 64e-5
# Our own entry-point module for trust_remote_code: it imports the classes from the rwkv7-hf package.
ENTRY_MODULE = "rwkv7_hf_entry"
ENTRY_SOURCE = '''"""Entry point for transformers' Auto* classes (trust_remote_code=True), written by rwkvslice.

The model, config and tokenizer are rwkv7-hf's: pip install rwkv7-hf==0.9.0.
"""

from rwkv7_hf import RWKV7Config, RWKV7ForCausalLM, RWKV7Model, RWKV7Tokenizer

__all__ = ["RWKV7Config", "RWKV7ForCausalLM", "RWKV7Model", "RWKV7Tokenizer"]
'''
AUTO_MAP = {
    "AutoConfig": f"{ENTRY_MODULE}.RWKV7Config",
    "AutoModel": f"{ENTRY_MODULE}.RWKV7Model",
    "AutoModelForCausalLM": f"{ENTRY_MODULE}.RWKV7ForCausalLM",
}
# The token ids rwkv7-hf's configs and tokenizer use: 0 (RWKV's document separator) is eos and pad.
PAD_ID, EOS_ID, BOS_ID = 0, 0, 1
WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"  # the name rwkv7-hf's tokenizer looks for
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# ------------------------------------------------------------------------------------------------
# Weight names. `how` says how a tensor changes on the way to HF: "same", "t" (transposed LoRA
# matrix) or "flat" ((1, 1, C) vector stored as (C,)).

_TOP = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
        "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
_NORMS = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
_ATT_LINEAR = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
_LORA = {"0": ("lora.2.bias", "flat"), "1": ("lora.0.weight", "t"), "2": ("lora.2.weight", "t")}


def hf_name(name: str) -> tuple[str, str]:
    """(HF weight name, how) for an official weight name. KeyError for names outside the x070 layout."""
    if name in _TOP:
        return _TOP[name], "same"
    m = re.fullmatch(r"blocks\.(\d+)\.(ln0|ln1|ln2|att|ffn)\.(.+)", name)
    if m is None:
        raise KeyError(name)
    layer, part, rest = f"model.layers.{m.group(1)}", m.group(2), m.group(3)
    if part in _NORMS:
        if rest not in ("weight", "bias"):
            raise KeyError(name)
        return f"{layer}.{_NORMS[part]}.{rest}", "same"
    if part == "ffn":
        if rest == "x_k":
            return f"{layer}.ffn.x_k", "flat"
        if rest in ("key.weight", "value.weight"):
            return f"{layer}.ffn.{rest}", "same"
        raise KeyError(name)
    lora = re.fullmatch(r"([wavg])([012])", rest)
    if lora and not (lora.group(1) == "g" and lora.group(2) == "0"):  # the gate LoRA has no bias
        suffix, how = _LORA[lora.group(2)]
        return f"{layer}.attn.{lora.group(1)}_lora.{suffix}", how
    if rest in ("k_k", "k_a"):
        return f"{layer}.attn.{rest}", "flat"
    if rest in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "r_k"):
        return f"{layer}.attn.{rest}", "same"
    module, _, param = rest.partition(".")
    if module in _ATT_LINEAR and (param == "weight" or (module == "ln_x" and param == "bias")):
        return f"{layer}.attn.{_ATT_LINEAR[module]}.{param}", "same"
    raise KeyError(name)


def _hf_shape(shape: tuple[int, ...], how: str) -> tuple[int, ...]:
    if how == "t":
        return (shape[1], shape[0])
    if how == "flat":
        return (math.prod(shape),)
    return shape


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official names and shapes -> HF names and shapes (contiguous, same dtype)."""
    out = {}
    for key, t in state_dict.items():
        try:
            name, how = hf_name(key)
        except KeyError:
            raise ConfigError(f"'{key}' is not a weight of the RWKV-7 x070 layout; merge adapters first") from None
        t = t.detach()
        out[name] = (t.t() if how == "t" else t.reshape(-1) if how == "flat" else t).contiguous()
    return out


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str):
    """HF tensors -> official names/shapes of `expected` (a model's state_dict), fp32.

    `where` names the weights file in errors. Block 0's v_lora (unused, as in the official layout) is
    dropped; any other unknown, missing or misshapen weight is a CheckpointError."""
    out, used = {}, set()
    for key, ref in expected.items():
        name, how = hf_name(key)
        if name not in hf_sd:
            raise CheckpointError(f"{where}: missing weight '{name}'")
        t, want = hf_sd[name], _hf_shape(tuple(ref.shape), how)
        if tuple(t.shape) != want:
            raise CheckpointError(f"{where}: '{name}' has shape {tuple(t.shape)}, expected {want} from {CONFIG_FILE}")
        if not t.is_floating_point():
            raise CheckpointError(f"{where}: '{name}' has dtype {t.dtype}, expected a floating-point tensor")
        out[key] = (t.t() if how == "t" else t.reshape(ref.shape)).to(torch.float32).contiguous()
        used.add(name)
    extra = [k for k in hf_sd if k not in used and not k.startswith("model.layers.0.attn.v_lora.")]
    if extra:
        raise CheckpointError(f"{where}: unexpected weight '{extra[0]}' (not an RWKV-7 x070 model)")
    return out


# ------------------------------------------------------------------------------------------------
# config.json


def hf_config_dict(config: RWKV7Config, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json rwkv7-hf reads for a model of this shape."""
    C = config.n_embd
    return {
        "architectures": ["RWKV7ForCausalLM"],
        "auto_map": dict(AUTO_MAP),
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": C,
        "num_hidden_layers": config.n_layer,
        "num_heads": config.n_head,
        "head_dim": config.head_size,
        "attention_hidden_size": C,
        "intermediate_size": config.dim_ffn,
        "hidden_ratio": config.dim_ffn / C,
        "decay_low_rank_dim": config.d_decay,
        "a_low_rank_dim": config.d_aaa,
        "v_low_rank_dim": config.d_mv,
        "gate_low_rank_dim": config.d_gate,
        "norm_eps": LAYER_NORM_EPS,
        "norm_bias": True,
        "tie_word_embeddings": False,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "bos_token_id": BOS_ID,
        "use_cache": True,
        "dtype": DTYPE_NAMES[dtype],
    }


def _positive_int(d: dict, key: str, where: Path) -> int:
    if key not in d:
        raise CheckpointError(f"{where}: missing field '{key}'")
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{where}: field '{key}' must be a positive integer, got {value!r}")
    return value


def config_from_hf(d: dict, where: Path) -> RWKV7Config:
    """An RWKV7Config from an HF config.json dict; CheckpointError naming the field when it does not
    describe an x070 model rwkvslice runs exactly (missing, contradictory or unsupported fields)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    if d.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{where}: field 'model_type' is {d.get('model_type')!r}, expected '{MODEL_TYPE}'")
    V, C, L = (_positive_int(d, k, where) for k in ("vocab_size", "hidden_size", "num_hidden_layers"))
    ranks = [_positive_int(d, k, where)
             for k in ("decay_low_rank_dim", "a_low_rank_dim", "v_low_rank_dim", "gate_low_rank_dim")]
    if "head_dim" not in d and "num_heads" not in d:
        raise CheckpointError(f"{where}: missing field 'head_dim' (or 'num_heads')")
    # rwkv7-hf and fla write both; either one alone fixes the other through hidden_size
    N = _positive_int(d, "head_dim", where) if "head_dim" in d else C // _positive_int(d, "num_heads", where)
    H = _positive_int(d, "num_heads", where) if "num_heads" in d else C // N
    if H * N != C:
        raise CheckpointError(f"{where}: fields 'num_heads' ({H}) x 'head_dim' ({N}) != 'hidden_size' ({C})")
    if d.get("num_attention_heads") not in (None, H):
        raise CheckpointError(f"{where}: field 'num_attention_heads' ({d['num_attention_heads']!r}) contradicts "
                              f"'num_heads' ({H})")
    if d.get("attention_hidden_size") not in (None, C):
        raise CheckpointError(f"{where}: field 'attention_hidden_size' ({d['attention_hidden_size']!r}) != "
                              f"'hidden_size' ({C}); rwkvslice runs only attention width = hidden size")
    if d.get("value_dim") is not None and d["value_dim"] != [C] * L:
        raise CheckpointError(f"{where}: field 'value_dim' must be hidden_size ({C}) in every layer")
    if "intermediate_size" in d and d["intermediate_size"] is not None:
        if d["intermediate_size"] != 4 * C:
            raise CheckpointError(f"{where}: field 'intermediate_size' ({d['intermediate_size']!r}) != 4 x "
                                  f"'hidden_size' ({4 * C}), the x070 ChannelMix width")
    elif d.get("hidden_ratio") not in (None, 4, 4.0):
        raise CheckpointError(f"{where}: field 'hidden_ratio' ({d['hidden_ratio']!r}) != 4, the x070 ChannelMix width")
    if d.get("norm_eps", LAYER_NORM_EPS) != LAYER_NORM_EPS:
        raise CheckpointError(f"{where}: field 'norm_eps' ({d['norm_eps']!r}) != {LAYER_NORM_EPS}, the official "
                              "LayerNorm eps rwkvslice uses")
    for key, want in (("norm_bias", True), ("tie_word_embeddings", False)):
        if d.get(key, want) is not want:
            raise CheckpointError(f"{where}: field '{key}' is {d[key]!r}; rwkvslice runs only {key} {want}")
    if d.get("hidden_act", "sqrelu") != "sqrelu" or d.get("norm_first", True) is not True:
        bad = "hidden_act" if d.get("hidden_act", "sqrelu") != "sqrelu" else "norm_first"
        raise CheckpointError(f"{where}: field '{bad}' is {d[bad]!r}, not the x070 layout")
    try:
        return RWKV7Config(vocab_size=V, n_embd=C, n_layer=L, head_size=N, d_decay=ranks[0], d_aaa=ranks[1],
                           d_mv=ranks[2], d_gate=ranks[3])
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def is_hf_dir(directory: str | os.PathLike) -> bool:
    """Does `directory` hold an HF RWKV-7 model (config.json with model_type rwkv7 and no rwkvslice fields)?"""
    path = Path(directory) / CONFIG_FILE
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    # directories of rwkvslice <= 0.1 also said "rwkv7", with our field names (n_embd, ...)
    return isinstance(d, dict) and d.get("model_type") == MODEL_TYPE and "n_embd" not in d


# ------------------------------------------------------------------------------------------------
# Reading and writing directories.


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}".splitlines()[0]) from None


def _read_hf_weights(directory: Path, map_location: str) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
    if single.is_file():
        files, where = [single], str(single)
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: missing field 'weight_map'")
        files, where = [directory / f for f in sorted(set(weight_map.values()))], str(index)
    else:
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} (or {INDEX_FILE}) next to {CONFIG_FILE}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(f, device=map_location))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{f}: cannot read safetensors file: {exc}".splitlines()[0]) from None
    return sd, where


def load_hf(directory, cls, map_location="cpu"):
    """An RWKV7 (fp32) from an HF-layout directory (rwkv7-hf's converter, fla-hub, `save_hf`)."""
    directory = Path(directory)
    config = config_from_hf(_read_json(directory / CONFIG_FILE), directory / CONFIG_FILE)
    if config.head_size != EXACT_HEAD_SIZE:
        warnings.warn(f"{directory}: head_dim {config.head_size}: rwkvslice runs the GroupNorm with the official "
                      f"eps 64e-5, rwkv7-hf with head_dim * norm_eps = {config.head_size * LAYER_NORM_EPS:g}; "
                      "logits differ slightly between the two", stacklevel=2)
    hf_sd, where = _read_hf_weights(directory, str(map_location))
    model = cls(config)
    model.load_state_dict(from_hf_state_dict(hf_sd, model.state_dict(), where), strict=True)
    return model.to(map_location)


def check_exportable(config: RWKV7Config, what: str) -> None:
    """ConfigError unless rwkv7-hf runs a model of this config exactly as we do."""
    if config.head_size != EXACT_HEAD_SIZE:
        raise ConfigError(
            f"{what}: head_size {config.head_size} has no exact HF config: rwkv7-hf's GroupNorm eps is "
            f"head_dim * norm_eps = {config.head_size * LAYER_NORM_EPS:g} and its norm_eps is also the LayerNorm "
            f"eps, while RWKV-7 uses 64e-5 and 1e-5; only head_size 64 converts exactly")


def _world_vocab() -> tuple[str, str]:
    """(file name, text) of the World vocabulary rwkv7-hf's tokenizer reads: the file the `rwkv` package
    ships (the same one data/tokenizers.py reads; the model layer does not import data/)."""
    from importlib import resources

    try:
        data = resources.files("rwkv").joinpath(WORLD_VOCAB_FILE).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        raise ConfigError(f"the World tokenizer files need the `rwkv` package (it ships {WORLD_VOCAB_FILE}): "
                          "pip install 'rwkvslice[world]'") from None
    return WORLD_VOCAB_FILE, data.replace(b"\r\n", b"\n").decode("utf-8")  # the wheel has CRLF line ends


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_hf(model, directory, dtype: torch.dtype = torch.float32, tokenizer: str | None = None) -> None:
    """Write `directory` in the HF layout, atomically: everything goes into a temporary directory next
    to it, which is renamed into place only when complete. `directory` must not exist or be empty.

    tokenizer="world" adds rwkv7-hf's tokenizer files (the vocab comes from the `rwkv` package)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    check_exportable(model.config, str(directory))
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"{directory}: dtype {dtype} is not one of fp32, bf16, fp16")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(f"{directory}: already exists and is not an empty directory")
    if not directory.parent.is_dir():
        raise ConfigError(f"{directory}: directory {directory.parent} does not exist")
    vocab = None
    if tokenizer == "world":
        vocab = _world_vocab()
    elif tokenizer not in (None, "byte"):
        raise ConfigError(f"{directory}: unknown tokenizer {tokenizer!r}")

    sd = to_hf_state_dict({k: v.to("cpu", dtype) for k, v in model.state_dict().items()})
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(sd, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        files = {CONFIG_FILE: json.dumps(hf_config_dict(model.config, dtype), indent=2) + "\n",
                 f"{ENTRY_MODULE}.py": ENTRY_SOURCE}
        if vocab is not None:
            files[vocab[0]] = vocab[1]
            files["tokenizer_config.json"] = json.dumps({
                "tokenizer_class": "RWKV7Tokenizer",
                "auto_map": {"AutoTokenizer": [f"{ENTRY_MODULE}.RWKV7Tokenizer", None]},
                "model_vocab_size": model.config.vocab_size,
                "pad_token": "<|padding|>",  # rwkv7-hf's tokenizer maps both to id 0
                "eos_token": "<|endoftext|>",
                "errors": "replace",
            }, indent=2) + "\n"
            files["special_tokens_map.json"] = json.dumps(
                {"pad_token": "<|padding|>", "eos_token": "<|endoftext|>"}, indent=2) + "\n"
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if directory.exists():
            directory.rmdir()  # empty (checked above); rename cannot replace a directory otherwise
        os.rename(tmp, directory)
        _fsync(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------
# What `train --init-from` accepts.


def load_base(path, cls):
    """The model to fine-tune from `path`: an official .pth file, an HF-layout directory or an
    rwkvslice directory, told apart by what is there."""
    from rwkvslice.model.official import NATIVE_CONFIG_FILE

    path = Path(path)
    if path.is_file():
        return cls.from_official(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    if is_hf_dir(path):
        return load_hf(path, cls)
    if (path / NATIVE_CONFIG_FILE).is_file() or (path / CONFIG_FILE).is_file():
        return cls.from_pretrained(path)
    raise CheckpointError(f"{path}: neither an official .pth nor a model directory: no {CONFIG_FILE} "
                          f"(Hugging Face layout) or {NATIVE_CONFIG_FILE} (rwkvslice) in it")
