"""`rwkvslice export`: write a checkpoint in the official RWKV-7 .pth layout (loads in the `rwkv` package)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rwkvslice.errors import ConfigError

DTYPES = ("fp32", "bf16", "fp16")  # file dtypes; torch.<name> below, imported only once the flags are valid


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="convert a checkpoint to an official .pth",
                              description="Write the official x070 state-dict layout (RWKV-LM / rwkv package).")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a checkpoint or run directory")
    p.add_argument("--official", metavar="OUT.pth",
                   help="a full official checkpoint (a LoRA run's adapters merged: W + (alpha/r) BA)")
    p.add_argument("--state", metavar="OUT.pth",
                   help="a --tune state run's initial state in RWKV-PEFT's layout: blocks.{i}.att.time_state "
                   "(H, N, N) fp32")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="tensor dtype in the file (default fp32)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.official is None and args.state is None:
        raise ConfigError("nothing to export: pass --official OUT.pth and/or --state OUT.pth")
    for flag, name in (("--official", args.official), ("--state", args.state)):
        if name is None:
            continue
        out = Path(name)
        if out.suffix != ".pth":
            raise ConfigError(f"{flag} {out}: the file name must end in .pth")
        if not out.parent.is_dir():
            raise ConfigError(f"{flag} {out}: directory {out.parent} does not exist")
    import torch  # only now: argument errors answer without paying for it

    from rwkvslice.generate.loading import load_tuned_model
    from rwkvslice.model import RWKV7
    from rwkvslice.peft import save_state_file, set_initial_state
    from rwkvslice.peft.tuning import is_tuned_dir
    from rwkvslice.train.checkpoint import resolve_weights_dir

    weights = resolve_weights_dir(args.ckpt)
    # a --tune lora/state checkpoint: the tuned model (LoRA merged into the weights)
    model = load_tuned_model(weights) if is_tuned_dir(weights) else RWKV7.from_pretrained(weights)
    if args.state is not None:
        if model.initial_state is None:
            raise ConfigError(f"--state: {weights} has no tuned initial state (not a --tune state run)")
        save_state_file(model.initial_state, args.state)
        print(f"wrote {args.state} (tuned state, {model.config.n_layer} x blocks.i.att.time_state) from {weights}")
    if args.official is not None:
        set_initial_state(model, None)  # the official weights layout has no initial state (see --state)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        model.save_official(Path(args.official), dtype=dtype)
        print(f"wrote {args.official} ({args.dtype}) from {weights}")
    return 0
