"""`rwkvslice generate`: continue a prompt in RNN mode, streaming the text to stdout."""

from __future__ import annotations

import argparse
import sys

from rwkvslice.errors import ConfigError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text from a checkpoint (RNN mode, streamed)",
        description="Prefill the prompt in GPT mode, then sample one token at a time with model.step. "
                    "Stops at the end-of-document token or after --max-new-tokens.")
    p.add_argument("--ckpt", required=True, metavar="DIR",
                   help="a checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=0.85, help="nucleus sampling mass (default 0.85)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--tokenizer", choices=("byte", "world"), default=None,
                   help="default: the one the checkpoint was trained with")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--state", default=None, metavar="FILE",
                   help="start from this initial WKV state: a state file (RWKV-PEFT's "
                   "blocks.{i}.att.time_state .pth, or ours); replaces a --tune state run's own")
    p.set_defaults(run=run)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # maybe the first bytes of a character whose rest is still coming
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def run(args: argparse.Namespace) -> int:
    from rwkvslice.generate import check_sampling_args, generate
    from rwkvslice.generate.loading import load_model

    check_sampling_args(args.temperature, args.top_p, args.top_k)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, tok, _, _ = load_model(args.ckpt, device=args.device, tokenizer=args.tokenizer)
    if args.state is not None:
        from rwkvslice.peft import load_state_file, set_initial_state
        from rwkvslice.peft.state import state_shape

        set_initial_state(model, load_state_file(args.state, state_shape(model)))
    prompt = tok.encode(args.prompt)
    if not prompt:
        raise ConfigError("--prompt is empty")
    decoder = StreamDecoder(tok)

    def on_token(_seq: int, token: int) -> None:
        piece = decoder.push(token)
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()

    generate(model, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_p=args.top_p, top_k=args.top_k, eod_id=tok.eod_id, seed=args.seed, on_token=on_token)
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    return 0
