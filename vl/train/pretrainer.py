"""The module ``vl pretrain`` trains: the fusion model and its heads, with the objectives of each task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vl.data.vl_batches import SUM_TASK
from vl.data.vl_masking import VLBatchPlan, concat_batches
from vl.errors import UserError
from vl.fusion.pretraining import VLPretrainingModel, head_rows
from vl.objectives.itm import mine_hard_negatives
from vl.train.pretrain_config import VLPretrainConfig


class VLPretrainer(nn.Module):
    """The module the loop trains: ``forward(batch) -> {objective: loss}`` for the batch's ``task``.

    Its state dict is exactly the ``VLPretrainingModel``'s (``fusion.*``, ``heads.*``): the objectives use the
    model's heads and own no weights. ``tasks`` maps a task name to the objectives computed on its batches
    (``"all"``: every objective, for ``data.mix: sum``). Computing the losses inside ``forward`` keeps the heads
    in the graph that DistributedDataParallel follows. With ``restrict_rows`` (the default) the fusion model runs
    its last layer only at the rows the objectives' heads read (``vl.fusion.pretraining.head_rows``); the losses
    and gradients are those of the full computation.
    """

    def __init__(self, model: VLPretrainingModel, objectives: Mapping[str, nn.Module],
                 tasks: Mapping[str, Sequence[str]], restrict_rows: bool = True):
        super().__init__()
        self.fusion = model.fusion
        self.heads = model.heads
        own = {id(p) for p in model.parameters()}
        for name, objective in objectives.items():
            foreign = [n for n, p in objective.named_parameters() if id(p) not in own]
            if foreign:
                raise UserError(f"objective '{name}' has weights outside the model ({foreign[0]}); give it the "
                                "model's head")
        self.objectives = dict(objectives)  # not registered: their weights are the model's heads
        self.tasks = {task: tuple(names) for task, names in tasks.items()}
        self.restrict_rows = restrict_rows
        object.__setattr__(self, "_model", model)

    @property
    def model(self) -> VLPretrainingModel:
        """The ``VLPretrainingModel`` this trains (the same modules)."""
        return self._model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        task = batch.get("task", SUM_TASK)
        if task not in self.tasks:
            raise UserError(f"batch task '{task}' is not one of this run's tasks ({', '.join(self.tasks)})")
        names = self.tasks[task]
        itm = self.objectives.get("itm")
        hard = getattr(itm, "hard_negatives", 0) if "itm" in names else 0
        if hard and self.training:
            tensors = {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}
            k = min(hard, tensors["input_ids"].shape[0] - 1)
            if k > 0:
                negatives = mine_hard_negatives(self.fusion, self.heads.itm, tensors, k)
                batch = concat_batches([tensors, negatives])
        rows = head_rows(batch, names) if self.restrict_rows else None
        output = self.fusion(batch, rows) if rows is not None else self.fusion(batch)
        losses: dict[str, torch.Tensor] = {}
        for name in names:
            losses.update(self.objectives[name](output, batch))
        return losses


def task_objectives(cfg: VLPretrainConfig) -> dict[str, tuple[str, ...]]:
    """Task name -> objectives computed on its batches: one task per objective (sample) or one task ``"all"``."""
    if cfg.data.mix == "sum":
        return {SUM_TASK: tuple(cfg.objectives)}
    return {name: (name,) for name, spec in cfg.objectives.items() if spec.mix > 0}


def batch_plans(tasks: Mapping[str, Sequence[str]], objectives: Mapping[str, nn.Module]) -> dict[str, VLBatchPlan]:
    return {task: VLBatchPlan.for_objectives([objectives[name] for name in names]) for task, names in tasks.items()}
