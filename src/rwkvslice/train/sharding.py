"""`--shard fsdp`: sharded data parallelism with FSDP2 (`fully_shard`) and sharded checkpoints (DCP).

DDP keeps a full copy of the weights, gradients and AdamW moments on every rank (16 bytes per fp32
parameter). FSDP2 shards all three over the ranks: each rank owns 1/world_size of every parameter (a
DTensor sharded on dim 0), all-gathers a block's parameters just before the block runs and frees them
after it (`reshard_after_forward`, ZeRO-3-like; off keeps them until backward, ZeRO-2-like), and
reduce-scatters the gradients so each rank receives only the slice it updates. The optimizer then runs
on the local shards (AdamW's per-tensor loop works on DTensors unchanged).

What the trainer needs from this module (the hooks are narrow on purpose):
- `check_launch`: refuse `--shard fsdp` where it cannot run (no distributed launch, no FSDP2).
- `shard_model`: `fully_shard` the embedding, each block and the head, then the root; `model.loss`
  registered as a forward method, since slicing calls it, not `forward`. bf16 goes
  through FSDP2's MixedPrecisionPolicy. The embedding is never gathered in backward, the head never for
  the loss (vocabulary-parallel, slicing.vocab_parallel), and on CPU the gradient reduction and the
  all-gathers avoid gloo's and FSDP's extra copies (`InPlaceReduceScatter`; reports/bench-fsdp.md).
- `ShardedLossModule`: the LossModule whose `no_sync()` turns the gradient reduce-scatter off on the
  non-final accumulation micro-batches (as DDP's `no_sync`).
- `save_shards` / `load_shards`: torch.distributed.checkpoint of the model and optimizer state; every
  rank writes its own shards, nothing is gathered on one rank. The checkpoint directory holds `dcp/`
  instead of model.safetensors + optimizer.pt (checkpoint.py publishes it atomically as usual). All ranks
  must see the same --out directory (one machine, or a shared file system).
- `gather_trainable` / `load_gathered_optimizer`: a tuned run (--tune lora|state) writes the usual tuned
  checkpoint instead (only the small trainable tensors and their optimizer state, gathered on rank 0).
- `load_full_model`: a sharded checkpoint as a plain RWKV7 in one process (for `rwkvslice export`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from rwkvslice.errors import CheckpointError, ConfigError
from rwkvslice.model import RWKV7, RWKV7Config
from rwkvslice.train.distributed import DistEnv, barrier
from rwkvslice.train.step import LossModule

SHARD_MODES = ("none", "fsdp")
SHARDED_DIR = "dcp"  # inside a checkpoint directory: the DCP files (.metadata + one .distcp per rank)


def fsdp_api(device: torch.device) -> SimpleNamespace:
    """FSDP2's entry points, or a ConfigError saying why this torch cannot shard on `device`.

    torch >= 2.6 exports FSDP2 from torch.distributed.fsdp and runs it on CPU (gloo) too; torch 2.5 has
    it only as torch.distributed._composable.fsdp, and that version runs only on CUDA ("FSDP requires
    CUDA for streams" at the first forward), so on CPU it is refused here instead.
    """
    try:
        from torch.distributed.fsdp import (  # type: ignore[attr-defined]
            FSDPModule,
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )
    except ImportError:
        if device.type == "cpu":
            raise ConfigError(f"--shard fsdp on CPU needs torch >= 2.6 (FSDP2 in torch {torch.__version__} "
                              "runs only on CUDA); use --shard none (DDP) or a newer torch") from None
        try:
            from torch.distributed._composable.fsdp import (  # type: ignore[no-redef]
                FSDPModule,
                MixedPrecisionPolicy,
                fully_shard,
                register_fsdp_forward_method,
            )
        except ImportError:
            raise ConfigError(f"--shard fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard), which torch "
                              f"{torch.__version__} lacks; use --shard none (DDP) or torch >= 2.6") from None
    return SimpleNamespace(FSDPModule=FSDPModule, MixedPrecisionPolicy=MixedPrecisionPolicy,
                           fully_shard=fully_shard, register_fsdp_forward_method=register_fsdp_forward_method)


def check_launch(shard: str, env: DistEnv) -> None:
    """Before any data or output: can `--shard` run in this launch?"""
    if shard not in SHARD_MODES:
        raise ConfigError(f"--shard must be one of {', '.join(SHARD_MODES)}, got {shard!r}")
    if shard == "fsdp":
        if not env.distributed:
            raise ConfigError("--shard fsdp shards over the processes of a distributed launch, and this is a "
                              "single process; run it under torchrun --nproc-per-node N (N >= 2)")
        fsdp_api(env.device)


def shard_model(model: RWKV7, env: DistEnv, *, precision: str = "fp32", reshard_after_forward: bool = True) -> None:
    """Shard `model` in place: one FSDP unit for the embedding, one per block (each all-gathered just
    before it runs) and one for the head, then the root (final norm, a tuned initial state). Parameters
    become DTensors holding this rank's shard.

    bf16: the all-gathered parameters are cast to bf16 for compute, gradients are reduced in fp32 and
    the sharded master weights (and so AdamW's moments) stay fp32. No GradScaler: bf16 has fp32's range.
    Frozen parameters (PEFT) are sharded like the rest; only trainable ones get gradients.
    """
    api = fsdp_api(env.device)
    if precision == "bf16":
        mp = api.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = api.MixedPrecisionPolicy()
    # the embedding and the head are units of their own, gathered only around their use (with a
    # 65536-token vocab each is as large as several blocks). The root (final norm, a tuned initial
    # state) is never resharded between forward and backward, so what stays in it stays whole all step.
    # Neither is needed whole in backward: the embedding's backward scatters rows of its gradient without
    # reading the weight, and the head's loss does not gather it at all (below). So both are freed right
    # after any forward (whatever --reshard-after-forward says: there is no re-gather to save) and never
    # gathered for backward: one V x C all-gather less per step for the embedding.
    api.fully_shard(model.emb, reshard_after_forward=True, mp_policy=mp)
    for block in model.blocks:
        api.fully_shard(block, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    api.fully_shard(model.head, reshard_after_forward=True, mp_policy=mp)
    for unit in (model.emb, model.head):
        if hasattr(unit, "set_unshard_in_backward"):  # (torch 2.13 has it; without it they are gathered as before)
            unit.set_unshard_in_backward(False)  # type: ignore[operator]
    api.fully_shard(model, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    if env.device.type == "cpu":
        for unit in (model.emb, *model.blocks, model.head, model):
            if hasattr(unit, "set_custom_reduce_scatter"):  # torch >= 2.8; older ones keep gloo's own
                unit.set_custom_reduce_scatter(InPlaceReduceScatter())
        # A synchronous all-gather keeps its flat output buffer (a second copy of the unit) until the
        # next unit's all-gather, so that on CUDA the copy-out can overlap it. The last unit gathered in
        # forward kept that copy through the whole sliced loss, the step's peak. CPU has no streams to
        # overlap, so free each buffer as soon as it is copied out (what FSDP does for an async
        # all-gather; gloo runs it at once either way).
        if hasattr(model, "_set_unshard_async_op"):
            model._set_unshard_async_op(True)  # type: ignore[operator]
    # Blocks 1..L-1 hand v_first (layer 0's values) on unchanged, and FSDP2 passes a unit's inputs through
    # an autograd Function (its post-backward hook), which makes that tensor a view: FSDP2 then warns, on
    # every run, that an in-place op on a view output would skip its hooks. Nothing modifies a block's
    # outputs in place (the shift states are copies, rwkv7.py), so this one warning says nothing here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor",
                            category=UserWarning)
    # slicing runs model.loss, never forward. model.loss runs head.loss, which is deliberately *not* an
    # FSDP forward method: the head is never gathered for the loss. Its weight stays the sharded DTensor,
    # and the sliced loss then runs vocabulary-parallel (slicing.vocab_parallel): every rank scores all
    # ranks' kept rows against its own V / world rows, and gets its rows' complete gradient in forward,
    # which autograd accumulates straight into the sharded .grad (nothing for FSDP to reduce-scatter).
    # That saves, per rank, the gathered V x C weight, the unsharded V x C gradient and FSDP's V x C
    # reduce-scatter buffer, early in backward when every activation is alive (reports/bench-fsdp.md).
    # head(x) (logits for generation) still gathers it through FSDP's forward hooks.
    api.register_fsdp_forward_method(model, "loss")


class InPlaceReduceScatter:
    """FSDP2's gradient reduce-scatter on CPU (gloo) as an in-place all-reduce of FSDP's buffer, keeping
    this rank's slice (FSDP's custom-comm interface: `allocate` and the call).

    gloo's reduce_scatter_single first copies its whole input: +386 MiB of max RSS for a 256 MiB input
    at 2 ranks, against +130 MiB for all_reduce in place (which was also faster, 0.47 s vs 0.78 s), and
    the embedding's gradient is such an input (V x C). The input is FSDP's private copy of the unsharded
    gradients, so reducing it in place loses nothing. gloo runs it synchronously: nothing is left in flight.
    """

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op, async_op: bool = False):
        import torch.distributed as dist

        dist.all_reduce(input_tensor, op=op, group=group)
        output_tensor.copy_(input_tensor.view(group.size(), -1)[group.rank()])
        return None


def is_sharded(model: nn.Module) -> bool:
    """Is `model` an FSDP2 module (its forwards are collectives: every rank must run the same number)?"""
    return callable(getattr(model, "set_requires_gradient_sync", None)) and callable(getattr(model, "unshard", None))


class ShardedLossModule(LossModule):
    """LossModule over a sharded model; `no_sync()` skips the gradient reduce-scatter of a micro-batch
    (its unsharded gradients accumulate locally until the final micro-batch reduces them all)."""

    @contextlib.contextmanager
    def no_sync(self):
        self.model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)  # type: ignore[operator]


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of the parameters and the optimizer state, and of the whole model (for
    tests and the benchmark: with FSDP each rank's share is about 1/world_size)."""
    params = list(model.parameters())
    local = sum(local_part(p).numel() * p.element_size() for p in params)
    full = sum(p.numel() * p.element_size() for p in params)
    state_local = state_full = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:  # moments (not the scalar step counts)
                state_local += local_part(v).numel() * v.element_size()
                state_full += v.numel() * v.element_size()
    return {"params_local": local, "params_full": full, "optim_local": state_local, "optim_full": state_full}


# ---------------------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint)


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)  # sharded: each rank's DTensor shards
    return {"model": model_sd, "optim": optim_sd}


