"""Object tags (Oscar, VinVL): the detector's class and attribute names as word embeddings beside the regions.

A region's tag is the probability-weighted sum of the word embeddings of the names the detector gives it: its most
probable classes and attributes, each name weighted by its probability (a name of several word pieces spreads its
weight over them). The data pipeline (``vl.data.tags.RegionTagger``) turns a feature store's class and attribute
distributions into ``region_tag_ids (B, R, L)`` and ``region_tag_weights (B, R, L)``; a region without a confident
name (a background box) has small weights, and a padded or masked region all-zero ones.

The tag lives in the same embedding space as the words of the text: "red" in a question and the tag of a red
region share the row of ``word_embeddings``. That shared row is the anchor point that makes word-region alignment
easy to learn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from vl.encoders.cpu_kernels import Dropout

if TYPE_CHECKING:
    from vl.fusion.base import FusionConfig


def tag_content(word_embeddings: nn.Embedding, tag_ids: torch.Tensor, tag_weights: torch.Tensor) -> torch.Tensor:
    """tag_ids (B, R, L) long, tag_weights (B, R, L) -> (B, R, H): sum over l of weight * word embedding."""
    words = word_embeddings(tag_ids)  # (B, R, L, H)
    return (words * tag_weights.to(words.dtype).unsqueeze(-1)).sum(dim=2)  # (B, R, H)


class TagTokens(nn.Module):
    """One tag token per region for the text side of a model (``tags.placement: text``).

    token = LayerNorm(tag content + tag segment embedding + Linear(box geometry)), then dropout: the tag's words,
    marked as tags by a segment of their own, at the place of their region. A region whose tag is empty keeps the
    segment and the box, so the model still sees that a box is there.
    """

    def __init__(self, hidden_size: int, geometry_dim: int, *, layer_norm_eps: float = 1e-12, dropout: float = 0.1):
        super().__init__()
        self.segment = nn.Parameter(torch.zeros(hidden_size))
        self.box_proj = nn.Linear(geometry_dim, hidden_size) if geometry_dim else None
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = Dropout(dropout)

    def forward(self, content: torch.Tensor, region_boxes: torch.Tensor | None) -> torch.Tensor:
        """content (B, R, H) from ``tag_content``, region_boxes (B, R, G) or None -> tag tokens (B, R, H)."""
        x = content + self.segment
        if self.box_proj is not None and region_boxes is not None:
            x = x + self.box_proj(region_boxes)
        return self.dropout(self.norm(x))


class ObjectTags(nn.Module):
    """The object tags of a fusion model, placed as ``tags.placement`` says.

    "text": ``forward`` returns (tag tokens (B, R, H_t), None), tokens for the text side (``TagTokens``).
    "region": it returns (None, (B, R, H_v)), a term for the region embeddings to add to each region's token
    (Linear(H_t, H_v) of the tag content).
    """

    def __init__(self, placement: str, *, text_hidden: int, region_hidden: int, geometry_dim: int,
                 layer_norm_eps: float = 1e-12, dropout: float = 0.1):
        super().__init__()
        self.placement = placement
        self.tokens = (TagTokens(text_hidden, geometry_dim, layer_norm_eps=layer_norm_eps, dropout=dropout)
                       if placement == "text" else None)
        self.to_region = nn.Linear(text_hidden, region_hidden) if placement == "region" else None

    def forward(self, word_embeddings: nn.Embedding, tag_ids: torch.Tensor, tag_weights: torch.Tensor,
                region_boxes: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        content = tag_content(word_embeddings, tag_ids, tag_weights)  # (B, R, H_t)
        if self.tokens is not None:
            return self.tokens(content, region_boxes), None
        return None, self.to_region(content)


def build_object_tags(cfg: FusionConfig, region_hidden: int) -> ObjectTags | None:
    """The ``ObjectTags`` that ``cfg.tags`` asks for (None without tags)."""
    if cfg.tags is None:
        return None
    return ObjectTags(cfg.tags.placement, text_hidden=cfg.text.hidden_size, region_hidden=region_hidden,
                      geometry_dim=cfg.region.geometry_dim, layer_norm_eps=cfg.text.layer_norm_eps,
                      dropout=cfg.text.dropout)
