"""``vl pretrain-text``: BERT-family pretraining on plain text (MLM, NSP/SOP, ELECTRA, causal and prefix LM)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vl.config import load_config


def _pretrain_text(args: argparse.Namespace) -> int:
    from vl.text.pretrain import TextPretrainConfig, pretrain_text

    cfg = load_config(TextPretrainConfig, args.config, args.set or [])
    result = pretrain_text(cfg, args.text, args.out, args.init)
    last = result.last
    summary = ", ".join(f"{key} {value:.4g}" for key, value in last.items()
                        if key not in ("step", "lr", "elapsed_s", "samples_per_s", "grad_norm"))
    print(f"pretrain-text: {Path(args.out)} at step {result.step}" + (f" ({summary})" if summary else ""))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain-text",
        help="pretrain the text core on plain text (or continue from --init: DAPT/TAPT)",
        description="Pretrain a BERT-family text encoder. Text files hold one sentence per line with a blank line "
                    "between documents; .tar webdataset shards contribute their .txt members. Resumes "
                    "automatically when --out already holds a checkpoint.",
    )
    parser.add_argument("--config", required=True, metavar="F", help="YAML config (e.g. configs/text-bert-tiny.yaml)")
    parser.add_argument("--text", nargs="+", required=True, metavar="FILES",
                        help="text files, .tar shards, globs, brace patterns or directories")
    parser.add_argument("--out", required=True, metavar="RUN", help="run directory")
    parser.add_argument("--init", metavar="CKPT",
                        help="start from a run directory of ours or a Hugging Face BERT directory")
    parser.add_argument("--set", action="append", metavar="K=V", help="override a config value (repeatable)")
    parser.set_defaults(func=_pretrain_text)
