"""The ``vl`` command. Each subcommand lives in its own module under ``vl/cli/`` and registers itself here.

Contract (docs/cli.md): every command has ``--help``, exits non-zero with a one-line error naming the bad
input, and writes outputs through a temporary name and a rename.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from vl.errors import UserError

# Each module's ``add_parser(subparsers)`` registers its subcommand(s) and sets ``func`` on its parser.
# Imported explicitly, in the order ``vl --help`` lists them.
from vl.cli import compress as _compress
from vl.cli import convert as _convert
from vl.cli import demo as _demo
from vl.cli import evaluate as _evaluate
from vl.cli import finetune as _finetune
from vl.cli import plot as _plot
from vl.cli import predict as _predict
from vl.cli import pretrain as _pretrain
from vl.cli import pretrain_text as _pretrain_text
from vl.cli import serve as _serve
from vl.cli import tokenizer as _tokenizer
from vl.cli import vqa as _vqa
from vl.cli import world as _world

COMMAND_MODULES = [_tokenizer, _world, _convert, _pretrain_text, _finetune, _predict, _evaluate, _pretrain, _plot,
                   _vqa, _serve, _compress, _demo]


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line naming the bad input (the contract), not the usage
    text; ``--help`` is unchanged. Subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message.splitlines()[0] if message else 'bad arguments'} "
                     f"(see {self.prog} --help)\n")


def build_parser(prog: str, modules, description: str) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=description)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in modules:
        module.add_parser(subparsers)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, dispatch and turn user errors into one line on stderr and a non-zero exit."""
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        return int(func(args) or 0)
    except (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"{parser.prog} {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    description = "vl: vision-language pretraining, fine-tuning and serving, with a BERT-family text core."
    return run(build_parser("vl", COMMAND_MODULES, description), argv)


if __name__ == "__main__":
    sys.exit(main())
