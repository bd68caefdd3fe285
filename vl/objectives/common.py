"""Helpers shared by the VL objectives: batch-key checks and losses that stay finite when nothing is selected."""

from __future__ import annotations

import torch

from vl.errors import UserError


def require_keys(objective: str, batch: dict[str, torch.Tensor], keys: tuple[str, ...]) -> None:
    """Raise a UserError naming the objective and the keys its collator should have added."""
    missing = [key for key in keys if key not in batch]
    if missing:
        raise UserError(f"objective '{objective}' needs batch keys {', '.join(missing)} "
                        f"(has: {', '.join(sorted(batch))}); prepare the batch with vl.data.vl_masking")


def empty_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero loss that still touches ``tensors`` (so every parameter that produced them gets a zero gradient).

    Used when a batch has no masked position / no sample for an objective: a mean over nothing would be NaN, and
    leaving the parameters out of the graph would break DDP's gradient bucketing.
    """
    return sum(tensor.float().sum() for tensor in tensors) * 0.0
