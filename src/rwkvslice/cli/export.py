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
    p.add_argument("--official", required=True, metavar="OUT.pth", help="output file")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="tensor dtype in the file (default fp32)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from rwkvslice.model import RWKV7
    from rwkvslice.train import sharding
    from rwkvslice.train.checkpoint import resolve_weights_dir

    out = Path(args.official)
    if out.suffix != ".pth":
        raise ConfigError(f"--official {out}: the file name must end in .pth")
    if not out.parent.is_dir():
        raise ConfigError(f"--official {out}: directory {out.parent} does not exist")
    weights = resolve_weights_dir(args.ckpt)
    if sharding.is_sharded_checkpoint(weights):  # --shard fsdp: reassembled from the ranks' shards
        model = sharding.load_full_model(weights)
    else:
        model = RWKV7.from_pretrained(weights)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model.save_official(out, dtype=dtype)
    print(f"wrote {out} ({args.dtype}) from {weights}")
    return 0
