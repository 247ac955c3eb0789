"""Load a trained model and its tokenizer for inference (generate / eval / export commands)."""

from __future__ import annotations

from pathlib import Path

from rwkvslice.errors import ConfigError


def guess_tokenizer_name(vocab_size: int) -> str | None:
    """The tokenizer a model of this vocab most likely used when its run.json does not say."""
    from rwkvslice.data import ByteTokenizer, WorldTokenizer

    if vocab_size == WorldTokenizer.vocab_size:
        return "world"
    if vocab_size == ByteTokenizer.vocab_size:
        return "byte"
    return None


def load_model(ckpt: str | Path, *, device: str = "cpu", tokenizer: str | None = None):
    """(model in eval mode on `device`, tokenizer, weights directory, run_info).

    `ckpt` is a checkpoint directory, a run directory (its newest checkpoint) or a save_pretrained dir.
    For a `--tune lora|state` checkpoint the model is the tuned one: LoRA merged into the weights, or the
    tuned initial state used whenever no state is passed (`model.init_state(B)` returns it).
    The tokenizer comes from `tokenizer`, else the checkpoint's run.json, else the vocab size.
    """
    from rwkvslice.train.checkpoint import read_run_info, resolve_weights_dir
    from rwkvslice.train.distributed import resolve_device

    dev = resolve_device(device)
    weights = resolve_weights_dir(ckpt)
    run_info = read_run_info(weights)
    model = load_weights(weights, map_location=str(dev)).to(dev)
    model.eval()
    tok = resolve_tokenizer(model, run_info, tokenizer, ckpt)
    return model, tok, weights, run_info


def load_weights(weights: Path, map_location: str = "cpu"):
    """The model a weights directory holds: a --tune lora/state checkpoint's tuned model (its base plus the
    trainable tensors, LoRA merged), a --shard fsdp checkpoint reassembled, else the saved weights."""
    from rwkvslice.model import RWKV7
    from rwkvslice.peft.tuning import is_tuned_dir
    from rwkvslice.train import sharding

    if is_tuned_dir(weights):
        return load_tuned_model(weights)
    if sharding.is_sharded_checkpoint(weights):  # a --shard fsdp checkpoint: reassembled from the shards
        return sharding.load_full_model(weights)
    return RWKV7.from_pretrained(weights, map_location=map_location)


def resolve_tokenizer(model, run_info: dict, tokenizer: str | None, ckpt):
    """The tokenizer named by `tokenizer`, else the run's run.json, else guessed from the vocab size."""
    from rwkvslice.data import get_tokenizer

    name = tokenizer or run_info.get("tokenizer") or guess_tokenizer_name(model.config.vocab_size)
    if name is None:
        raise ConfigError(f"--ckpt {ckpt}: cannot tell which tokenizer the model (vocab "
                          f"{model.config.vocab_size}) uses; pass --tokenizer byte|world")
    tok = get_tokenizer(name)
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"--tokenizer {name}: its vocab ({tok.vocab_size}) is larger than the model's "
                          f"({model.config.vocab_size})")
    return tok


def load_tuned_model(directory: str | Path):
    """The tuned model of a LoRA / state checkpoint directory (on the CPU): the base it names (checked
    by sha256), the trainable tensors over it, LoRA merged (so RNN mode takes the fused fast path)."""
    import torch

    from rwkvslice.errors import CheckpointError
    from rwkvslice.model import RWKV7, RWKV7Config
    from rwkvslice.model.hf import load_base
    from rwkvslice.peft.files import sha256_file
    from rwkvslice.peft.lora import merge_lora
    from rwkvslice.peft.tuning import load_trainable, prepare, read_tuned, weights_sha256

    spec, base, tensors, factors = read_tuned(directory)
    if base.get("init_from"):
        path = Path(base["init_from"])
        if not path.exists():
            raise CheckpointError(f"{directory}: its base model {path} is missing (the checkpoint holds only "
                                  "the tuned tensors)")
        if sha256_file(path) != base.get("sha256"):
            raise CheckpointError(f"{directory}: its base model {path} has changed since training (sha256 "
                                  "differs)")
        model = load_base(path, RWKV7)  # an official .pth, an HF directory or one of ours, as --init-from
    else:  # a fresh model of the run's seed: rebuilt exactly as the trainer built it
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(base["seed"]))
            model = RWKV7(RWKV7Config.from_dict(base["config"]))
        if weights_sha256(model) != base.get("sha256"):
            raise CheckpointError(f"{directory}: cannot rebuild its freshly initialised base model "
                                  "(weights differ; another torch version?)")
    prepare(model, spec, pissa_factors=factors or None)
    load_trainable(model, tensors, str(directory))
    merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
