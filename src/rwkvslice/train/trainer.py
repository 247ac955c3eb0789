"""The training loop behind `rwkvslice train`: setup, resume, steps, metrics, checkpoints.

Exact resume: everything a step depends on is either a pure function of the step number (the LR), or
saved in the checkpoint (weights, AdamW moments and step counts, the data position, every RNG). The
model has no dropout, AdamW runs its per-tensor loop (foreach=False), and a resumed run truncates
metrics.jsonl back to its checkpoint, so a run killed at any moment and resumed logs the same loss at
every step, bit for bit on CPU, as one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rwkvslice.errors import ConfigError, RWKVSliceError
from rwkvslice.model import RWKV7
from rwkvslice.peft import run as peft_run
from rwkvslice.peft.lora import DEFAULT_TARGETS, parse_targets
from rwkvslice.peft.tuning import TuneSpec, keep_frozen_in_bf16, parse_parts
from rwkvslice.train import checkpoint as ckpt_io
from rwkvslice.train import sharding
from rwkvslice.train.distributed import (
    DistEnv,
    all_gather_objects,
    barrier,
    broadcast_object,
    setup_distributed,
    teardown_distributed,
)
from rwkvslice.train.evaluate import HeldOutEval, metrics_of, write_best
from rwkvslice.train.metrics import MetricsLog, plot_loss
from rwkvslice.train.optim import DEFAULT_BETAS, DEFAULT_EPS, WarmupCosine, build_optimizer
from rwkvslice.train.rng import capture_rng_state, restore_rng_state, seed_everything
from rwkvslice.train.step import LossModule, check_precision, train_step
from rwkvslice.train.stopping import StopControl


class NonFiniteError(RWKVSliceError):
    """Training produced a non-finite loss or gradient; the message names the step and the tensor."""


@dataclass
class TrainConfig:
    """Every knob of a training run (the CLI flags, same names with underscores)."""

    out: str
    data: str | None = None
    tokenizer: str = "byte"
    model: str = "tiny"  # a preset name (RWKV7Config.preset) or a JSON config file
    init_from: str | None = None  # an official .pth or an HF-layout directory to fine-tune
    steps: int = 100
    ctx_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None  # default lr / 10
    warmup_steps: int | None = None  # default min(100, steps // 10)
    weight_decay: float = 1e-3
    adam_eps: float = DEFAULT_EPS
    betas: tuple[float, float] = DEFAULT_BETAS
    grad_clip: float = 1.0
    precision: str = "fp32"
    seed: int = 0
    save_every: int = 0  # 0: only at the end
    keep: int = 3
    resume: bool = False
    device: str = "auto"
    skip_nonfinite: bool = False
    pack: bool = False
    num_workers: int = 0
    progress: bool = True
    grad_checkpoint: bool = False  # recompute each block's forward in backward (less memory, ~1/3 more time)
    grad_checkpoint_len: int | None = None  # ... per segment of this many tokens (implies grad_checkpoint)
    # What trains (rwkvslice.peft): everything, LoRA adapters (+ --train-also kinds), or the initial state.
    tune: str = "full"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_targets: str = ",".join(DEFAULT_TARGETS)
    lora_init: str = "lora"
    train_also: str = ""
    eval_data: str | None = None  # held-out loss on this file (train/evaluate.py) ...
    eval_every: int | None = None  # ... every N steps and at the end (default: --save-every, else steps/10)
    eval_batches: int | None = None  # ... over its first K batches of batch_size windows (default all)
    keep_best: bool = False  # also keep the checkpoint of the lowest eval_loss (OUT/best.json)
    max_time: float | None = None  # seconds; then checkpoint and stop (train/stopping.py)
    tensorboard: str | None = None  # also write the metrics here (train/tensorboard.py)
    shard: str = "none"  # "none": DDP under torchrun; "fsdp": FSDP2 (train/sharding.py)
    reshard_after_forward: bool = True  # fsdp: free each block's gathered weights after its forward

    def tune_spec(self) -> TuneSpec:
        return TuneSpec(kind=self.tune, lora_r=self.lora_r, lora_alpha=self.lora_alpha,
                        lora_targets=parse_targets(self.lora_targets), lora_init=self.lora_init,
                        train_also=parse_parts(self.train_also))

    def resolved_min_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def resolved_warmup(self) -> int:
        return min(100, self.steps // 10) if self.warmup_steps is None else self.warmup_steps

    def resolved_eval_every(self) -> int:
        if self.eval_every is not None:
            return self.eval_every
        return self.save_every or max(1, self.steps // 10)


# Arguments a resumed run may change; any other difference would change the trajectory.
RESUME_MAY_CHANGE = {"steps", "save_every", "keep", "resume", "device", "skip_nonfinite", "num_workers",
                     "progress", "grad_checkpoint", "grad_checkpoint_len",  # memory settings; segments change
                     "max_time", "tensorboard",
                     "reshard_after_forward"}  # only decides when FSDP frees gathered weights
# gradients at rounding level only (a resume that keeps them stays bit-exact)


@dataclass
class TrainResult:
    out: Path
    step: int
    last_loss: float
    checkpoint: Path | None
    model: RWKV7
    tokenizer: object
    losses: list[float] = field(default_factory=list)
    is_main: bool = True  # rank 0 (or a single process)
    stopped: str | None = None  # why the run stopped before --steps ("stopped by SIGTERM", ...), else None
    exit_code: int = 0  # 128 + signal number after a signal, else 0


def validate(cfg: TrainConfig) -> None:
    check_precision(cfg.precision)
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ConfigError(f"--out {cfg.out} exists and is not a directory")
    positive = {"steps": cfg.steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                "keep": cfg.keep}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if cfg.grad_checkpoint_len is not None and cfg.grad_checkpoint_len < 1:
        raise ConfigError(f"--grad-checkpoint-len must be >= 1, got {cfg.grad_checkpoint_len}")
    if cfg.ctx_len < 2:
        raise ConfigError(f"--ctx-len must be >= 2, got {cfg.ctx_len}")
    if cfg.save_every < 0:
        raise ConfigError(f"--save-every must be >= 0 (0 = only at the end), got {cfg.save_every}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError(f"--lr must be a positive number, got {cfg.lr}")
    if not 0 <= cfg.resolved_min_lr() <= cfg.lr:
        raise ConfigError(f"--min-lr must be between 0 and --lr ({cfg.lr}), got {cfg.min_lr}")
    if cfg.resolved_warmup() < 0:
        raise ConfigError(f"--warmup-steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.grad_clip < 0:
        raise ConfigError(f"--grad-clip must be >= 0 (0 = off), got {cfg.grad_clip}")
    if cfg.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {cfg.num_workers}")
    if cfg.data is None:
        raise ConfigError("no training data: pass --data PATH (or --demo)")
    cfg.tune_spec().validate()
    for name in ("eval_every", "eval_batches"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.eval_data is None and (cfg.keep_best or cfg.eval_every is not None or cfg.eval_batches is not None):
        raise ConfigError("--keep-best, --eval-every and --eval-batches need --eval-data PATH")
    if cfg.max_time is not None and not cfg.max_time > 0:
        raise ConfigError(f"--max-time must be a positive duration, got {cfg.max_time}")
    if cfg.tensorboard is not None:
        from rwkvslice.train.tensorboard import check_available

        check_available()


def build_model_config(cfg: TrainConfig, vocab_size: int):
    from rwkvslice.model import RWKV7Config

    if cfg.model.endswith(".json") or Path(cfg.model).is_file():
        if not Path(cfg.model).is_file():
            raise ConfigError(f"--model {cfg.model}: no such config file")
        try:
            d = json.loads(Path(cfg.model).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--model {cfg.model}: not valid JSON (line {exc.lineno}, column {exc.colno}: "
                              f"{exc.msg})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--model {cfg.model}: cannot read it ({exc})") from None
        if isinstance(d, dict):
            d.pop("model_type", None)
            d.setdefault("vocab_size", vocab_size)
        try:
            config = RWKV7Config.from_dict(d)
        except ConfigError as exc:
            raise ConfigError(f"--model {cfg.model}: {exc}") from None
    else:
        try:
            config = RWKV7Config.preset(cfg.model, vocab_size)
        except ConfigError as exc:
            raise ConfigError(f"--model: {exc}") from None
    return config


def build_model(cfg: TrainConfig, tokenizer):

    if cfg.init_from:
        if not Path(cfg.init_from).exists():
            raise ConfigError(f"--init-from {cfg.init_from}: no such file")
        from rwkvslice.model.hf import load_base

        model = load_base(cfg.init_from, RWKV7)  # an official .pth, an HF directory or one of ours
    else:
        model = RWKV7(build_model_config(cfg, tokenizer.vocab_size))
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"the model's vocab_size {model.config.vocab_size} is smaller than the "
                          f"{tokenizer.name} tokenizer's {tokenizer.vocab_size}; use --tokenizer world?")
    return model


def _args_dict(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["betas"] = list(cfg.betas)
    return d


def _check_resume_args(cfg: TrainConfig, saved: dict, ckpt: Path, world_size: int) -> None:
    now = _args_dict(cfg)
    for key, value in saved.get("args", {}).items():
        if key in RESUME_MAY_CHANGE or key not in now:
            continue
        if now[key] != value:
            raise ConfigError(f"--resume: --{key.replace('_', '-')} is {now[key]!r} but {ckpt} was trained "
                              f"with {value!r}; resume with the same arguments")
    if saved.get("world_size", 1) != world_size:
        raise ConfigError(f"--resume: {ckpt} was written by {saved.get('world_size', 1)} process(es), "
                          f"this run has {world_size}; the data order would differ")


class _Progress:
    """tqdm bar on the main rank (or nothing)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, loss: float, tokens_per_s: float, kept_fraction: float, lr: float,
               eval_loss: float | None = None) -> None:
        if self.bar is not None:
            self.eval_loss = eval_loss if eval_loss is not None else getattr(self, "eval_loss", None)
            held_out = f" | eval {self.eval_loss:.4f}" if self.eval_loss is not None else ""
            self.bar.set_postfix_str(f"loss {loss:.4f}{held_out} | {tokens_per_s:,.0f} tok/s | kept "
                                     f"{kept_fraction:.0%} | lr {lr:.2e}", refresh=False)
            self.bar.update(1)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


