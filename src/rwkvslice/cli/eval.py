"""`rwkvslice eval`: held-out exact match on the demo task, or the loss on a data file."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rwkvslice.errors import ConfigError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint (demo task exact match, or loss on --data)",
        description="Without --data: greedy RNN-mode generation on held-out examples of the built-in demo "
                    "task, scored by exact match. With --data: mean cross-entropy over kept tokens.")
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a checkpoint or run directory")
    p.add_argument("--n", type=int, default=200, help="demo: held-out examples (default 200)")
    p.add_argument("--seed", type=int, default=None, help="demo task seed (default: the training --seed)")
    p.add_argument("--data", metavar="PATH", help="evaluate the loss on this .txt/.jsonl/binidx instead")
    p.add_argument("--ctx-len", type=int, default=None, help="--data: window length (default: training's)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default 16)")
    p.add_argument("--out", metavar="FILE", help="also write the result JSON here")
    p.add_argument("--tokenizer", choices=("byte", "world"), default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rwkvslice.generate.loading import load_model
    from rwkvslice.train.checkpoint import atomic_write_text

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out and not Path(args.out).parent.is_dir():
        raise ConfigError(f"--out {args.out}: directory {Path(args.out).parent} does not exist")
    model, tok, weights, run_info = load_model(args.ckpt, device=args.device, tokenizer=args.tokenizer)
    train_args = run_info.get("args", {})
    if args.data:
        ctx_len = args.ctx_len or train_args.get("ctx_len") or 256
        result = data_loss(model, tok, args.data, ctx_len, args.batch_size)
    else:
        from rwkvslice.data import DemoTask
        from rwkvslice.train.demo import evaluate_task

        seed = args.seed if args.seed is not None else train_args.get("seed", 0)
        result = evaluate_task(model, tok, DemoTask(seed=seed), args.n)
    result["checkpoint"] = str(weights)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0


def data_loss(model, tokenizer, path: str, ctx_len: int, batch_size: int) -> dict:
    """Mean CE over every kept target of every window of `path` (sliced; no full logits)."""
    import torch

    from rwkvslice.data import build_dataset
    from rwkvslice.data.loader import collate

    dataset = build_dataset(path, tokenizer, ctx_len)
    device = next(model.parameters()).device
    total, kept = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            idx, targets = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            n = int((targets != -100).sum())
            if n == 0:  # pragma: no cover - build_dataset keeps only windows with a target
                continue
            loss = model.loss(idx.to(device), targets.to(device))
            total += float(loss) * n
            kept += n
    mean = total / kept if kept else float("nan")
    return {"loss": mean, "perplexity": math.exp(mean) if kept else None, "kept_tokens": kept,
            "windows": len(dataset)}
