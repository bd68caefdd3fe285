"""LXMERT's image-QA pretraining loss: answer prediction from the pooled output, on the samples that have QA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vl.encoders.heads import AnswerHead
from vl.errors import UserError
from vl.fusion.base import VLOutput
from vl.objectives.common import empty_loss, require_keys


class ImageQuestionAnswering(nn.Module):
    """Binary cross-entropy of ``answer_head(output.pooled)`` against soft answer scores: ``{"qa": loss}``.

    Batch keys: ``answer_targets (B, A)`` float soft scores in [0, 1] (VQA-style), ``has_answer (B,)`` bool: the
    sample is a question with answers (captions have none). Mismatched pairs (``itm_labels`` 0) are skipped, as
    in LXMERT: a question about another image has no valid answer. The loss is summed over answers and averaged
    over the answered samples; a batch without any gives a zero loss.
    """

    name = "qa"
    needs_masking = None
    needs_negatives = False
    batch_keys = ("answer_targets", "has_answer")

    def __init__(self, hidden_size: int, num_answers: int, head: AnswerHead | None = None,
                 layer_norm_eps: float = 1e-12):
        super().__init__()
        self.head = head if head is not None else AnswerHead(hidden_size, num_answers, layer_norm_eps)
        if self.head.classifier.out_features != num_answers:
            raise UserError(f"objective 'qa': the answer head predicts {self.head.classifier.out_features} "
                            f"answers, expected {num_answers}")
        self.num_answers = num_answers

    def forward(self, output: VLOutput, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        require_keys(self.name, batch, self.batch_keys)
        answered = batch["has_answer"].bool()  # (B,)
        if "itm_labels" in batch:
            answered = answered & (batch["itm_labels"] == 1)
        targets = batch["answer_targets"]
        if targets.shape[-1] != self.num_answers:
            raise UserError(f"objective 'qa': batch 'answer_targets' has {targets.shape[-1]} answers, the head "
                            f"predicts {self.num_answers}")
        logits = self.head(output.pooled[answered])  # (N, A)
        if logits.shape[0] == 0:
            return {self.name: empty_loss(logits)}
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets[answered].float(), reduction="sum")
        return {self.name: loss / logits.shape[0]}
