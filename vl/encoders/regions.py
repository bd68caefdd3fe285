"""Region embeddings: a detector's pooled region features and box geometry become transformer tokens."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from vl.encoders.transformer import Dropout
from vl.errors import UserError

GEOMETRY_KINDS = {"lxmert4": 4, "vilbert5": 5, "uniter7": 7}


def box_geometry(norm_boxes: torch.Tensor, kind: str) -> torch.Tensor:
    """Box geometry features from normalised corner boxes.

    norm_boxes: (B, R, 4) x1, y1, x2, y2 divided by image width / height (in [0, 1]).
    kind: "lxmert4" -> (B, R, 4) the corners (LXMERT); "vilbert5" -> (B, R, 5) corners + area (ViLBERT);
    "uniter7" -> (B, R, 7) corners + w, h, w * h (UNITER).
    """
    if kind not in GEOMETRY_KINDS:
        raise UserError(f"unknown box geometry '{kind}' (known: {', '.join(GEOMETRY_KINDS)})")
    if norm_boxes.shape[-1] != 4:
        raise UserError(f"box_geometry needs (..., 4) normalised x1, y1, x2, y2 boxes, got {tuple(norm_boxes.shape)}")
    if kind == "lxmert4":
        return norm_boxes
    width = (norm_boxes[..., 2] - norm_boxes[..., 0]).unsqueeze(-1)  # (B, R, 1)
    height = (norm_boxes[..., 3] - norm_boxes[..., 1]).unsqueeze(-1)  # (B, R, 1)
    area = width * height
    if kind == "vilbert5":
        return torch.cat([norm_boxes, area], dim=-1)  # (B, R, 5)
    return torch.cat([norm_boxes, width, height, area], dim=-1)  # (B, R, 7)


class RegionEmbeddings(nn.Module):
    """Region tokens from features (B, R, D) and box geometry (B, R, G): (B, R, H).

    feature part: Linear(D, H) [-> LayerNorm when ``part_norm``]; box part likewise from G (none when
    ``geometry_dim == 0``). The parts are averaged (``combine="mean"``, LXMERT) or summed (``"sum"``, UNITER,
    ViLBERT); then an optional type embedding (``num_types`` rows, row ``type_id``) and visual position
    embedding (``num_positions`` rows, row 0: VisualBERT) are added; then an optional final LayerNorm and
    dropout. A model may pass ``type_embedding`` (a (H,) vector, UNITER's text segment row), ``shared_norm``
    (VisualBERT normalises regions with the text embeddings' LayerNorm) and ``extra`` (B, R, H), added before the
    final norm (object tags summed into their regions), at call time.
    """

    def __init__(
        self,
        feature_dim: int,
        geometry_dim: int,
        hidden_size: int,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.1,
        combine: Literal["mean", "sum"] = "mean",
        part_norm: bool = True,
        final_norm: bool = False,
        num_types: int = 0,
        type_id: int = 1,
        num_positions: int = 0,
    ):
        super().__init__()
        if combine not in ("mean", "sum"):
            raise ValueError(f"combine must be 'mean' or 'sum', got '{combine}'")
        self.feature_proj = nn.Linear(feature_dim, hidden_size)
        self.feature_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if part_norm else nn.Identity()
        self.box_proj = nn.Linear(geometry_dim, hidden_size) if geometry_dim else None
        self.box_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if part_norm and geometry_dim else None
        self.type_embeddings = nn.Embedding(num_types, hidden_size) if num_types else None
        self.position_embeddings = nn.Embedding(num_positions, hidden_size) if num_positions else None
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if final_norm else None
        self.dropout = Dropout(dropout)
        self.feature_dim = feature_dim
        self.geometry_dim = geometry_dim
        self.combine = combine
        self.type_id = type_id

    def forward(
        self,
        region_feats: torch.Tensor,
        region_boxes: torch.Tensor | None = None,
        type_embedding: torch.Tensor | None = None,
        shared_norm: nn.Module | None = None,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """region_feats (B, R, D), region_boxes (B, R, G) -> (B, R, H)."""
        x = self.feature_norm(self.feature_proj(region_feats))
        if self.box_proj is not None:
            if region_boxes is None:
                raise ValueError(f"these region embeddings need region_boxes (B, R, {self.geometry_dim})")
            boxes = self.box_proj(region_boxes)
            if self.box_norm is not None:
                boxes = self.box_norm(boxes)
            x = (x + boxes) / 2 if self.combine == "mean" else x + boxes
        if self.position_embeddings is not None:
            x = x + self.position_embeddings.weight[0]
        if self.type_embeddings is not None:
            x = x + self.type_embeddings.weight[self.type_id]
        if type_embedding is not None:
            x = x + type_embedding
        if extra is not None:
            x = x + extra
        if shared_norm is not None:
            x = shared_norm(x)
        elif self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)
