"""`rwkvslice train`: train or fine-tune an RWKV-7 model with physical slicing (also under torchrun)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rwkvslice.errors import ConfigError
from rwkvslice.model import PRESETS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (or --demo: the built-in task end to end)",
        description="Train an RWKV-7 model. The LM head and loss run only on positions with a target "
        "(physical slicing). Under torchrun the same command trains with DDP.",
    )
    src = p.add_argument_group("data")
    src.add_argument(
        "--demo",
        action="store_true",
        help="train on the built-in key-value task, then evaluate held-out exact match "
        "(its defaults: --model demo --steps 500 --batch-size 32 --lr 1e-3)",
    )
    src.add_argument("--data", metavar="PATH", help=".txt, .jsonl or a binidx prefix (PREFIX.bin/.idx)")
    src.add_argument("--tokenizer", choices=("byte", "world"), default=None, help="default: byte")
    src.add_argument("--ctx-len", type=int, default=None, metavar="T", help="tokens per window (default 256)")
    src.add_argument("--pack", action="store_true", help="pack several short samples into one window")
    src.add_argument(
        "--num-workers", type=int, default=0, metavar="N", help="data-loader worker processes (default 0)"
    )

    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        default=None,
        metavar="PRESET|FILE.json",
        help=f"size preset ({', '.join(PRESETS)}; default tiny) or a JSON config file "
        "(RWKV7Config fields; vocab_size defaults to the tokenizer's)",
    )
    m.add_argument("--init-from", metavar="PTH", help="fine-tune from an official RWKV-7 .pth")

    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=None, metavar="N", help="optimizer steps (default 100)")
    o.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="B",
        help="windows per micro-batch per process (default 4)",
    )
    o.add_argument(
        "--grad-accum", type=int, default=1, metavar="N", help="micro-batches per optimizer step (default 1)"
    )
    o.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3); att.w0 gets 2x")
    o.add_argument("--min-lr", type=float, default=None, help="final LR of the cosine decay (default lr/10)")
    o.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        metavar="N",
        help="linear warmup (default min(100, steps/10))",
    )
    o.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        metavar="WD",
        help="AdamW decay on 2-D .weight matrices only (default 1e-3)",
    )
    o.add_argument(
        "--adam-eps",
        type=float,
        default=1e-8,
        metavar="EPS",
        help="default 1e-8 (the official demo uses 1e-18)",
    )
    o.add_argument(
        "--grad-clip",
        type=float,
        default=1.0,
        metavar="NORM",
        help="max gradient norm, 0 = off (default 1.0)",
    )
    o.add_argument(
        "--precision",
        default="fp32",
        metavar="fp32|bf16",
        help="fp32 or bf16 (autocast, fp32 master weights)",
    )
    o.add_argument("--seed", type=int, default=0, help="initialisation and data order (default 0)")
    o.add_argument(
        "--grad-checkpoint",
        action="store_true",
        help="activation checkpointing per block: recompute each block in backward (less memory, more time)",
    )
    o.add_argument(
        "--grad-checkpoint-len",
        type=int,
        default=None,
        metavar="N",
        help="checkpoint per block and per segment of N tokens (implies --grad-checkpoint; least memory)",
    )
    o.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip a step whose loss or gradient is not finite instead of stopping",
    )

    d = p.add_argument_group("distributed (under torchrun)")
    d.add_argument(
        "--shard",
        choices=("none", "fsdp"),
        default="none",
        help="none: DDP, a full copy of weights, gradients and AdamW state per process (default); fsdp: "
        "FSDP2 shards all three over the processes (for models too large for DDP)",
    )
    d.add_argument(
        "--reshard-after-forward",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fsdp: free each block's gathered weights after its forward and gather them again in "
        "backward (default; least memory); --no-reshard-after-forward keeps them (less communication)",
    )

    r = p.add_argument_group("output")
    r.add_argument("--out", required=True, metavar="DIR", help="run directory (checkpoints, metrics.jsonl)")
    r.add_argument(
        "--save-every",
        type=int,
        default=None,
        metavar="N",
        help="checkpoint every N steps (default: only at the end)",
    )
    r.add_argument("--keep", type=int, default=3, metavar="K", help="keep the newest K checkpoints")
    r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    r.add_argument("--device", default="auto", metavar="DEV", help="auto, cpu, cuda or cuda:N (default auto)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument(
        "--eval-samples", type=int, default=None, metavar="N", help="--demo: held-out examples (default 200)"
    )
    p.set_defaults(run=run)


def _config_from_args(args: argparse.Namespace):
    from rwkvslice.train.demo import DEMO_DEFAULTS
    from rwkvslice.train.trainer import TrainConfig

    if args.demo and args.data:
        raise ConfigError("--demo and --data are exclusive: --demo trains on the built-in task")
    if args.demo and args.init_from:
        raise ConfigError("--demo trains from scratch; --init-from needs --data")
    if args.init_from and args.model:
        raise ConfigError("--init-from takes the model shape from the .pth; drop --model")
    if not args.demo and not args.data:
        raise ConfigError("no training data: pass --data PATH or --demo")
    if args.demo and args.shard == "fsdp":
        raise ConfigError("--demo evaluates its small model in one process; --shard fsdp needs --data")
    base = TrainConfig(out=args.out)
    defaults = dict(DEMO_DEFAULTS) if args.demo else {}
    values: dict = {}
    for name in (
        "tokenizer",
        "model",
        "steps",
        "ctx_len",
        "batch_size",
        "lr",
        "min_lr",
        "warmup_steps",
        "weight_decay",
        "save_every",
    ):
        given = getattr(args, name)
        values[name] = given if given is not None else defaults.get(name, getattr(base, name))
    if args.demo and values["tokenizer"] != "byte":
        raise ConfigError("--demo uses the byte tokenizer; drop --tokenizer")
    return TrainConfig(
        out=args.out,
        data=args.data,
        init_from=args.init_from,
        grad_accum=args.grad_accum,
        adam_eps=args.adam_eps,
        grad_clip=args.grad_clip,
        precision=args.precision,
        seed=args.seed,
        keep=args.keep,
        resume=args.resume,
        device=args.device,
        skip_nonfinite=args.skip_nonfinite,
        pack=args.pack,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        grad_checkpoint=args.grad_checkpoint,
        grad_checkpoint_len=args.grad_checkpoint_len,
        shard=args.shard,
        reshard_after_forward=args.reshard_after_forward,
        **values,
    )


def run(args: argparse.Namespace) -> int:
    from rwkvslice.train.trainer import NonFiniteError, train

    cfg = _config_from_args(args)
    if args.demo:
        return _run_demo(cfg, args)
    try:
        result = train(cfg)
    except NonFiniteError as exc:
        print(f"rwkvslice: error: {exc}", file=sys.stderr)
        return 1
    if result.is_main:
        print(f"done: step {result.step}, loss {result.last_loss:.4f}, checkpoint {result.checkpoint}")
    return 0


def _run_demo(cfg, args) -> int:
    import time

    from rwkvslice.data import DemoTask
    from rwkvslice.train import demo
    from rwkvslice.train.distributed import barrier, setup_distributed, teardown_distributed
    from rwkvslice.train.trainer import NonFiniteError, train, validate

    if args.eval_samples is not None and args.eval_samples < 1:
        raise ConfigError(f"--eval-samples must be >= 1, got {args.eval_samples}")
    t0 = time.perf_counter()
    task = DemoTask(seed=cfg.seed)
    if args.ctx_len is None:
        cfg.ctx_len = demo.demo_ctx_len(task)
    cfg.data = str(demo.demo_data_path(Path(cfg.out)))
    validate(cfg)  # before anything is written
    env = setup_distributed(cfg.device)
    try:
        if env.is_main:
            demo.write_demo_data(Path(cfg.out), task)
        barrier(env)
        if env.is_main:
            print(
                f"demo: key-value retrieval, e.g. {task.samples(1)[0]!r}; model preset {cfg.model!r}, "
                f"{cfg.steps} steps of {cfg.batch_size} x {cfg.ctx_len} tokens",
                file=sys.stderr,
            )
        try:
            result = train(cfg, env=env)
        except NonFiniteError as exc:
            print(f"rwkvslice: error: {exc}", file=sys.stderr)
            return 1
        if not env.is_main:
            return 0
        kept_fraction = _dataset_kept_fraction(Path(cfg.out))
        cfgm = result.model.config
        print(
            demo.slicing_memory_note(
                batch_size=cfg.batch_size,
                ctx_len=cfg.ctx_len,
                vocab_size=cfgm.vocab_size,
                n_embd=cfgm.n_embd,
                kept_fraction=kept_fraction,
            )
        )
        ev = demo.evaluate_task(
            result.model, result.tokenizer, task, args.eval_samples or demo.DEMO_EVAL_SAMPLES
        )
        demo.write_eval(Path(cfg.out) / "eval.json", ev)
        for ex in ev["examples"][:3]:
            mark = "ok" if ex["correct"] else "WRONG"
            print(f"  {ex['prompt']!r} -> {ex['generated']!r} (expected {ex['expected']!r}, {mark})")
        print(
            f"held-out exact match: {ev['exact_match']:.3f} on {ev['n']} examples -> "
            f"{Path(cfg.out) / 'eval.json'} ({time.perf_counter() - t0:.0f} s in all)"
        )
        return 0
    finally:
        teardown_distributed(env)


def _dataset_kept_fraction(out: Path) -> float:
    """Kept-token fraction of the run's training windows, from metrics.jsonl (tokens, kept_tokens)."""
    tokens = kept = 0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        tokens += rec.get("tokens", 0)
        kept += rec.get("kept_tokens", 0)
    return kept / tokens if tokens else 0.0
