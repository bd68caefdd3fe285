"""Word-region alignment by optimal transport (UNITER's WRA), solved with IPOT (Xie et al., 2019).

For each pair the cost between word i and region j is the cosine distance of their hidden states; IPOT finds a
transport plan P (uniform marginals over the real words and the real regions) without gradients, and the OT
distance sum_ij C_ij P_ij is differentiable through C. Matched pairs should transport cheaply, mismatched ones
expensively: the loss is (sum of distances of matched pairs - sum of distances of mismatched pairs) / B, as in
UNITER's pretraining.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vl.errors import UserError
from vl.fusion.base import VLOutput


def cosine_cost(text_hidden: torch.Tensor, region_hidden: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - cosine similarity of every (word, region): (B, M, H), (B, N, H) -> (B, M, N) in [0, 2]."""
    text_unit = F.normalize(text_hidden, p=2, dim=-1, eps=eps)
    region_unit = F.normalize(region_hidden, p=2, dim=-1, eps=eps)
    return 1.0 - text_unit @ region_unit.transpose(1, 2)  # (B, M, N)


@torch.no_grad()
def ipot_plan(cost: torch.Tensor, text_valid: torch.Tensor, region_valid: torch.Tensor, beta: float = 0.5,
              iterations: int = 50, inner_iterations: int = 1) -> torch.Tensor:
    """The IPOT transport plan (B, M, N) between the valid words and regions, with uniform marginals.

    cost (B, M, N); text_valid (B, M) and region_valid (B, N) bool. Each outer iteration is a proximal step
    Q = exp(-C / beta) * P followed by ``inner_iterations`` Sinkhorn projections; after the last projection the
    region marginal is exact and the word marginal converges. Rows / columns of padding are 0; a pair with no
    valid word or no valid region has an all-zero plan.
    """
    cost = cost.float()
    valid = text_valid[:, :, None] & region_valid[:, None, :]  # (B, M, N)
    num_text = text_valid.sum(dim=1, keepdim=True).clamp(min=1).float()  # (B, 1)
    num_regions = region_valid.sum(dim=1, keepdim=True).clamp(min=1).float()  # (B, 1)
    text_marginal = text_valid.float() / num_text  # (B, M)
    region_marginal = region_valid.float() / num_regions  # (B, N)
    kernel = torch.exp(-cost / beta) * valid  # (B, M, N)
    plan = valid.float()
    region_scale = region_marginal.clone()  # (B, N)
    tiny = torch.finfo(cost.dtype).tiny
    for _ in range(iterations):
        proximal = kernel * plan  # (B, M, N)
        for _ in range(inner_iterations):
            text_scale = text_marginal / (proximal @ region_scale[:, :, None]).squeeze(2).clamp(min=tiny)  # (B, M)
            region_scale = region_marginal / (text_scale[:, None, :] @ proximal).squeeze(1).clamp(min=tiny)  # (B, N)
        plan = text_scale[:, :, None] * proximal * region_scale[:, None, :]  # (B, M, N)
    return plan * valid


def ot_distance(text_hidden: torch.Tensor, region_hidden: torch.Tensor, text_valid: torch.Tensor,
                region_valid: torch.Tensor, beta: float = 0.5, iterations: int = 50,
                inner_iterations: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """OT distance per pair (B,) (differentiable through the cost) and the plan (B, M, N) it used.

    Computed in float32 even under autocast (as UNITER does): IPOT's exp(-C / beta) scaling is not stable in bf16.
    """
    with torch.autocast(device_type=text_hidden.device.type, enabled=False):
        cost = cosine_cost(text_hidden.float(), region_hidden.float())  # (B, M, N)
        plan = ipot_plan(cost.detach(), text_valid.bool(), region_valid.bool(), beta, iterations, inner_iterations)
        return (cost * plan).sum(dim=(1, 2)), plan


class WordRegionAlignment(nn.Module):
    """UNITER's WRA: ``{"wra": (sum OT(matched) - sum OT(mismatched)) / B}``; no parameters of its own.

    Batch keys: ``attention_mask (B, T)``, ``region_mask (B, R)`` (1 at real tokens / regions; absent = all real)
    and ``itm_labels (B,)`` (1 matched, 0 mismatched; absent = all matched). With ``exclude_cls`` the [CLS]
    token (position 0) takes no part in the alignment. Needs text and region hidden states of the same width.
    """

    name = "wra"
    needs_masking = None
    needs_negatives = True
    batch_keys = ("itm_labels",)

    def __init__(self, text_hidden_size: int, region_hidden_size: int, beta: float = 0.5, iterations: int = 50,
                 inner_iterations: int = 1, exclude_cls: bool = True):
        super().__init__()
        if text_hidden_size != region_hidden_size:
            raise UserError(f"objective 'wra' compares words and regions, so it needs equal widths; the model has "
                            f"text {text_hidden_size} and regions {region_hidden_size}")
        if beta <= 0 or iterations < 1 or inner_iterations < 1:
            raise UserError(f"objective 'wra': beta must be > 0 and iterations >= 1, got beta={beta}, "
                            f"iterations={iterations}, inner_iterations={inner_iterations}")
        self.beta = beta
        self.iterations = iterations
        self.inner_iterations = inner_iterations
        self.exclude_cls = exclude_cls

    def forward(self, output: VLOutput, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        text_hidden, region_hidden = output.text_hidden, output.region_hidden
        batch_size, num_text = text_hidden.shape[:2]
        device = text_hidden.device
        text_valid = batch.get("attention_mask")
        text_valid = (text_valid.bool() if text_valid is not None
                      else torch.ones(batch_size, num_text, dtype=torch.bool, device=device))
        if self.exclude_cls:
            text_valid = text_valid.clone()
            text_valid[:, 0] = False
        region_valid = batch.get("region_mask")
        region_valid = (region_valid.bool() if region_valid is not None
                        else torch.ones(region_hidden.shape[:2], dtype=torch.bool, device=device))
        distance, _ = ot_distance(text_hidden, region_hidden, text_valid, region_valid, self.beta, self.iterations,
                                  self.inner_iterations)  # (B,)
        if "itm_labels" in batch:
            sign = torch.where(batch["itm_labels"] == 1, 1.0, -1.0).to(distance)
        else:
            sign = torch.ones_like(distance)
        return {self.name: (sign * distance).sum() / max(batch_size, 1)}
