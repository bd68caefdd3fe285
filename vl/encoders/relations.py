"""Box relations in attention: a per-head bias on each pair of visual tokens from their relative geometry.

Relation networks for object detection (Hu et al., 2018) and the Object Relation Transformer (Herdade et al.,
2019) weight the attention between two regions by where one box lies relative to the other. A transformer fed each
box's own coordinates must learn to compare two attended coordinates before it can tell "left of" from "right
of"; with the bias a region attends by relation directly (one head to the boxes on its left, another to those
above), and what it gathers says what lies there.

For query box m and key box n, with centres c, widths w and heights h in normalised image coordinates, the pair's
features are (cx_n - cx_m, cy_n - cy_m, log(w_n / w_m), log(h_n / h_m)); a small MLP maps them to one bias per
head. Its last layer starts at zero, so a model with relations equals the model without them at initialisation.
"""

from __future__ import annotations

import torch
from torch import nn


def pair_geometry(boxes: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """boxes (B, N, >=4) normalised x1, y1, x2, y2 first -> (B, N, N, 4): [b, m, n] describes box n seen from m."""
    x1, y1, x2, y2 = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2  # (B, N)
    w, h = (x2 - x1).clamp_min(eps), (y2 - y1).clamp_min(eps)
    dx = cx[:, None, :] - cx[:, :, None]  # (B, N, N)
    dy = cy[:, None, :] - cy[:, :, None]
    dw = (w[:, None, :] / w[:, :, None]).log()
    dh = (h[:, None, :] / h[:, :, None]).log()
    return torch.stack([dx, dy, dw, dh], dim=-1)  # (B, N, N, 4)


class BoxRelationBias(nn.Module):
    """(B, N, >=4) boxes -> (B, nh, N, N) additive attention bias: MLP(pair_geometry), one output per head."""

    def __init__(self, num_heads: int, hidden: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, num_heads))
        self.num_heads = num_heads

    def reset_parameters(self) -> None:
        """Zero the output layer, so the bias starts at zero; called after a model's own initialisation."""
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        pairs = pair_geometry(boxes.float())  # (B, N, N, 4)
        return self.mlp(pairs).permute(0, 3, 1, 2)  # (B, nh, N, N)


def biased_attention_mask(padding_mask: torch.Tensor | None, bias: torch.Tensor, start: int,
                          length: int) -> torch.Tensor:
    """A float (B, nh, L, L) attention mask: -inf at padded keys (``padding_mask`` bool (B, 1, 1, L) or None),
    ``bias`` (B, nh, N, N) added on the block of positions [start, start + N) against themselves, 0 elsewhere."""
    batch, heads, n, _ = bias.shape
    mask = bias.new_zeros(batch, heads, length, length)
    mask[:, :, start:start + n, start:start + n] = bias
    return mask if padding_mask is None else mask.masked_fill(~padding_mask, float("-inf"))
