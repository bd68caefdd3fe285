"""``vl pretrain``: vision-language pretraining on image-caption shards joined with a region feature store."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vl.errors import UserError


def _pretrain(args: argparse.Namespace) -> int:
    from vl.config import load_config
    from vl.train.pretrain_config import VLPretrainConfig
    from vl.train.pretrain_vl import pretrain_vl

    cfg = load_config(VLPretrainConfig, args.config, args.set or [])
    shards, captions = args.shards, args.captions
    if shards is not None and captions is None and shards.lower().endswith(".json"):
        shards, captions = None, shards  # a COCO captions file given as --shards
    if shards is None and captions is None:
        raise UserError("give --shards PATTERN (image-caption shards) or --captions JSON (COCO captions)")
    result = pretrain_vl(cfg, args.out, args.features, shards=shards, captions=captions, init=args.init,
                         tokenizer_dir=args.tokenizer, val_shards=args.val_shards, val_batches=args.val_batches,
                         questions=args.questions, annotations=args.annotations)
    last = result.last
    summary = ", ".join(f"{key} {value:.4g}" for key, value in last.items()
                        if key not in ("step", "lr", "elapsed_s", "samples_per_s", "grad_norm"))
    if int(os.environ.get("RANK", "0")) == 0:  # one summary under a multi-process launcher
        print(f"pretrain: {Path(args.out)} at step {result.step}" + (f" ({summary})" if summary else ""))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="pretrain a vision-language model on image-caption shards and a feature store",
        description="Pretrain a single- or dual-stream vision-language model (MLM, MRC, MRC-kl, MRFR, ITM, WRA, "
                    "and image QA with --questions) on image-caption webdataset shards (or COCO captions JSON) "
                    "joined with region features by image id. Resumes automatically when --out already holds a "
                    "checkpoint; SIGTERM or Ctrl-C saves one before exiting. Several processes: `accelerate "
                    "launch --multi_gpu --num_processes N -m vl pretrain ...` (on a CPU-only machine they train "
                    "together over gloo).",
    )
    parser.add_argument("--config", required=True, metavar="F",
                        help="run config (e.g. configs/pretrain-uniter-tiny.yaml)")
    parser.add_argument("--shards", metavar="PATTERN",
                        help="image-caption shards: brace pattern, glob or directory (a .json: COCO captions)")
    parser.add_argument("--captions", metavar="JSON", help="COCO captions JSON instead of shards")
    parser.add_argument("--features", required=True, metavar="STORE", help="region feature store directory")
    parser.add_argument("--out", required=True, metavar="RUN", help="run directory (resumed when it has a checkpoint)")
    parser.add_argument("--init", metavar="CKPT",
                        help="start from a run of ours, or a Hugging Face BERT / LXMERT / VisualBERT directory")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory with vocab.txt (default: --init's, "
                                                          "else trained on the captions)")
    parser.add_argument("--questions", metavar="Q", help="VQA v2 questions: image questions beside the captions, "
                                                       "for the qa objective (LXMERT's image QA); needs --annotations")
    parser.add_argument("--annotations", metavar="A", help="VQA v2 annotations of --questions (the answer vocabulary "
                                                         "is built from them and saved as RUN/answers.json)")
    parser.add_argument("--val-shards", metavar="PATTERN",
                        help="held-out shards: per-objective losses and ITM accuracy at train.eval_every")
    parser.add_argument("--val-batches", type=int, default=8, metavar="N", help="held-out batches (default 8)")
    parser.add_argument("--set", action="append", metavar="K=V", help="override a config value (repeatable)")
    parser.set_defaults(func=_pretrain)
