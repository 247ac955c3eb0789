"""`rwkvslice eval`: held-out exact match on the demo task, or the loss on a data file."""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--batch-size", type=int, default=None,
                   help="--data: windows per forward pass (default: the training --batch-size, else 16)")
    p.add_argument("--batches", type=int, default=None, metavar="K",
                   help="--data: score only the first K batches (default: all; for the training run's own "
                        "--eval-data, its --eval-batches)")
    p.add_argument("--out", metavar="FILE", help="also write the result JSON here")
    p.add_argument("--tokenizer", choices=("byte", "world"), default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rwkvslice.generate.loading import load_model
    from rwkvslice.train.checkpoint import atomic_write_text

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    for flag, value in (("--batch-size", args.batch_size), ("--batches", args.batches)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.out and not Path(args.out).parent.is_dir():
        raise ConfigError(f"--out {args.out}: directory {Path(args.out).parent} does not exist")
    model, tok, weights, run_info = load_model(args.ckpt, device=args.device, tokenizer=args.tokenizer)
    train_args = run_info.get("args", {})
    if args.data:
        # defaults follow the run that wrote the checkpoint, so this reproduces its eval_loss exactly
        ctx_len = args.ctx_len or train_args.get("ctx_len") or 256
        batch_size = args.batch_size or train_args.get("batch_size") or 16
        batches = args.batches
        if batches is None and train_args.get("eval_data") and _same_file(train_args["eval_data"], args.data):
            batches = train_args.get("eval_batches")
        result = data_loss(model, tok, args.data, ctx_len, batch_size, batches)
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


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:  # pragma: no cover - resolve() rarely fails
        return a == b


def data_loss(model, tokenizer, path: str, ctx_len: int, batch_size: int, max_batches: int | None = None) -> dict:
    """Mean CE over every kept target of the first `max_batches` batches of `path` (sliced; no full logits):
    the same function as the trainer's --eval-data (rwkvslice.train.evaluate)."""
    from rwkvslice.data import build_dataset
    from rwkvslice.train.evaluate import evaluate_loss

    dataset = build_dataset(path, tokenizer, ctx_len)
    ev = evaluate_loss(model, dataset, batch_size=batch_size, max_batches=max_batches)
    return {"loss": ev.loss, "perplexity": ev.ppl, "kept_tokens": ev.tokens, "windows": ev.windows,
            "batches": ev.batches, "batch_size": batch_size}
