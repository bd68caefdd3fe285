"""``vl evaluate TASK``: score predictions against gold annotations with the task's official metric.

Each task module registers its subcommands through ``add_evaluate_parsers(tasks)``; see ``vl/cli/finetune.py``.
"""

from __future__ import annotations

import argparse

from vl.cli import text_tasks as _text_tasks
from vl.cli import vl_tasks as _vl_tasks

TASK_MODULES = [_text_tasks, _vl_tasks]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="score predictions with a task's metric",
                                   description="Score a predictions file against gold annotations.")
    tasks = parser.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True
    for module in TASK_MODULES:
        module.add_evaluate_parsers(tasks)
