"""The text encoder (BERT family): embeddings, a stack of shared transformer layers and a [CLS] pooler."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vl.encoders.transformer import (
    MASK_MODES,
    MaskMode,
    TextEmbeddings,
    TransformerEncoder,
    build_attention_mask,
    init_bert_weights,
)


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 30522  # WordPiece vocabulary size
    hidden_size: int = 768  # model width H
    num_layers: int = 12  # transformer layers
    num_heads: int = 12  # attention heads; hidden_size must divide by it
    intermediate_size: int = 3072  # feed-forward width
    max_position: int = 512  # learned position embeddings
    type_vocab_size: int = 2  # segment embeddings
    dropout: float = 0.1  # hidden dropout
    attn_dropout: float = 0.1  # attention-probability dropout
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"  # gelu (erf, BERT), gelu_new (tanh), relu, silu
    pre_ln: bool = False  # False: post-LN as in BERT; True: pre-LN with a final LayerNorm
    pad_token_id: int = 0
    init_std: float = 0.02  # normal init std for Linear and Embedding weights

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def build_text_embeddings(cfg: TextEncoderConfig) -> TextEmbeddings:
    """The ``TextEmbeddings`` of a text core ``cfg``."""
    return TextEmbeddings(cfg.vocab_size, cfg.hidden_size, max_position=cfg.max_position,
                          type_vocab_size=cfg.type_vocab_size, pad_token_id=cfg.pad_token_id,
                          layer_norm_eps=cfg.layer_norm_eps, dropout=cfg.dropout)


def build_transformer_encoder(cfg: TextEncoderConfig) -> TransformerEncoder:
    """The ``TransformerEncoder`` of a text core ``cfg``: ``cfg.num_layers`` layers of its width."""
    return TransformerEncoder(cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size,
                              dropout=cfg.dropout, attn_dropout=cfg.attn_dropout, layer_norm_eps=cfg.layer_norm_eps,
                              activation=cfg.activation, pre_ln=cfg.pre_ln)


@dataclass
class TextEncoderOutput:
    """hidden: (B, T, H) last layer; pooled: (B, H) tanh(Linear([CLS])); all_hidden: L + 1 tensors (B, T, H)."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    all_hidden: list[torch.Tensor] = field(default_factory=list)


class Pooler(nn.Module):
    """tanh(Linear(hidden[:, 0])): the [CLS] summary used by sentence-level heads."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class TextEncoder(nn.Module):
    """BERT: ``TextEmbeddings`` -> ``TransformerEncoder`` -> ``Pooler``, in any of the three mask modes."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = build_text_embeddings(cfg)
        self.encoder = build_transformer_encoder(cfg)
        self.pooler = Pooler(cfg.hidden_size)
        self.apply(lambda m: init_bert_weights(m, cfg.init_std))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        mask_mode: MaskMode = "bidirectional",
        prefix_len: torch.Tensor | int | None = None,
        return_all: bool = False,
    ) -> TextEncoderOutput:
        """input_ids, attention_mask (1 at real tokens), token_type_ids: (B, T)."""
        if mask_mode not in MASK_MODES:
            raise ValueError(f"unknown mask_mode '{mask_mode}' (known: {', '.join(MASK_MODES)})")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: let SDPA use its unmasked kernel
        mask = build_attention_mask(attention_mask, mask_mode, prefix_len, seq_len=input_ids.shape[1])
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        if return_all:
            all_hidden = self.encoder(x, mask, return_all=True)
            hidden = all_hidden[-1]
        else:
            all_hidden, hidden = [], self.encoder(x, mask)
        return TextEncoderOutput(hidden=hidden, pooled=self.pooler(hidden), all_hidden=all_hidden)
