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
    The tokenizer comes from `tokenizer`, else the checkpoint's run.json, else the vocab size.
    """
    from rwkvslice.data import get_tokenizer
    from rwkvslice.model import RWKV7
    from rwkvslice.train import sharding
    from rwkvslice.train.checkpoint import read_run_info, resolve_weights_dir
    from rwkvslice.train.distributed import resolve_device

    dev = resolve_device(device)
    weights = resolve_weights_dir(ckpt)
    run_info = read_run_info(weights)
    if sharding.is_sharded_checkpoint(weights):  # a --shard fsdp checkpoint
        model = sharding.load_full_model(weights).to(dev)
    else:
        model = RWKV7.from_pretrained(weights, map_location=str(dev))
    model.eval()
    name = tokenizer or run_info.get("tokenizer") or guess_tokenizer_name(model.config.vocab_size)
    if name is None:
        raise ConfigError(f"--ckpt {ckpt}: cannot tell which tokenizer the model (vocab "
                          f"{model.config.vocab_size}) uses; pass --tokenizer byte|world")
    tok = get_tokenizer(name)
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"--tokenizer {name}: its vocab ({tok.vocab_size}) is larger than the model's "
                          f"({model.config.vocab_size})")
    return model, tok, weights, run_info