def staging_dir(root: Path, step: int) -> Path:
    # a ".tmp-" name: clean_stale removes it when a process dies before checkpoint.py publishes it
    return Path(root) / f".tmp-shards-step-{step:08d}"


def save_shards(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                env: DistEnv) -> Path:
    """Collective: every rank writes its shards of the model and optimizer state into a staging
    directory under `root` (returned); rank 0 then moves it into the checkpoint (save_checkpoint's
    `sharded_state`), which appears atomically. DCP fsyncs every file it writes."""
    import torch.distributed.checkpoint as dcp

    staged = staging_dir(Path(root), step)
    if env.is_main:
        Path(root).mkdir(parents=True, exist_ok=True)
        if staged.exists():
            shutil.rmtree(staged)
    barrier(env)
    dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(staged))
    barrier(env)  # every rank's files are on disk before rank 0 publishes the directory
    return staged


# A tuned run (--tune lora|state) under FSDP: its checkpoint has exactly the layout of a non-sharded tuned
# run (peft.safetensors, peft.json, optimizer.pt; tuning.py), so export, eval, generate and the resume
# path read it unchanged. The trainable tensors are small (adapters, a state), so they and their AdamW
# moments are gathered whole onto rank 0 for writing, and never the frozen base, which the checkpoint
# identifies by its sha256 instead of storing it.


