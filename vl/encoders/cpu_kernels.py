"""CPU training speed paths: a dropout with a cheaper random mask and attention written out with it.

Why: on CPU ``bernoulli_`` draws one 32-bit number per element and SDPA with dropout falls back to a slow path; GPUs
use their fused kernels instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout`` with a cheaper random mask: 16 random bits per element instead of one generator call.

    Each element is dropped with probability ``p`` rounded to a multiple of 2^-16 (0.1 -> 0.10000610) and the
    others are scaled by ``1 / (1 - p)``, as in ``F.dropout``; the backward pass multiplies by the same mask. On
    CPU ``bernoulli_`` draws one 32-bit number per element; this draws one 64-bit number per four elements and is
    ~5x faster. Other devices use ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:  # GPUs have a fused dropout kernel
        return F.dropout(x, p, training)
    numel = x.numel()
    bits = torch.empty((numel + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    threshold = -(2**15) + round(p * 2**16)  # an int16 below it is dropped: P = round(p * 2^16) / 2^16
    keep = bits.view(torch.int16)[:numel].view(x.shape) >= threshold
    return x.mul(keep).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` drawing its mask with ``dropout`` (16 random bits per element)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v with dropout on the probabilities: what ``F.scaled_dot_product_attention``
    computes, written out for training.

    q (B, nh, T, hd), k and v (B, nh, S, hd), attn_mask (B|1, 1|nh, T|1, S), bool (True = attend) or additive float
    -> (B, nh, T, hd).
    On CPU SDPA falls back to this computation whenever there is dropout, with a slower mask, and its fused kernel
    has a slow bf16 backward; the softmax runs in float32 here.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)  # (B, nh, T, S)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:  # additive: 0 or a bias where attended, -inf where not
        scores = scores + attn_mask
    probs = dropout(scores.softmax(dim=-1, dtype=torch.float32), dropout_p)  # (B, nh, T, S)
    return torch.matmul(probs.to(v.dtype), v)
