"""What trains in a run (`--tune full|lora|state`, `--train-also`), and the files of a tuned checkpoint.

`prepare(model, spec)` freezes every weight, then adds what `spec` trains: LoRA adapters (plus, with
`train_also`, whole parameter kinds as RWKV-PEFT's `train_parts`) or the initial WKV state. Frozen
tensors have requires_grad False, so they get no gradient and, since the optimizer only takes trainable
parameters (train/optim.py), no optimizer state.

A tuned checkpoint directory holds only what trained, plus what is needed to rebuild the rest:
    peft.safetensors   the trainable tensors under their model names (e.g. blocks.3.att.key.lora_A,
                       initial_state), and for PiSSA the initial factors as pissa_init.<module>.lora_A/B
    peft.json          the TuneSpec and the base's identity (the --init-from path and its sha256, or the
                       preset config and seed of a fresh model with the sha256 of its weights)
    rwkvslice_config.json  the model config (as save_pretrained writes it)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rwkvslice.errors import CheckpointError, ConfigError
from rwkvslice.peft.files import atomic_save
from rwkvslice.peft.lora import DEFAULT_TARGETS, LORA_INITS, LoRALinear, add_lora, parse_targets
from rwkvslice.peft.state import enable_state_tuning

TUNE_KINDS = ("full", "lora", "state")
TRAIN_ALSO_PARTS = ("time", "ln", "emb", "head")
PEFT_FILES = ("peft.safetensors", "peft.json", "rwkvslice_config.json")
_TIME = re.compile(r"^blocks\.\d+\.(att\.(x_[rwkvag]|[wav][012]|g[12]|k_k|k_a|r_k)|ffn\.x_k)$")
_LN = re.compile(r"^(blocks\.\d+\.(ln[012]|att\.ln_x)|ln_out)\.(weight|bias)$")


@dataclasses.dataclass(frozen=True)
class TuneSpec:
    kind: str = "full"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    lora_init: str = "lora"
    train_also: tuple[str, ...] = ()

    def validate(self) -> None:
        """Checks that need no model (the rank against the layer sizes is checked in add_lora)."""
        if self.kind not in TUNE_KINDS:
            raise ConfigError(f"--tune must be one of {', '.join(TUNE_KINDS)}, got {self.kind!r}")
        parse_targets(self.lora_targets)
        if self.lora_r < 1:
            raise ConfigError(f"--lora-r must be >= 1, got {self.lora_r}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if self.lora_init not in LORA_INITS:
            raise ConfigError(f"--lora-init must be one of {', '.join(LORA_INITS)}, got {self.lora_init!r}")
        bad = [p for p in self.train_also if p not in TRAIN_ALSO_PARTS]
        if bad:
            raise ConfigError(f"--train-also: unknown part {bad[0]!r}; choose from {','.join(TRAIN_ALSO_PARTS)}")
        if self.train_also and self.kind == "state":
            raise ConfigError("--tune state trains only the initial state; drop --train-also (or use --tune lora)")
        if self.train_also and self.kind == "full":
            raise ConfigError("--train-also needs --tune lora (--tune full trains everything already)")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "lora_targets": list(self.lora_targets),
                "train_also": list(self.train_also)}

    @classmethod
    def from_dict(cls, d: dict) -> TuneSpec:
        return cls(kind=d["kind"], lora_r=int(d["lora_r"]), lora_alpha=float(d["lora_alpha"]),
                   lora_targets=tuple(d["lora_targets"]), lora_init=d["lora_init"],
                   train_also=tuple(d["train_also"]))


def parse_parts(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


def part_of(name: str) -> str | None:
    """Which --train-also kind a parameter belongs to (None: a linear weight, trained only by LoRA)."""
    if name == "emb.weight":
        return "emb"
    if name == "head.weight":
        return "head"
    if _LN.match(name):
        return "ln"
    if _TIME.match(name):
        return "time"
    return None


def prepare(model: Any, spec: TuneSpec, pissa_factors=None) -> dict:
    """Freeze the model and attach what `spec` trains (in place). Returns the PiSSA init factors ({} else).

    `pissa_factors` replays a stored PiSSA init (resume / loading), so the residual is rebuilt exactly.
    """
    spec.validate()
    model.peft_spec = spec  # what save_tuned and the loaders read back
    if spec.kind == "full":
        return {}
    for p in model.parameters():
        p.requires_grad_(False)
    factors: dict = {}
    if spec.kind == "lora":
        factors = add_lora(model, spec.lora_r, spec.lora_alpha, spec.lora_targets, spec.lora_init, pissa_factors)
        for name, p in model.named_parameters():
            if part_of(name) in spec.train_also:
                p.requires_grad_(True)
    else:
        enable_state_tuning(model)
    model.peft_pissa = factors
    return factors


def trainable_tensors(model: Any) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def keep_frozen_in_bf16(model: Any) -> int:
    """Store frozen linear weights in bf16 (CUDA under --precision bf16: autocast runs every linear in
    bf16 anyway, so the values are the same and only trainable tensors keep fp32 masters). Returns the
    number of tensors cast. The embedding, norms and small vectors stay fp32 (not autocast ops)."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, LoRALinear)) and mod is not getattr(model, "head", None):
            if not mod.weight.requires_grad and mod.weight.dtype == torch.float32:
                mod.weight.data = mod.weight.data.to(torch.bfloat16)
                n += 1
    return n


