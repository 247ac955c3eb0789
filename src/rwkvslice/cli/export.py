"""`rwkvslice export`: write a checkpoint as an official RWKV-7 .pth (loads in the `rwkv` package) or as a
Hugging Face directory (loads in rwkv7-hf / transformers, see model/hf.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rwkvslice.errors import ConfigError

DTYPES = ("fp32", "bf16", "fp16")  # file dtypes; torch.<name> below, imported only once the flags are valid


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="convert a checkpoint to an official .pth or an HF directory",
                              description="Write the official x070 state-dict layout (RWKV-LM / rwkv package) "
                                          "or the Hugging Face layout (rwkv7-hf, fla-hub).")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a checkpoint or run directory")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--official", metavar="OUT.pth", help="output file")
    out.add_argument("--hf", metavar="OUT_DIR", help="output directory (must not exist, or be empty)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="tensor dtype in the file (default fp32)")
    p.add_argument("--tokenizer", choices=("byte", "world"), default=None,
                   help="--hf: the model's tokenizer when the checkpoint does not record it (world adds "
                        "rwkv7-hf's tokenizer files)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.hf is not None:
        return _export_hf(args, dtype)

    from rwkvslice.model import RWKV7
    from rwkvslice.train.checkpoint import resolve_weights_dir

    out = Path(args.official)
    if out.suffix != ".pth":
        raise ConfigError(f"--official {out}: the file name must end in .pth")
    if not out.parent.is_dir():
        raise ConfigError(f"--official {out}: directory {out.parent} does not exist")
    weights = resolve_weights_dir(args.ckpt)
    model = RWKV7.from_pretrained(weights)
    model.save_official(out, dtype=dtype)
    print(f"wrote {out} ({args.dtype}) from {weights}")
    return 0


def _export_hf(args: argparse.Namespace, dtype) -> int:
    from rwkvslice.generate.loading import load_model
    from rwkvslice.model.hf import check_exportable

    out = Path(args.hf)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--hf {out}: already exists and is not an empty directory")
    if not out.parent.is_dir():
        raise ConfigError(f"--hf {out}: directory {out.parent} does not exist")
    model, tok, weights, _ = load_model(args.ckpt, tokenizer=args.tokenizer)
    check_exportable(model.config, f"--hf {out}")
    model.save_hf(out, dtype=dtype, tokenizer=tok.name)
    files = "weights, config and tokenizer" if tok.name == "world" else "weights and config"
    print(f"wrote {out} ({args.dtype}; {files}) from {weights}")
    return 0
