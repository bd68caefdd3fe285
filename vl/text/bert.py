"""BERT for pretraining: the text encoder with its masked-LM head (tied to the word embeddings) and NSP head."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vl.encoders.heads import MLMHead
from vl.encoders.text import TextEncoder, TextEncoderConfig
from vl.encoders.transformer import init_bert_weights


@dataclass
class BertPretrainingOutput:
    """hidden: (B, T, H); pooled: (B, H); mlm_logits: (B, T, V), or (N, V) at the N selected positions;
    nsp_logits: (B, 2), index 0 = "B follows A"; all_hidden: L + 1 tensors (B, T, H) when asked for."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    mlm_logits: torch.Tensor
    nsp_logits: torch.Tensor
    all_hidden: list[torch.Tensor] = field(default_factory=list)


class BertPretrainingModel(nn.Module):
    """``TextEncoder`` + ``MLMHead`` (decoder weight = word embeddings) + next-sentence head ``Linear(H, 2)``.

    Parameter names: ``text_encoder.*``, ``mlm.transform.{dense,norm}.*``, ``mlm.decoder.*``, ``nsp.*``;
    ``mlm.decoder.weight`` is the same tensor as ``text_encoder.embeddings.word_embeddings.weight``.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.text_encoder = TextEncoder(cfg)
        self.mlm = MLMHead(cfg.hidden_size, cfg.vocab_size, cfg.activation, cfg.layer_norm_eps)
        self.nsp = nn.Linear(cfg.hidden_size, 2)
        self.mlm.apply(lambda m: init_bert_weights(m, cfg.init_std))
        self.nsp.apply(lambda m: init_bert_weights(m, cfg.init_std))
        self.mlm.tie_to(self.text_encoder.embeddings.word_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        mlm_positions_mask: torch.Tensor | None = None,
        return_all: bool = False,
    ) -> BertPretrainingOutput:
        """input_ids, attention_mask (1 at real tokens), token_type_ids: (B, T).

        mlm_positions_mask: (B, T) bool, True where MLM logits are wanted (the masked tokens); the vocabulary
        projection then runs on those rows only and ``mlm_logits`` is (N, V) in row-major (b, t) order. Without
        it, ``mlm_logits`` is (B, T, V).
        """
        out = self.text_encoder(input_ids, attention_mask, token_type_ids, return_all=return_all)
        selected = out.hidden if mlm_positions_mask is None else out.hidden[mlm_positions_mask.bool()]  # (N, H)
        return BertPretrainingOutput(
            hidden=out.hidden,
            pooled=out.pooled,
            mlm_logits=self.mlm(selected),
            nsp_logits=self.nsp(out.pooled),
            all_hidden=out.all_hidden,
        )