def gather_trainable(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Collective: (trainable tensors by name, optimizer state dict keyed by parameter name), whole and
    on the CPU of rank 0 ({} on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model_sd.items() if k in trainable}, optim_sd


def load_gathered_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Collective: restore an optimizer state written by gather_trainable (every rank read the whole
    file; each keeps its own shard of every moment)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    try:
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot restore the optimizer state of a sharded tuned run: "
                              f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc


def checkpoint_parts(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                     env: DistEnv) -> dict:
    """Collective, before rank 0 writes a checkpoint: save_checkpoint's keyword arguments for a sharded
    run (the DCP shards every rank wrote, or a tuned run's gathered trainable state)."""
    spec = getattr(model, "peft_spec", None)
    if spec is not None and spec.kind != "full":
        return {"tuned_state": gather_trainable(model, optimizer)}
    return {"sharded_state": save_shards(root, step, model, optimizer, env)}


def load_shards(ckpt: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: restore the model and optimizer shards of a sharded checkpoint written by the same
    number of ranks (the trainer refuses another world size: the data order would differ)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    sd = _state_dicts(model, optimizer)
    try:
        with _quiet_logging():
            dcp.load(sd, checkpoint_id=str(Path(ckpt) / SHARDED_DIR))
    except (Exception, dcp.CheckpointException) as exc:  # (CheckpointException is a BaseException)
        raise CheckpointError(f"{ckpt}: cannot read sharded checkpoint: {_describe(exc)}") from exc
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


@contextlib.contextmanager
def _quiet_logging():
    """DCP logs each failed read with its traceback (to the root logger) before raising; the caller
    turns the failure into one line, so those logs are held back while loading."""
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _describe(exc: BaseException) -> str:
    """One line: DCP wraps each rank's failure in a CheckpointException whose text is a traceback."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))  # (exception, traceback frames) of the first failed rank
        exc = first[0] if isinstance(first, tuple) else first
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def read_config(ckpt: str | Path) -> RWKV7Config:
    from rwkvslice.model.official import NATIVE_CONFIG_FILE

    path = Path(ckpt) / NATIVE_CONFIG_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        meta.pop("model_type", None)
        return RWKV7Config.from_dict(meta)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: cannot read the model config: {exc}".splitlines()[0]) from None


def load_full_model(ckpt: str | Path) -> RWKV7:
    """A sharded checkpoint as a plain RWKV7 on the CPU of one process (no process group): DCP
    reassembles every parameter from the ranks' shards straight into the model's tensors."""
    import torch.distributed.checkpoint as dcp

    model = RWKV7(read_config(ckpt))
    sd = {"model": model.state_dict()}
    try:
        with warnings.catch_warnings(), _quiet_logging():  # no process group: one process is the point
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(sd, checkpoint_id=str(Path(ckpt) / SHARDED_DIR))
    except (Exception, dcp.CheckpointException) as exc:
        raise CheckpointError(f"{ckpt}: cannot read sharded checkpoint: {_describe(exc)}") from exc
    model.load_state_dict(sd["model"])
    return model
