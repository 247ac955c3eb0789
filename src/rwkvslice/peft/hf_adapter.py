"""Write a LoRA as Hugging Face PEFT's standard adapter files (adapter_config.json +
adapter_model.safetensors), which `peft.PeftModel.from_pretrained` and other tools load.

We keep our own small LoRA module rather than depending on `peft` (see README, "LoRA, PiSSA and state
tuning"), but the files follow its layout: tensors `base_model.model.<module>.lora_A.weight` (r, in) and
`.lora_B.weight` (out, r), scaling lora_alpha / r. A PiSSA adapter is written as the equivalent plain LoRA
on the *original* weights, as PEFT's own PiSSA conversion does: W_res + s B A = W + s (B A - B0 A0), a
rank-2r adapter [B, -B0] [A; A0] with lora_alpha doubled so the scaling stays s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rwkvslice.errors import ConfigError
from rwkvslice.peft.files import atomic_save
from rwkvslice.peft.lora import lora_modules


def save_hf_adapter(model: Any, directory: str | Path, base_model_name_or_path: str | None = None) -> None:
    from safetensors.torch import save_file

    spec = getattr(model, "peft_spec", None)
    mods = lora_modules(model)
    if not mods:
        raise ConfigError("save_hf_adapter: the model has no (unmerged) LoRA adapters")
    if spec is not None and spec.train_also:
        raise ConfigError("save_hf_adapter: --train-also tensors have no place in a PEFT adapter file")
    pissa = getattr(model, "peft_pissa", {})
    tensors, r, alpha = {}, None, None
    for name, m in mods.items():
        A, B, rank, a = m.lora_A.detach(), m.lora_B.detach(), m.r, m.alpha
        if name in pissa:
            A0, B0 = pissa[name]
            A, B, rank, a = torch.cat([A, A0]), torch.cat([B, -B0], dim=1), 2 * rank, 2 * a
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.float().cpu().contiguous()
        r, alpha = rank, a
    targets = sorted({n.split(".", 2)[2] for n in mods})  # blocks.i.att.key -> att.key
    config = {
        "peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": alpha, "target_modules": targets,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save(directory / "adapter_model.safetensors",
                lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2) + "\n"
    atomic_save(directory / "adapter_config.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
