"""Masked language modelling conditioned on the image (VisualBERT, UNITER, ViLBERT, LXMERT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vl.encoders.heads import MLMHead, gather_positions
from vl.errors import UserError
from vl.fusion.base import VLOutput
from vl.objectives.common import empty_loss, require_keys


class MaskedLanguageModeling(nn.Module):
    """Cross-entropy of the MLM head at the masked text positions: ``{"mlm": loss}``.

    Batch keys: ``mlm_labels (B, T)`` long, the original token at masked positions and -100 elsewhere (made by
    ``vl.data.vl_masking.prepare_vl_batch`` with text masking; regions are intact in those samples). The head
    runs on the selected rows of ``output.text_hidden`` only, (N, H_t) -> (N, V). A batch without masked
    tokens gives a zero loss.
    """

    name = "mlm"
    needs_masking = "text"
    needs_negatives = False
    batch_keys = ("mlm_labels",)

    def __init__(self, hidden_size: int, vocab_size: int, head: MLMHead | None = None, activation: str = "gelu",
                 layer_norm_eps: float = 1e-12):
        super().__init__()
        self.head = head if head is not None else MLMHead(hidden_size, vocab_size, activation, layer_norm_eps)
        if self.head.decoder.out_features != vocab_size:
            raise UserError(f"objective 'mlm': the MLM head predicts {self.head.decoder.out_features} tokens, "
                            f"the vocabulary has {vocab_size}")

    def forward(self, output: VLOutput, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        require_keys(self.name, batch, self.batch_keys)
        hidden, labels = gather_positions(output.text_hidden, batch["mlm_labels"])  # (N, H_t), (N,)
        logits = self.head(hidden)  # (N, V)
        if labels.numel() == 0:
            return {self.name: empty_loss(logits)}
        return {self.name: F.cross_entropy(logits.float(), labels)}
