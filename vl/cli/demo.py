"""``vl demo``: the main job, end to end on a generated world, with a report."""

from __future__ import annotations

import argparse


def _demo(args: argparse.Namespace) -> int:
    from vl.demo.config import demo_config
    from vl.demo.pipeline import Demo

    Demo(args.out, demo_config(args.quick, args.seed)).run()
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole pipeline on a generated world and write a report",
        description="Generate a world, train the detector, extract features, pretrain single- and dual-stream "
                    "models, fine-tune VQA (from each and from scratch) and retrieval, answer questions on held-out "
                    "images, and write DIR/report.md and DIR/report.html. Rerunning continues an interrupted demo.")
    parser.add_argument("--out", default="demo_out", metavar="DIR", help="output directory (default: demo_out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and of every run (default 0)")
    parser.add_argument("--quick", action="store_true", help="a shrunken demo (a smoke test of every stage)")
    parser.set_defaults(func=_demo)
