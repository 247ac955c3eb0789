"""`rwkvslice data prepare INPUT --out PREFIX [--tokenizer byte|world]`: .txt/.jsonl -> binidx."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare training data",
                              description="Data tools. `data prepare` tokenises a .txt or .jsonl file "
                                          "into binidx (PREFIX.bin + PREFIX.idx) for `train --data PREFIX`.")
    actions = p.add_subparsers(dest="data_command", metavar="ACTION")
    actions.required = True
    prep = actions.add_parser("prepare", help="tokenise INPUT (.txt or .jsonl with \"text\" records) "
                                              "into binidx",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    prep.add_argument("input", metavar="INPUT", help=".txt (documents separated by blank lines) or .jsonl")
    prep.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.bin, PREFIX.idx, "
                                                                      "PREFIX.json")
    prep.add_argument("--tokenizer", default="byte", choices=["byte", "world"],
                      help="must match `train --tokenizer`")
    p.set_defaults(run=run)


def run(args) -> int:
    from rwkvslice.data.prepare import prepare

    result = prepare(args.input, args.out, args.tokenizer)
    print(f"wrote {result['prefix']}.bin/.idx: {result['sequences']} documents, {result['tokens']} tokens "
          f"({result['tokenizer']} tokenizer)")
    return 0