StepHook = Callable[[int, torch.nn.Module], None]


def train(cfg: TrainConfig, *, after_step: StepHook | None = None, log: Callable[[str], None] | None = None,
          env: DistEnv | None = None) -> TrainResult:
    """Run (or resume) a training run described by `cfg`. Under torchrun, joins the process group.

    `after_step(step, model)` is called after every optimizer step (tests use it to inject faults).
    """
    validate(cfg)
    started = time.monotonic()  # --max-time counts from here
    own_env = env is None
    env = env or setup_distributed(cfg.device)
    try:
        sharding.check_launch(cfg.shard, env)
        return _train(cfg, env, after_step, log or (lambda m: print(m, file=sys.stderr)), started)
    finally:
        if own_env:
            teardown_distributed(env)


def _train(cfg: TrainConfig, env: DistEnv, after_step, log, started: float) -> TrainResult:
    from rwkvslice.data import ResumableLoader, build_dataset, get_tokenizer

    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    if env.is_main:
        ckpt_io.clean_stale(ckpt_root)
    barrier(env)

    latest = ckpt_io.latest_checkpoint(ckpt_root)
    latest = broadcast_object(None if latest is None else str(latest), env)
    if latest is not None and not cfg.resume:
        raise ConfigError(f"--out {out} already holds checkpoints ({Path(latest).name}); add --resume to "
                          "continue that run or choose another --out")

    tokenizer = get_tokenizer(cfg.tokenizer)
    dataset = build_dataset(cfg.data, tokenizer, cfg.ctx_len, pack=cfg.pack)
    if len(dataset) < cfg.batch_size * env.world_size:
        raise ConfigError(f"--data {cfg.data}: {len(dataset)} training windows, fewer than one batch "
                          f"({cfg.batch_size} x {env.world_size} process(es)); lower --batch-size")
    held_out = None
    if cfg.eval_data is not None:
        held_out = HeldOutEval(build_dataset(cfg.eval_data, tokenizer, cfg.ctx_len),
                               every=cfg.resolved_eval_every(), batch_size=cfg.batch_size,
                               max_batches=cfg.eval_batches, last_step=cfg.steps)
    seed_everything(cfg.seed)
    if latest is not None:
        optim_state, trainer_state, run_info = ckpt_io.load_trainer_files(latest, map_location=env.device)
        _check_resume_args(cfg, run_info, Path(latest), env.world_size)
        if sharding.is_sharded_checkpoint(latest):  # weights come from the shards once sharded (below)
            model = RWKV7(sharding.read_config(latest))
        elif cfg.tune == "full":
            model = RWKV7.from_pretrained(latest)
        else:  # the checkpoint holds only the trainable tensors: rebuild the base, check it, load them
            model = build_model(cfg, tokenizer)
            peft_run.attach(model, cfg.tune_spec(), init_from=cfg.init_from, model_arg=cfg.model,
                            seed=cfg.seed, resume_from=latest)
        start_step = int(trainer_state["step"])
        if start_step > cfg.steps:
            raise ConfigError(f"--steps {cfg.steps}: {latest} is already at step {start_step}")
        saved_threads = run_info.get("torch_threads")
        if env.is_main and saved_threads not in (None, torch.get_num_threads()):
            log(f"note: {latest} was trained with {saved_threads} torch thread(s), this process has "
                f"{torch.get_num_threads()}; CPU results then match only to rounding, not bit for bit")
    else:
        model = build_model(cfg, tokenizer)
        if cfg.tune != "full":
            peft_run.attach(model, cfg.tune_spec(), init_from=cfg.init_from, model_arg=cfg.model,
                            seed=cfg.seed, log=log if env.is_main else None)
        start_step = 0
    if cfg.shard == "none":  # fsdp: fully_shard moves each unit to the device as it shards it (below), so
        model.to(env.device)  # no process ever holds the whole model on its accelerator
    if cfg.tune != "full" and cfg.precision == "bf16" and env.device.type == "cuda" and cfg.shard == "none":
        keep_frozen_in_bf16(model)  # only trainable tensors need fp32 masters
    model.train()
    model.grad_checkpointing = cfg.grad_checkpoint or cfg.grad_checkpoint_len is not None
    model.grad_checkpoint_len = cfg.grad_checkpoint_len
    if cfg.shard == "fsdp":  # before the optimizer: it must hold the sharded parameters
        sharding.shard_model(model, env, precision=cfg.precision, reshard_after_forward=cfg.reshard_after_forward)

    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.adam_eps)
    schedule = WarmupCosine(optimizer, total_steps=cfg.steps, warmup_steps=cfg.resolved_warmup(),
                            min_lr_ratio=cfg.resolved_min_lr() / cfg.lr)
    loader = ResumableLoader(dataset, cfg.batch_size, seed=cfg.seed, rank=env.rank,
                             world_size=env.world_size, num_workers=cfg.num_workers)
    if latest is not None:
        if optim_state is None:  # a sharded checkpoint: weights and optimizer state from dcp/
            sharding.load_shards(latest, model, optimizer)
        elif cfg.shard == "fsdp":  # a sharded tuned run: the whole optimizer state, gathered when saved
            sharding.load_gathered_optimizer(model, optimizer, optim_state)
        else:
            optimizer.load_state_dict(optim_state)
        schedule.load_state_dict(trainer_state["schedule"])
        loader.load_state_dict(trainer_state["loader"])
        rngs = trainer_state["rng"]
        restore_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
        if held_out is not None:
            held_out.load_state_dict(trainer_state["eval"] if "eval" in trainer_state else {})  # older: none
        if env.is_main:
            log(f"resuming from {latest} (step {start_step})")

    loss_module: torch.nn.Module = LossModule(model)
    if cfg.shard == "fsdp":
        loss_module = sharding.ShardedLossModule(model)
    elif env.distributed:
        loss_module = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    # Created only now that the arguments, the data, the model and any resume are known to be good,
    # so a user error leaves no run directory behind.
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(env)
    metrics = MetricsLog(out / "metrics.jsonl") if env.is_main else None
    if metrics is not None:
        metrics.start(keep_up_to=start_step)
        if cfg.keep_best and held_out is not None and held_out.best_step is not None:  # as of the checkpoint
            write_best(out, held_out, ckpt_root / ckpt_io.step_dir_name(held_out.best_step))
        if start_step == 0 and cfg.resume:
            log(f"--resume: no checkpoint in {ckpt_root} yet; starting from step 0")
    tb = None
    if cfg.tensorboard is not None and env.is_main:
        from rwkvslice.train.tensorboard import TensorBoardLog

        tb = TensorBoardLog(cfg.tensorboard, first_step=start_step + 1)

    run_info = {"tokenizer": tokenizer.name, "args": _args_dict(cfg), "world_size": env.world_size,
                "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
                "dataset": dict(getattr(dataset, "stats", {}))}
    progress = _Progress(cfg.progress and env.is_main, cfg.steps, start_step)
    losses: list[float] = []
    last_ckpt: Path | None = Path(latest) if latest else None
    last_loss = float("nan")
    data_iter = iter(loader)
    stop = StopControl(env, cfg.max_time, start=started).install()  # SIGTERM/SIGINT: stop after the step
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            micro = [next(data_iter) for _ in range(cfg.grad_accum)]
            lr_factor = schedule.apply(step)
            stats = train_step(loss_module, optimizer, micro, env, precision=cfg.precision,
                               grad_clip=cfg.grad_clip)
            elapsed = time.perf_counter() - t0
            if stats.nonfinite and not cfg.skip_nonfinite:
                where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                raise NonFiniteError(f"step {step}: non-finite {stats.nonfinite}; stopped without updating "
                                     f"the weights ({where}; --skip-nonfinite skips such steps)")
            if after_step is not None:
                after_step(step, model)
            last_loss = stats.loss
            losses.append(stats.loss)
            tokens_per_s = stats.tokens / elapsed if elapsed > 0 else float("nan")
            kept_fraction = stats.kept_tokens / max(stats.tokens, 1)
            evaluated, new_best = (None, False)
            if held_out is not None and held_out.due(step):
                evaluated, new_best = held_out.run(step, model, env)
            if metrics is not None:
                record: dict = {
                    "step": step, "loss": stats.loss if math.isfinite(stats.loss) else None,
                    "lr": cfg.lr * lr_factor, "tokens": stats.tokens, "kept_tokens": stats.kept_tokens,
                    "kept_fraction": kept_fraction, "tokens_per_s": tokens_per_s,
                    "grad_norm": stats.grad_norm if math.isfinite(stats.grad_norm) else None,
                    "step_time_s": elapsed,
                }
                if stats.nonfinite:
                    record["skipped"] = stats.nonfinite
                    progress.write(f"step {step}: skipped (non-finite {stats.nonfinite})")
                if evaluated is not None:
                    record.update(metrics_of(evaluated))
                metrics.write(record)
                if tb is not None:
                    tb.write(record)
            progress.update(stats.loss, tokens_per_s, kept_fraction, cfg.lr * lr_factor,
                            evaluated.loss if evaluated is not None else None)

            last = step == cfg.steps  # a signal in the last step: the run simply ends, as planned
            stopping = not last and stop.should_stop()  # every rank the same answer
            keep_best = cfg.keep_best and new_best
            if last or (cfg.save_every and step % cfg.save_every == 0) or stopping or keep_best:
                last_ckpt = _save(ckpt_root, step, model, optimizer, schedule, loader, run_info, cfg, env,
                                  held_out)
                if keep_best and held_out is not None and env.is_main:
                    write_best(out, held_out, last_ckpt)
                # a signal during that save: stop now rather than after another (maybe long) step
                stopping = stopping or (not last and stop.should_stop())
            if stopping:
                break
        progress.close()
        if env.is_main:
            log(plot_loss(out / "metrics.jsonl", out / "loss.png"))
    finally:
        stop.restore()  # after the plot: a second signal until here still means ForcedStop, not a raw kill
        if tb is not None:
            tb.close()
        progress.close()
        if metrics is not None:
            metrics.close()

    stopped = stop.reason is not None
    return TrainResult(out=out, step=step if stopped else cfg.steps, last_loss=last_loss, checkpoint=last_ckpt,
                       model=model, tokenizer=tokenizer, losses=losses, is_main=env.is_main,
                       stopped=stop.describe() if stopped else None, exit_code=stop.exit_code)


def _save(root, step, model, optimizer, schedule, loader, run_info, cfg, env, held_out=None) -> Path:
    rngs = all_gather_objects(capture_rng_state(), env)  # collective: every rank takes part
    path = Path(root) / ckpt_io.step_dir_name(step)
    # fsdp: every rank writes its shards (or gathers a tuned run's trainable state) first, a collective;
    # rank 0 then publishes them with the rest
    parts = sharding.checkpoint_parts(root, step, model, optimizer, env) if cfg.shard == "fsdp" else {}
    if env.is_main:
        trainer_state = {"schedule": schedule.state_dict(), "loader": loader.state_dict(), "rng": rngs,
                         "eval": held_out.state_dict() if held_out is not None else {}}
        best = held_out.best_step if held_out is not None and cfg.keep_best else None
        path = ckpt_io.save_checkpoint(root, step, model=model, optimizer=optimizer,
                                       trainer_state=trainer_state, run_info=run_info, keep=cfg.keep,
                                       protect=() if best is None else (ckpt_io.step_dir_name(best),),
                                       **parts)
    barrier(env)
    return path
