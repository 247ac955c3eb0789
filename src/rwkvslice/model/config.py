"""RWKV7Config: the shape of an RWKV-7 (x070) model."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from rwkvslice.errors import ConfigError


def _lora_rank(factor: float, n_embd: int) -> int:
    # The official trainer's "suggestion": max(32, round(factor * sqrt(C) / 32) * 32).
    return max(32, round(factor * math.sqrt(n_embd) / 32) * 32)


# Size presets: (n_layer, n_embd, head_size). The vocab comes from the tokenizer.
PRESETS: dict[str, tuple[int, int, int]] = {
    "demo": (2, 128, 32),  # trains on a 2-core CPU in minutes
    "tiny": (2, 256, 64),
    "small": (6, 512, 64),
    "0.1b": (12, 768, 64),  # RWKV7-World 0.1B shape
    "0.4b": (24, 1024, 64),
    "1.5b": (24, 2048, 64),
}


@dataclasses.dataclass
class RWKV7Config:
    vocab_size: int
    n_embd: int
    n_layer: int
    head_size: int = 64
    d_decay: int | None = None  # LoRA rank of the decay (w1/w2)
    d_aaa: int | None = None  # LoRA rank of the in-context learning rate (a1/a2)
    d_mv: int | None = None  # LoRA rank of the value residual (v1/v2)
    d_gate: int | None = None  # LoRA rank of the output gate (g1/g2)

    def __post_init__(self):
        for name in ("vocab_size", "n_embd", "n_layer", "head_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"RWKV7Config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.head_size:
            raise ConfigError(
                f"RWKV7Config: n_embd ({self.n_embd}) must be a multiple of head_size ({self.head_size})"
            )
        defaults = {"d_decay": 2.5, "d_aaa": 2.5, "d_mv": 1.7, "d_gate": 5.0}
        for name, factor in defaults.items():
            value = getattr(self, name)
            if value is None:
                setattr(self, name, _lora_rank(factor, self.n_embd))
            elif not isinstance(value, int) or value < 1:
                raise ConfigError(f"RWKV7Config: {name} must be a positive integer, got {value!r}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @property
    def lora_ranks(self) -> tuple[int, int, int, int]:
        """(d_decay, d_aaa, d_mv, d_gate), all filled in by __post_init__."""
        ranks = (self.d_decay, self.d_aaa, self.d_mv, self.d_gate)
        assert all(isinstance(r, int) for r in ranks)
        return ranks  # type: ignore[return-value]

    @property
    def dim_ffn(self) -> int:
        return 4 * self.n_embd  # hard-coded 4C in the official x070 ChannelMix

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RWKV7Config:
        if not isinstance(d, dict):
            raise ConfigError(f"RWKV7Config: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"RWKV7Config: unknown field(s) {', '.join(unknown)}")
        missing = [n for n in ("vocab_size", "n_embd", "n_layer") if n not in d]
        if missing:
            raise ConfigError(f"RWKV7Config: missing field(s) {', '.join(missing)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> RWKV7Config:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not a JSON config: {exc}") from None
        try:
            return cls.from_dict(d)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def preset(cls, name: str, vocab_size: int) -> RWKV7Config:
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        n_layer, n_embd, head_size = PRESETS[name]
        return cls(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, head_size=head_size)
