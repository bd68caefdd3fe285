"""``vl tokenizer train|encode``: learn a WordPiece vocabulary, and print token ids per line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vl.errors import UserError
from vl.text.tokenizer import Tokenizer


def _train(args: argparse.Namespace) -> int:
    tokenizer = Tokenizer.train(args.text, args.vocab_size, lowercase=not args.cased, min_frequency=args.min_frequency)
    tokenizer.save(args.out)
    casing = "cased" if args.cased else "uncased"
    print(f"wrote {Path(args.out) / 'vocab.txt'} ({tokenizer.vocab_size} tokens, {casing})")
    return 0


def _encode(args: argparse.Namespace) -> int:
    tokenizer = Tokenizer.from_dir(args.tokenizer)
    if args.text is None or args.text == "-":
        lines = (line.rstrip("\n") for line in sys.stdin)
    else:
        path = Path(args.text)
        if not path.is_file():
            raise UserError(f"--text file not found: {path}")
        lines = (line.rstrip("\n") for line in path.open(encoding="utf-8", errors="replace"))
    for line in lines:
        ids = tokenizer.encode(line, max_len=args.max_len).ids
        sys.stdout.write(json.dumps(ids) + "\n")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train a WordPiece vocabulary or encode text")
    commands = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    commands.required = True

    train = commands.add_parser("train", help="train a WordPiece vocabulary and write a BERT-style vocab.txt")
    train.add_argument("--text", nargs="+", required=True, metavar="FILE", help="plain-text files")
    train.add_argument("--vocab-size", type=int, required=True, help="largest vocabulary size")
    train.add_argument("--out", required=True, help="output directory (vocab.txt, tokenizer_config.json)")
    train.add_argument("--cased", action="store_true", help="keep case (default: lower-case, like bert-base-uncased)")
    train.add_argument("--min-frequency", type=int, default=2, help="least count for a merged piece (default 2)")
    train.set_defaults(func=_train)

    encode = commands.add_parser("encode", help="print one JSON list of token ids per input line")
    encode.add_argument("--tokenizer", required=True, metavar="DIR", help="a directory holding vocab.txt")
    encode.add_argument("--text", metavar="FILE", help="input file (default: stdin)")
    encode.add_argument("--max-len", type=int, default=None, help="truncate to this many ids")
    encode.set_defaults(func=_encode)
