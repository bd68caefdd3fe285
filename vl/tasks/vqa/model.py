"""The VQA model (``VqaModel``: a fusion model + the answer head), its answers to examples, and how a VQA run
directory loads (``VQA_RUN``, for ``vl.tasks.runs.load_task_run``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vl.errors import UserError
from vl.fusion import build_fusion
from vl.fusion.base import FusionConfig
from vl.fusion.pretraining import HeadsConfig, VLHeads
from vl.compress.losses import soft_answer_loss
from vl.progress import progress_bar
from vl.tasks.runs import TaskFormat, TaskRun
from vl.tasks.vl_finetune import FinetuneModeMixin, model_device, to_device
from vl.tasks.vqa.answers import ANSWERS_FILE, read_answers
from vl.tasks.vqa.config import TASK_NAME, VqaConfig
from vl.tasks.vqa.data import VqaCollator, VqaExample


class VqaModel(FinetuneModeMixin, nn.Module):
    """``fusion`` + ``heads.answer`` (``AnswerHead`` on the pooled output).

    ``logits(batch)`` -> (B, A); ``forward(batch)`` -> ``{"vqa": BCE * A, "vqa_score": mean target score of the
    argmax answer}`` (the batch's soft VQA accuracy). The state dict (``fusion.*``, ``heads.answer.*``) is that of
    a ``VLPretrainingModel`` with ``HeadsConfig(mlm=False, itm=False, num_answers=A)``.
    """

    def __init__(self, fusion: nn.Module, num_answers: int):
        super().__init__()
        if num_answers < 1:
            raise UserError("the answer vocabulary is empty: lower vqa.min_answer_count")
        self.fusion = fusion
        self.heads = VLHeads(fusion, self.heads_config(num_answers))
        self.num_answers = num_answers

    @staticmethod
    def heads_config(num_answers: int) -> HeadsConfig:
        return HeadsConfig(mlm=False, itm=False, region_outputs={}, num_answers=num_answers)

    @property
    def cfg(self) -> FusionConfig:
        return self.fusion.cfg

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.heads.answer(self.pooled_output(batch))  # (B, A)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.logits(batch).float()
        targets = batch["answer_targets"].float()
        loss = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
        picked = targets.gather(1, logits.detach().argmax(dim=1, keepdim=True)).mean()
        outputs = {"vqa": loss, "vqa_score": picked}
        if "teacher_logits" in batch:  # distillation (vl.compress.distill)
            outputs["distill"] = soft_answer_loss(logits, batch["teacher_logits"], batch["distill_temperature"])
        return outputs


@torch.no_grad()
def answer_logits(model: VqaModel, examples: Sequence[VqaExample], collate: VqaCollator, batch_size: int,
                  desc: str = "predict") -> torch.Tensor:
    """(N, A) answer logits of every example, in order (eval mode; the model's training mode is restored)."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for start in progress_bar(range(0, len(examples), batch_size), desc=desc, leave=False):
            batch = to_device(collate(examples[start:start + batch_size]), device)
            chunks.append(model.logits(batch).float().cpu())
    finally:
        model.train(was_training)
    if not chunks:
        return torch.zeros(0, model.num_answers)
    return torch.cat(chunks)


def predicted_answers(logits: torch.Tensor, answers: Sequence[str]) -> list[str]:
    return [answers[index] for index in logits.argmax(dim=1).tolist()]


def _with_answers(run_dir: Path, run: TaskRun) -> TaskRun:
    """``run`` with its answer vocabulary (``answers.json``), which must have one answer per answer logit."""
    answers = read_answers(run_dir / ANSWERS_FILE)
    if len(answers) != run.heads.num_answers:
        raise UserError(f"--run {run_dir}: {ANSWERS_FILE} lists {len(answers)} answers but the model predicts "
                        f"{run.heads.num_answers}")
    return dataclasses.replace(run, answers=tuple(answers))


VQA_RUN = TaskFormat(task=TASK_NAME, title="VQA", settings=VqaConfig,
                     build=lambda run: VqaModel(build_fusion(run.model), len(run.answers)),
                     extra={"box_selection": dict[str, Any]},  # how the store's boxes were chosen (vl vqa reuses)
                     complete=_with_answers)
