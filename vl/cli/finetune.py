"""``vl finetune TASK``: fine-tune a checkpoint on a downstream task.

Each task module registers its subcommands: ``add_finetune_parsers(tasks)`` adds one parser per task name to the
``vl finetune`` sub-parsers (with ``set_defaults(func=...)``). Add a module to ``TASK_MODULES`` to add tasks.
"""

from __future__ import annotations

import argparse

from vl.cli import text_tasks as _text_tasks
from vl.cli import vl_tasks as _vl_tasks

TASK_MODULES = [_text_tasks, _vl_tasks]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("finetune", help="fine-tune a checkpoint on a task",
                                   description="Fine-tune a checkpoint (a run of ours or a Hugging Face directory) "
                                               "on a downstream task.")
    tasks = parser.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True
    for module in TASK_MODULES:
        module.add_finetune_parsers(tasks)
