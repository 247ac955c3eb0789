"""`rwkvslice export`: write a checkpoint as an official RWKV-7 .pth (loads in the `rwkv` package), a tuned
state in RWKV-PEFT's layout, or a Hugging Face directory (loads in rwkv7-hf / transformers, model/hf.py).
A `--tune lora` checkpoint is exported with its adapters merged."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from rwkvslice.errors import ConfigError

DTYPES = ("fp32", "bf16", "fp16")  # file dtypes; torch.<name> below, imported only once the flags are valid


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="convert a checkpoint to an official .pth, a state file or an HF "
                              "directory", description="Write the official x070 state-dict layout (RWKV-LM / "
                              "rwkv package), a tuned state (RWKV-PEFT's layout) or the Hugging Face layout "
                              "(rwkv7-hf, fla-hub).")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a checkpoint or run directory")
    p.add_argument("--official", metavar="OUT.pth",
                   help="a full official checkpoint (a LoRA run's adapters merged: W + (alpha/r) BA)")
    p.add_argument("--state", metavar="OUT.pth",
                   help="a --tune state run's initial state in RWKV-PEFT's layout: blocks.{i}.att.time_state "
                   "(H, N, N) fp32")
    p.add_argument("--hf", metavar="OUT_DIR", help="a Hugging Face directory (must not exist, or be empty)")
    p.add_argument("--safetensors", metavar="DIR", help="our own directory (rwkvslice_model.safetensors + "
                   "rwkvslice_config.json + run.json), the layout `generate --ckpt` and RWKV7.from_pretrained read; "
                   "e.g. a --shard fsdp checkpoint reassembled")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="tensor dtype in the file (default fp32)")
    p.add_argument("--tokenizer", choices=("byte", "world"), default=None,
                   help="--hf: the model's tokenizer when the checkpoint does not record it (world adds "
                        "rwkv7-hf's tokenizer files)")
    p.set_defaults(run=run)


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output path is checked before anything is loaded or written (and before torch is imported)."""
    if args.official is None and args.state is None and args.hf is None and args.safetensors is None:
        raise ConfigError("nothing to export: pass --official OUT.pth, --state OUT.pth, --hf OUT_DIR and/or "
                          "--safetensors DIR")
    for flag, name in (("--official", args.official), ("--state", args.state)):
        if name is None:
            continue
        out = Path(name)
        if out.suffix != ".pth":
            raise ConfigError(f"{flag} {out}: the file name must end in .pth")
        if not out.parent.is_dir():
            raise ConfigError(f"{flag} {out}: directory {out.parent} does not exist")
    if args.safetensors is not None and Path(args.safetensors).is_file():
        raise ConfigError(f"--safetensors {args.safetensors} is a file; it names a directory")
    if args.hf is not None:
        out = Path(args.hf)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"--hf {out}: already exists and is not an empty directory")
        if not out.parent.is_dir():
            raise ConfigError(f"--hf {out}: directory {out.parent} does not exist")


def run(args: argparse.Namespace) -> int:
    _check_outputs(args)
    import torch  # only now: argument errors answer without paying for it

    from rwkvslice.generate.loading import load_weights, resolve_tokenizer
    from rwkvslice.model.hf import check_exportable
    from rwkvslice.peft import save_state_file, set_initial_state
    from rwkvslice.train.checkpoint import read_run_info, resolve_weights_dir

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    weights = resolve_weights_dir(args.ckpt)
    model = load_weights(weights)  # tuned (LoRA merged) or sharded checkpoints too
    tok = None
    if args.hf is not None:  # refusals first, so that nothing is written when one output cannot be
        tok = resolve_tokenizer(model, read_run_info(weights), args.tokenizer, args.ckpt)
        check_exportable(model.config, f"--hf {args.hf}")
    tuned_state = model.initial_state
    if args.state is not None:
        if tuned_state is None:
            raise ConfigError(f"--state: {weights} has no tuned initial state (not a --tune state run)")
        save_state_file(tuned_state, args.state)
        print(f"wrote {args.state} (tuned state, {model.config.n_layer} x blocks.i.att.time_state) from {weights}")
    set_initial_state(model, None)  # neither weight layout holds an initial state (that is --state's file)
    if tuned_state is not None and (args.official or args.hf or args.safetensors) and args.state is None:
        print("note: the tuned initial state is not part of the weights; write it with --state OUT.pth")
    if args.official is not None:
        model.save_official(Path(args.official), dtype=dtype)
        print(f"wrote {args.official} ({args.dtype}) from {weights}")
    if args.hf is not None:
        assert tok is not None
        model.save_hf(Path(args.hf), dtype=dtype, tokenizer=tok.name)
        files = "weights, config and tokenizer" if tok.name == "world" else "weights and config"
        print(f"wrote {args.hf} ({args.dtype}; {files}) from {weights}")
    if args.safetensors is not None:  # fp32, as training checkpoints are
        model.save_pretrained(args.safetensors)
        if (weights / "run.json").is_file():  # the tokenizer name, for `rwkvslice generate`
            shutil.copyfile(weights / "run.json", Path(args.safetensors) / "run.json")
        print(f"wrote {args.safetensors} (fp32, rwkvslice layout) from {weights}")
    return 0
