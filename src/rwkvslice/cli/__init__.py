"""`rwkvslice` command line: one module per subcommand, each with `add_parser(subparsers)` and `run(args)`.

User mistakes (bad flags, bad files, broken checkpoints) print one line, `rwkvslice: error: ...`, and
exit with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rwkvslice.errors import RWKVSliceError

# subcommand name -> module under rwkvslice.cli (each defines add_parser(subparsers) and run(args) -> int)
COMMANDS = {
    "train": "rwkvslice.cli.train",
    "data": "rwkvslice.cli.data",
    "generate": "rwkvslice.cli.generate",
    "eval": "rwkvslice.cli.eval",
    "export": "rwkvslice.cli.export",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rwkvslice", description="RWKV-7 training and inference with physical slicing.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a subcommand still being written
            if exc.name != module_name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except RWKVSliceError as exc:
        print(f"rwkvslice: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rwkvslice: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
