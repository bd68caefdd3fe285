"""``vl predict TASK``: run a fine-tuned model over an input file and write its predictions.

Each task module registers its subcommands through ``add_predict_parsers(tasks)``; see ``vl/cli/finetune.py``.
"""

from __future__ import annotations

import argparse

from vl.cli import text_tasks as _text_tasks
from vl.cli import vl_tasks as _vl_tasks

TASK_MODULES = [_text_tasks, _vl_tasks]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="predict with a fine-tuned run",
                                   description="Predict an input file with a fine-tuned run directory.")
    tasks = parser.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True
    for module in TASK_MODULES:
        module.add_predict_parsers(tasks)