def weights_sha256(model: Any) -> str:
    """sha256 over every tensor of the state dict (names, shapes, bytes): identifies a base in memory."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype}".encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_tuned(model: Any, directory: Path, base: dict, trainable: dict[str, torch.Tensor] | None = None) -> None:
    """Write peft.safetensors, peft.json and rwkvslice_config.json of a tuned model into `directory`.

    `trainable`: the trainable tensors when the model's own are shards (FSDP gathers them first)."""
    from safetensors.torch import save_file

    spec: TuneSpec = model.peft_spec
    trainable = trainable_tensors(model) if trainable is None else trainable
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in trainable.items()}
    for name, (A, B) in getattr(model, "peft_pissa", {}).items():
        tensors[f"pissa_init.{name}.lora_A"] = A.detach().cpu().contiguous()
        tensors[f"pissa_init.{name}.lora_B"] = B.detach().cpu().contiguous()
    atomic_save(directory / "peft.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    meta = json.dumps({"tune": spec.to_dict(), "base": base}, indent=2) + "\n"
    atomic_save(directory / "peft.json", lambda tmp: Path(tmp).write_text(meta, encoding="utf-8"))
    from rwkvslice.model.official import NATIVE_CONFIG_FILE, NATIVE_MODEL_TYPE

    cfg = json.dumps({"model_type": NATIVE_MODEL_TYPE, **model.config.to_dict()}, indent=2) + "\n"
    atomic_save(directory / NATIVE_CONFIG_FILE, lambda tmp: Path(tmp).write_text(cfg, encoding="utf-8"))


def is_tuned_dir(directory: str | Path) -> bool:
    return (Path(directory) / "peft.json").is_file()


def read_tuned(directory: str | Path) -> tuple[TuneSpec, dict, dict[str, torch.Tensor], dict]:
    """(spec, base identity, trainable tensors, PiSSA init factors) of a tuned checkpoint directory."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for f in PEFT_FILES:
        if not (directory / f).is_file():
            raise CheckpointError(f"{directory}: not a tuned checkpoint (missing {f})")
    try:
        meta = json.loads((directory / "peft.json").read_text(encoding="utf-8"))
        spec, base = TuneSpec.from_dict(meta["tune"]), dict(meta["base"])
        tensors = load_file(str(directory / "peft.safetensors"))
    except Exception as exc:  # json/safetensors/KeyError: a corrupt or foreign file
        raise CheckpointError(f"{directory}: cannot read the tuned checkpoint ({type(exc).__name__}: {exc})"
                              .splitlines()[0]) from None
    factors: dict = {}
    for k in [k for k in tensors if k.startswith("pissa_init.")]:
        module, which = k[len("pissa_init."):].rsplit(".", 1)
        pair = factors.setdefault(module, [None, None])
        pair[0 if which == "lora_A" else 1] = tensors.pop(k)
    return spec, base, tensors, {m: (a, b) for m, (a, b) in factors.items()}


@torch.no_grad()
def load_trainable(model: Any, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy the saved trainable tensors into a prepared model; the names must be exactly its trainable set."""
    params = dict(model.named_parameters())
    want = set(trainable_tensors(model))
    if set(tensors) != want:
        extra = sorted(set(tensors) - want) or sorted(want - set(tensors))
        raise CheckpointError(f"{source}: trainable tensors do not match the run's --tune settings "
                              f"(e.g. {extra[0]!r})")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(params[k].shape):
            raise CheckpointError(f"{source}: '{k}' has shape {tuple(t.shape)}, expected {tuple(params[k].shape)}")
        params[k].copy_(t)


def check_same_base(saved: dict, now: dict, source: str) -> None:
    """A resume must continue on the same base weights: refuse another file (path or sha256)."""
    if saved.get("sha256") != now.get("sha256"):
        what = now.get("init_from") or "a freshly initialised model"
        raise ConfigError(f"--resume: {source} was tuned on base {saved.get('init_from') or 'a fresh model'} "
                          f"(sha256 {str(saved.get('sha256'))[:12]}...), this run's base {what} has sha256 "
                          f"{str(now.get('sha256'))[:12]}...; resume against the same base")
