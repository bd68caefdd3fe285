"""Region embeddings: a detector's pooled region features and box geometry become transformer tokens.

Also what both fusion families share to build and call them from a ``FusionConfig``: ``build_region_embeddings``,
``embed_regions`` and ``init_visual_tables``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from vl.encoders.cpu_kernels import Dropout
from vl.errors import UserError

if TYPE_CHECKING:
    from vl.encoders.tags import ObjectTags
    from vl.encoders.transformer import TextEmbeddings
    from vl.fusion.base import FusionConfig

GeometryKind = Literal["none", "lxmert4", "vilbert5", "uniter7"]
GEOMETRY_DIMS = {"none": 0, "lxmert4": 4, "vilbert5": 5, "uniter7": 7}  # width of each box encoding; 0: no boxes


def box_geometry(norm_boxes: torch.Tensor, kind: str) -> torch.Tensor:
    """Box geometry features from normalised corner boxes.

    norm_boxes: (B, R, 4) x1, y1, x2, y2 divided by image width / height (in [0, 1]).
    kind: "lxmert4" -> (B, R, 4) the corners (LXMERT); "vilbert5" -> (B, R, 5) corners + area (ViLBERT);
    "uniter7" -> (B, R, 7) corners + w, h, w * h (UNITER).
    """
    if not GEOMETRY_DIMS.get(kind):
        known = ", ".join(name for name, dim in GEOMETRY_DIMS.items() if dim)
        raise UserError(f"unknown box geometry '{kind}' (known: {known})")
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
    ``geometry_dim == 0``; no LayerNorm when ``box_norm`` is False). The parts are averaged (``combine="mean"``,
    LXMERT) or summed (``"sum"``, UNITER, ViLBERT); then an optional type embedding (``num_types`` rows, row
    ``type_id``) and visual position embedding (``num_positions`` rows, row 0: VisualBERT) are added; then an
    optional final LayerNorm and dropout. A model may pass ``type_embedding`` (a (H,) vector, UNITER's text
    segment row), ``shared_norm`` (VisualBERT normalises regions with the text embeddings' LayerNorm) and
    ``extra`` (B, R, H), added before the final norm (object tags summed into their regions), at call time.
    """

    def __init__(
        self,
        feature_dim: int,
        geometry_dim: int,
        hidden_size: int,
        *,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.1,
        combine: Literal["mean", "sum"] = "mean",
        part_norm: bool = True,
        box_norm: bool = True,
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
        self.box_norm = (nn.LayerNorm(hidden_size, eps=layer_norm_eps) if part_norm and box_norm and geometry_dim
                         else None)
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


def build_region_embeddings(cfg: FusionConfig, hidden_size: int) -> RegionEmbeddings:
    """The ``RegionEmbeddings`` that ``cfg.region`` describes, of width ``hidden_size``."""
    region, text = cfg.region, cfg.text
    return RegionEmbeddings(
        feature_dim=region.feature_dim,
        geometry_dim=region.geometry_dim,
        hidden_size=hidden_size,
        layer_norm_eps=text.layer_norm_eps,
        dropout=text.dropout,
        combine=region.combine,
        part_norm=region.part_norm,
        box_norm=region.box_norm,
        final_norm=region.final_norm == "own",
        num_types=text.type_vocab_size if region.type_embedding == "own" else 0,
        type_id=region.type_id,
        num_positions=text.max_position if region.position_embedding else 0,
    )


def embed_regions(cfg: FusionConfig, text_embeddings: TextEmbeddings, region_embeddings: RegionEmbeddings,
                  inputs: dict[str, torch.Tensor | None], tags: ObjectTags | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Region tokens (B, R, H), borrowing the text segment row / LayerNorm where ``cfg.region`` says so, and the
    tag tokens (B, R, H_t) when ``tags`` places them on the text side (else None). ``inputs``: ``read_batch``'s."""
    type_embedding = None
    if cfg.region.type_embedding == "text":
        type_embedding = text_embeddings.token_type_embeddings.weight[cfg.region.type_id]  # (H,)
    shared_norm = text_embeddings.norm if cfg.region.final_norm == "text" else None
    tag_tokens = region_extra = None
    if tags is not None:
        tag_tokens, region_extra = tags(text_embeddings.word_embeddings, inputs["region_tag_ids"],
                                        inputs["region_tag_weights"], inputs["region_boxes"])
    region_tokens = region_embeddings(inputs["region_feats"], inputs["region_boxes"], type_embedding=type_embedding,
                                      shared_norm=shared_norm, extra=region_extra)
    return region_tokens, tag_tokens


def init_visual_tables(text_embeddings: TextEmbeddings, region_embeddings: RegionEmbeddings) -> None:
    """VisualBERT's "special visual initialisation": visual type / position tables start as the text ones."""
    with torch.no_grad():
        if region_embeddings.type_embeddings is not None:
            region_embeddings.type_embeddings.weight.copy_(text_embeddings.token_type_embeddings.weight)
        if region_embeddings.position_embeddings is not None:
            region_embeddings.position_embeddings.weight.copy_(text_embeddings.position_embeddings.weight)
