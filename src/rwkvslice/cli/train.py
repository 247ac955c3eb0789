"""`rwkvslice train`: train or fine-tune an RWKV-7 model with physical slicing (also under torchrun)."""

from __future__ import annotations

import argparse
import json
import os
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
    src.add_argument("--pack", action="store_true",
                     help="pack several short .jsonl samples into one window (exact: the state resets at each)")
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
    m.add_argument("--init-from", metavar="PATH",
                   help="fine-tune from an official RWKV-7 .pth or a Hugging Face-layout directory")

    t = p.add_argument_group("parameter-efficient fine-tuning (rwkvslice.peft)")
    t.add_argument("--tune", choices=("full", "lora", "state"), default="full",
                   help="what trains: every weight (default), LoRA adapters, or each layer's initial WKV "
                   "state (state: default --lr 1.0, --min-lr 0.01)")
    t.add_argument("--lora-r", type=int, default=None, metavar="N", help="LoRA rank (default 16)")
    t.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                   help="LoRA scaling alpha; the update is (alpha / r) B A (default 32)")
    t.add_argument("--lora-targets", default=None, metavar="LIST",
                   help="comma-separated linear layers of each block (default "
                   "att.receptance,att.key,att.value,att.output,ffn.key,ffn.value)")
    t.add_argument("--lora-init", choices=("lora", "pissa"), default=None,
                   help="lora: B = 0 (default); pissa: A, B from the top-r singular vectors of W, W - BA frozen")
    t.add_argument("--train-also", default=None, metavar="time,ln,emb,head",
                   help="with --tune lora: also train these parameter kinds in full")

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
    r.add_argument("--tensorboard", metavar="DIR", help="also write the metrics as TensorBoard scalars to DIR")

    e = p.add_argument_group("held-out evaluation")
    e.add_argument("--eval-data", metavar="PATH",
                   help="held-out .txt/.jsonl/binidx: its mean CE over kept tokens (eval_loss) is logged")
    e.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="evaluate every N steps and at the end (default: --save-every, else steps/10)")
    e.add_argument("--eval-batches", type=int, default=None, metavar="K",
                   help="score only the first K batches of --batch-size windows (default: all)")
    e.add_argument("--keep-best", action="store_true",
                   help="also keep the checkpoint with the lowest eval_loss, never rotated away (OUT/best.json)")

    s = p.add_argument_group("stopping")
    s.add_argument("--max-time", type=_duration, default=None, metavar="TIME",
                   help="after this wall time (2h30m, 90m, 45s or seconds) checkpoint and stop, as on SIGTERM")
    r.add_argument(
        "--eval-samples", type=int, default=None, metavar="N", help="--demo: held-out examples (default 200)"
    )
    p.set_defaults(run=run)


def _duration(text: str) -> float:
    from rwkvslice.train.stopping import parse_duration

    try:
        return parse_duration(text)
    except ConfigError as exc:  # argparse prints it as one usage-error line, exit status 2
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--max-time: ")) from None


def _config_from_args(args: argparse.Namespace):
    from rwkvslice.train.demo import DEMO_DEFAULTS
    from rwkvslice.train.trainer import TrainConfig

    if args.demo and args.data:
        raise ConfigError("--demo and --data are exclusive: --demo trains on the built-in task")
    if args.demo and args.init_from:
        raise ConfigError("--demo trains from scratch; --init-from needs --data")
    if args.init_from and args.model:
        raise ConfigError("--init-from takes the model shape from the checkpoint; drop --model")
    if not args.demo and not args.data:
        raise ConfigError("no training data: pass --data PATH or --demo")
    if args.demo and args.shard == "fsdp":
        raise ConfigError("--demo evaluates its small model in one process; --shard fsdp needs --data")
    base = TrainConfig(out=args.out)
    defaults = dict(DEMO_DEFAULTS) if args.demo else {}
    tune_values = _tune_values(args, base)
    if args.tune == "state" and args.lr is None:
        from rwkvslice.peft.run import STATE_LR, STATE_MIN_LR

        defaults.update(lr=STATE_LR, min_lr=STATE_MIN_LR if args.min_lr is None else args.min_lr)
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
        **tune_values,
        eval_data=args.eval_data,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        keep_best=args.keep_best,
        max_time=args.max_time,
        tensorboard=args.tensorboard,
        shard=args.shard,
        reshard_after_forward=args.reshard_after_forward,
        **values,
    )


def _tune_values(args: argparse.Namespace, base) -> dict:
    """--tune and its options; LoRA options without --tune lora are a mistake, not something to ignore."""
    lora = {"lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_targets": args.lora_targets,
            "lora_init": args.lora_init}
    given = [k for k, v in lora.items() if v is not None]
    if given and args.tune != "lora":
        raise ConfigError(f"--{given[0].replace('_', '-')} needs --tune lora (got --tune {args.tune})")
    if args.train_also is not None and args.tune == "state":
        raise ConfigError("--tune state trains only the initial state; drop --train-also (or use --tune lora)")
    values = {k: (v if v is not None else getattr(base, k)) for k, v in lora.items()}
    return {"tune": args.tune, "train_also": args.train_also or "", **values}


def run(args: argparse.Namespace) -> int:
    from rwkvslice.train.stopping import ForcedStop
    from rwkvslice.train.trainer import NonFiniteError, train

    cfg = _config_from_args(args)
    if args.demo:
        return _run_demo(cfg, args)
    try:
        result = train(cfg)
    except NonFiniteError as exc:
        print(f"rwkvslice: error: {exc}", file=sys.stderr)
        return 1
    except ForcedStop as exc:
        return _forced_stop(exc, cfg.out)
    if result.stopped:
        if result.is_main:
            print(f"{result.stopped} after step {result.step} of {cfg.steps}: checkpoint {result.checkpoint}; "
                  "resume with the same command and --resume", flush=True)
        return result.exit_code
    if result.is_main:
        print(f"done: step {result.step}, loss {result.last_loss:.4f}, checkpoint {result.checkpoint}")
    return 0


def _run_demo(cfg, args) -> int:
    import time

    from rwkvslice.data import DemoTask
    from rwkvslice.train import demo
    from rwkvslice.train.distributed import barrier, setup_distributed, teardown_distributed
    from rwkvslice.train.stopping import ForcedStop
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
        except ForcedStop as exc:
            return _forced_stop(exc, cfg.out)
        if result.stopped:
            if env.is_main:
                print(f"{result.stopped} after step {result.step} of {cfg.steps}: checkpoint "
                      f"{result.checkpoint}; resume with the same command and --resume", flush=True)
            return result.exit_code
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


def _forced_stop(exc, out: str) -> int:
    """A second signal while stopping: nothing new was saved; name the newest complete checkpoint."""
    from rwkvslice.train.checkpoint import latest_checkpoint

    newest = latest_checkpoint(Path(out) / "checkpoints")
    where = f"the newest complete checkpoint is {newest}" if newest else "no checkpoint was written yet"
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets here; rank 0 says it
        print(f"rwkvslice: {exc}: stopped at once without saving; {where}", file=sys.stderr, flush=True)
    return 128 + exc.signum
