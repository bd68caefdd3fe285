"""``vl plot RUN``: draw a run's loss curves (from metrics.jsonl) to PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from vl.errors import UserError


def _plot(args: argparse.Namespace) -> int:
    from vl.train.plot import plot_metrics

    run = Path(args.run)
    if not run.is_dir():
        raise UserError(f"run directory not found: {run}")
    out = plot_metrics(run, args.out)
    print(f"wrote {out}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plot", help="draw a run's loss curves to PNG",
                                   description="Draw one panel per logged metric of RUN/metrics.jsonl against the "
                                               "step, into RUN/loss.png (or --out).")
    parser.add_argument("run", metavar="RUN", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", metavar="PNG", help="output file (default: RUN/loss.png)")
    parser.set_defaults(func=_plot)
