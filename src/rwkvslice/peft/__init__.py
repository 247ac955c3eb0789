"""Parameter-efficient fine-tuning of RWKV-7: LoRA / PiSSA adapters and state tuning.

    from rwkvslice.peft import add_lora, merge_lora, enable_state_tuning

    add_lora(model, r=16, alpha=32)            # adapters on att.receptance/key/value/output, ffn.key/value
    ...train only the parameters with requires_grad (freeze the rest yourself, or use prepare())...
    merge_lora(model)                          # plain nn.Linear again: W + (alpha / r) B A

    enable_state_tuning(model)                 # model.initial_state: (L, H, N, N) fp32, zeros, trainable
    save_state_file(model.initial_state, "state.pth")   # RWKV-PEFT's blocks.{i}.att.time_state layout

`prepare(model, TuneSpec(kind="lora" | "state", ...))` does what `rwkvslice train --tune` does: freezes
every weight, then attaches what trains.
"""

from __future__ import annotations

from rwkvslice.peft.hf_adapter import save_hf_adapter
from rwkvslice.peft.lora import DEFAULT_TARGETS, LORA_TARGETS, LoRALinear, add_lora, lora_modules, merge_lora
from rwkvslice.peft.state import enable_state_tuning, load_state_file, save_state_file, set_initial_state
from rwkvslice.peft.tuning import TRAIN_ALSO_PARTS, TUNE_KINDS, TuneSpec, prepare, trainable_tensors

__all__ = [
    "DEFAULT_TARGETS", "LORA_TARGETS", "TRAIN_ALSO_PARTS", "TUNE_KINDS", "LoRALinear", "TuneSpec", "add_lora",
    "enable_state_tuning", "load_state_file", "lora_modules", "merge_lora", "prepare", "save_hf_adapter",
    "save_state_file", "set_initial_state", "trainable_tensors",
]
