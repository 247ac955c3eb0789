"""`rwkvslice export`: write a checkpoint in the official RWKV-7 .pth layout (loads in the `rwkv` package)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from rwkvslice.errors import ConfigError

DTYPES = ("fp32", "bf16", "fp16")  # file dtypes; torch.<name> below, imported only once the flags are valid


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="convert a checkpoint to an official .pth",
                              description="Write the official x070 state-dict layout (RWKV-LM / rwkv package).")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a checkpoint or run directory")
    p.add_argument("--official", metavar="OUT.pth", help="output file: the official .pth")
    p.add_argument("--safetensors", metavar="DIR", help="also (or instead) write DIR/model.safetensors + config.json "
                   "(+ run.json), the layout `rwkvslice generate --ckpt` and RWKV7.from_pretrained read")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="tensor dtype in the file (default fp32)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.official is None and args.safetensors is None:  # (before importing torch: flag errors are fast)
        raise ConfigError("export: pass --official OUT.pth and/or --safetensors DIR")
    out = Path(args.official) if args.official is not None else None
    if out is not None and out.suffix != ".pth":
        raise ConfigError(f"--official {out}: the file name must end in .pth")
    if out is not None and not out.parent.is_dir():
        raise ConfigError(f"--official {out}: directory {out.parent} does not exist")
    if args.safetensors is not None and Path(args.safetensors).is_file():
        raise ConfigError(f"--safetensors {args.safetensors} is a file; it names a directory")
    import torch

    from rwkvslice.model import RWKV7
    from rwkvslice.train import sharding
    from rwkvslice.train.checkpoint import resolve_weights_dir

    weights = resolve_weights_dir(args.ckpt)
    if sharding.is_sharded_checkpoint(weights):  # --shard fsdp: reassembled from the ranks' shards
        model = sharding.load_full_model(weights)
    else:
        model = RWKV7.from_pretrained(weights)
    if out is not None:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        model.save_official(out, dtype=dtype)
        print(f"wrote {out} ({args.dtype}) from {weights}")
    if args.safetensors is not None:  # fp32, as training checkpoints are
        model.save_pretrained(args.safetensors)
        if (weights / "run.json").is_file():  # the tokenizer name, for `rwkvslice generate`
            shutil.copyfile(weights / "run.json", Path(args.safetensors) / "run.json")
        print(f"wrote {Path(args.safetensors) / 'model.safetensors'} (fp32) from {weights}")
    return 0
