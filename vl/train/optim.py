"""The optimizers of the training loop: AdamW (fused where it can be) or SGD, with weight decay only on matrices, and
gradient clipping folded into the fused AdamW kernel."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vl.errors import UserError

if TYPE_CHECKING:
    from vl.train.loop import TrainConfig


def decay_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups over the trainable parameters: decay on matrices, none on biases, norms and 1-d parameters."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = True) -> torch.optim.Optimizer:
    groups = decay_parameter_groups(model, cfg.weight_decay)
    if not groups:
        raise UserError("the model has no trainable parameters (every parameter has requires_grad=False)")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    # The fused kernel (CPU and CUDA) is several times faster than the per-tensor loop; it needs float parameters.
    fused = fused and all(param.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
                          for group in groups for param in group["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=fused or None)


def clipped_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], max_norm: float,
                 in_kernel: bool = True) -> torch.Tensor:
    """Clip the gradients' global norm to ``max_norm`` (as ``clip_grad_norm_``) and step; returns the norm before.

    With ``in_kernel`` and a fused Adam/AdamW, the clipping factor min(1, max_norm / (norm + 1e-6)) is applied by the
    optimizer's kernel as it reads each gradient (its ``grad_scale``, which divides the gradients; the one that
    ``GradScaler`` sets), instead of a separate pass that multiplies every gradient first. Else ``clip_grad_norm_``
    then ``step()``.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if not (in_kernel and isinstance(inner, torch.optim.Adam) and inner.defaults.get("fused")):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        return norm
    norm = torch.nn.utils.get_total_norm([param.grad for param in params if param.grad is not None])
    inner.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0).float()
    try:
        optimizer.step()
    finally:
        del inner.grad_scale
    return norm
