"""Parameter-efficient fine-tuning: bottleneck adapters (Houlsby et al.) and an ELMo-style scalar mix of layers.

Adapters go after the attention and after the feed-forward sublayer of every ``TransformerLayer``, on the
sublayer's output before the residual sum (``Residual.adapter``). A new adapter is the identity (its up-projection
starts at zero), so inserting adapters does not change a model's outputs until they are trained. In adapter
fine-tuning only the adapters, the LayerNorms and the task head train; one frozen base model then serves many
tasks, each task storing only its adapters and head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vl.encoders.transformer import TransformerLayer, activation_fn


class BottleneckAdapter(nn.Module):
    """``x + up(act(down(x)))`` with a ``bottleneck``-wide hidden layer; (…, D) -> (…, D)."""

    def __init__(self, dim: int, bottleneck: int, activation: str = "gelu", init_std: float = 0.02):
        super().__init__()
        if bottleneck <= 0:
            raise ValueError(f"adapter bottleneck must be positive, got {bottleneck}")
        self.down = nn.Linear(dim, bottleneck)
        self.act = activation_fn(activation)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # identity at insertion
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


def add_adapters(module: nn.Module, bottleneck: int, activation: str = "gelu") -> int:
    """Put a ``BottleneckAdapter`` after the self-attention and the feed-forward of every ``TransformerLayer`` in
    ``module``; returns the number of adapters added. Parameter names gain ``….attention_residual.adapter.*``
    and ``….ffn_residual.adapter.*``; all other names are unchanged, so base checkpoints still load."""
    added = 0
    for layer in module.modules():
        if isinstance(layer, TransformerLayer):
            dim = layer.attention.out.out_features
            for residual in (layer.attention_residual, layer.ffn_residual):
                if residual.adapter is None:
                    residual.adapter = BottleneckAdapter(dim, bottleneck, activation)
                    added += 1
    return added


def is_adapter_or_norm(name: str, module: nn.Module) -> bool:
    """True for parameters an adapter fine-tuning trains inside the encoder: adapters and LayerNorms."""
    return ".adapter." in f".{name}" or isinstance(module, nn.LayerNorm)


def freeze_all_but_adapters(encoder: nn.Module) -> list[str]:
    """Set ``requires_grad`` on adapters and LayerNorms only; returns the names left trainable."""
    trainable = []
    for module_name, module in encoder.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            param.requires_grad = is_adapter_or_norm(name, module)
            if param.requires_grad:
                trainable.append(name)
    return trainable


class ScalarMix(nn.Module):
    """ELMo's learned mix of layers: ``gamma * Σ_l softmax(w)_l · h_l`` over the embeddings and every layer."""

    def __init__(self, num_inputs: int):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_inputs))
        self.gamma = nn.Parameter(torch.ones(()))

    def forward(self, layers: Sequence[torch.Tensor]) -> torch.Tensor:
        """``num_inputs`` tensors (B, T, H) -> (B, T, H)."""
        if len(layers) != len(self.weights):
            raise ValueError(f"ScalarMix expects {len(self.weights)} layers, got {len(layers)}")
        stacked = torch.stack(list(layers), dim=0)  # (L+1, B, T, H)
        mix = torch.softmax(self.weights, dim=0).to(stacked.dtype)  # (L+1,)
        return self.gamma * (mix[:, None, None, None] * stacked).sum(dim=0)
