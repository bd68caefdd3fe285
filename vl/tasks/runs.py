"""The run directory of a vision-language fine-tuning task (VQA, retrieval): ``TaskRun`` (its ``config.yaml``) and
``load_task_run``, which rebuilds the fine-tuned model from it.

``config.yaml`` holds, in this order: ``task`` (the task's name), ``model`` (the ``FusionConfig``), ``heads``
(the ``HeadsConfig``), the task's own section under the task's name (``vqa:``, ``retrieval:``), ``train``,
``init``, ``features``, the task's own top-level entries (VQA: ``box_selection``; retrieval: ``karpathy``) and
``finetune``. Thanks to ``model:`` and ``heads:``, ``vl.checkpoints.vl_run.load_vl_run`` loads a task run as a
plain VL checkpoint too. A task describes its run directory with a ``TaskFormat``.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

from torch import nn

from vl.compress.quantize import is_quantized, load_quantized
from vl.config import ConfigError, load_config
from vl.errors import UserError
from vl.fusion.base import FusionConfig
from vl.fusion.pretraining import HeadsConfig
from vl.tasks.vl_finetune import SCRATCH, VLFinetuneMode, prepare_mode
from vl.text.tokenizer import Tokenizer
from vl.train.loop import TrainConfig


@dataclass(frozen=True)
class TaskRun:
    """``RUN/config.yaml`` of a fine-tuning run: enough to rebuild the model (``model`` + ``heads``) and its inputs.

    ``settings`` is the task's section (``VqaConfig``, ``RetrievalConfig``), kept in ``config.yaml`` under the
    task's name; ``extra`` the task's own top-level entries (``TaskFormat.extra``). ``answers`` is not part of
    ``config.yaml``: VQA's answer vocabulary (``answers.json``), filled in by ``load_task_run``; empty otherwise.
    """

    task: str
    model: FusionConfig
    heads: HeadsConfig
    settings: Any
    train: TrainConfig = field(default_factory=TrainConfig)
    init: str = SCRATCH
    features: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    finetune: VLFinetuneMode = field(default_factory=VLFinetuneMode)
    answers: tuple[str, ...] = ()

    def to_config(self) -> dict[str, Any]:
        """The ``config.yaml`` mapping (the training loop's ``run_config``), keys in the file's order."""
        return {"task": self.task, "model": self.model, "heads": self.heads, self.task: self.settings,
                "train": self.train, "init": self.init, "features": self.features, **self.extra,
                "finetune": self.finetune}


@dataclass(frozen=True)
class TaskFormat:
    """What is task-specific in a run directory.

    ``task``: the name (``config.yaml``'s ``task``); ``title``: how messages name the run ("a VQA run");
    ``settings``: the dataclass of the task's section; ``extra``: the task's top-level entries and their types (each
    defaults to its type's empty value); ``build``: the untrained task model of a run; ``complete``: reads what
    else the run directory must hold, before the weights (VQA: ``answers.json`` into ``TaskRun.answers``).
    """

    task: str
    title: str
    settings: type
    build: Callable[[TaskRun], nn.Module]
    extra: dict[str, Any] = field(default_factory=dict)
    complete: Callable[[Path, TaskRun], TaskRun] | None = None

    def schema(self) -> type:
        """The dataclass ``config.yaml`` is read with: ``TaskRun``'s file entries, the section under the task's name
        (``VqaRun`` for ``vqa``: the class name config errors quote)."""
        fields = [("task", str), ("model", FusionConfig), ("heads", HeadsConfig),
                  (self.task, self.settings, field(default_factory=self.settings)),
                  ("train", TrainConfig, field(default_factory=TrainConfig)), ("init", str, field(default=SCRATCH)),
                  ("features", str, field(default=""))]
        fields += [(name, kind, field(default_factory=typing.get_origin(kind) or kind))
                   for name, kind in self.extra.items()]
        fields.append(("finetune", VLFinetuneMode, field(default_factory=VLFinetuneMode)))
        return make_dataclass(f"{self.task.title().replace('_', '')}Run", fields, frozen=True)


def read_task_run(config_path: Path, task: TaskFormat) -> TaskRun:
    """``config.yaml`` of a ``task`` run as a ``TaskRun``; a ConfigError when it does not match the format."""
    loaded = load_config(task.schema(), config_path)
    return TaskRun(task=loaded.task, model=loaded.model, heads=loaded.heads, settings=getattr(loaded, task.task),
                   train=loaded.train, init=loaded.init, features=loaded.features,
                   extra={name: getattr(loaded, name) for name in task.extra}, finetune=loaded.finetune)


def load_task_run(run_dir: str | os.PathLike, task: TaskFormat) -> tuple[nn.Module, TaskRun, Tokenizer]:
    """A fine-tuned run of ``task``: (model in eval mode, its config, tokenizer)."""
    from vl.checkpoints.io import load_into, load_state_file

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir} is not a directory")
    if not config_path.is_file():
        raise UserError(f"--run {run_dir} has no config.yaml (not a {task.title} run)")
    try:
        run = read_task_run(config_path, task)
    except ConfigError as err:
        raise UserError(f"--run {run_dir} is not a {task.title} run ({str(err).splitlines()[0]})") from None
    if run.task != task.task:
        raise UserError(f"--run {run_dir} was fine-tuned for '{run.task}', not '{task.task}'")
    if task.complete is not None:
        run = task.complete(run_dir, run)
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"--run {run_dir} has no model.safetensors (did its training finish?)")
    model = task.build(run)
    prepare_mode(model, run.finetune)
    if is_quantized(run_dir):
        load_quantized(model, run_dir)
    else:
        load_into(model, load_state_file(weights), weights)
    model.eval()
    return model, run, Tokenizer.from_dir(run_dir)


def task_formats() -> dict[str, TaskFormat]:
    """Every vision-language task's run format, by task name."""
    from vl.tasks.retrieval.model import RETRIEVAL_RUN
    from vl.tasks.vqa.model import VQA_RUN

    return {VQA_RUN.task: VQA_RUN, RETRIEVAL_RUN.task: RETRIEVAL_RUN}


def load_any_task_run(run_dir: str | os.PathLike) -> tuple[nn.Module, TaskRun, Tokenizer]:
    """``load_task_run`` with the format that ``config.yaml``'s ``task`` names."""
    import yaml

    config_path = Path(run_dir) / "config.yaml"
    try:
        task = (yaml.safe_load(config_path.read_text()) or {}).get("task")
    except (OSError, yaml.YAMLError, AttributeError):
        task = None
    formats = task_formats()
    if task not in formats:
        raise UserError(f"{run_dir} is not a fine-tuned {' or '.join(formats)} run (its config.yaml names no such "
                        "task)")
    return load_task_run(run_dir, formats[task])
