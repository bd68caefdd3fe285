"""Prediction heads shared by the text core and the VL models.

Heads run only at the positions that have targets: select rows first with ``gather_positions``.
"""

from __future__ import annotations

import torch
from torch import nn

from vl.encoders.transformer import activation_fn


class PredictionTransform(nn.Module):
    """Linear -> activation -> LayerNorm: the transform in front of BERT's and LXMERT's prediction decoders."""

    def __init__(self, hidden_size: int, activation: str = "gelu", layer_norm_eps: float = 1e-12,
                 out_size: int | None = None):
        super().__init__()
        out_size = out_size or hidden_size
        self.dense = nn.Linear(hidden_size, out_size)
        self.act = activation_fn(activation)
        self.norm = nn.LayerNorm(out_size, eps=layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden)))


class MLMHead(nn.Module):
    """BERT's LM head: ``PredictionTransform`` -> vocabulary projection (tied to the word embeddings) + bias.

    Call it on the hidden states at the selected positions only, (N, H) -> (N, V): the vocabulary projection is
    the most expensive matmul in the model.
    """

    def __init__(self, hidden_size: int, vocab_size: int, activation: str = "gelu", layer_norm_eps: float = 1e-12,
                 embedding_size: int | None = None):
        super().__init__()
        self.transform = PredictionTransform(hidden_size, activation, layer_norm_eps, embedding_size)
        self.decoder = nn.Linear(embedding_size or hidden_size, vocab_size)

    def tie_to(self, word_embeddings: nn.Embedding) -> None:
        """Share the vocabulary projection with the input embeddings, as BERT does."""
        self.decoder.weight = word_embeddings.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        transformed = self.transform(hidden)  # (..., E)
        flat = transformed.reshape(-1, transformed.shape[-1])  # (N, E)
        # (W h^T + b)^T rather than h W^T + b: the weight gradient then comes back as a plain (V, E) tensor, not a
        # transposed view, and the tied word embeddings' gradient is added to it in place instead of into a
        # freshly allocated (V, E) tensor.
        logits = torch.addmm(self.decoder.bias[:, None], self.decoder.weight, flat.t()).t()  # (N, V)
        return logits.reshape(*transformed.shape[:-1], logits.shape[-1])  # (..., V)


class RegionHead(nn.Module):
    """LXMERT's visual head: one shared ``PredictionTransform`` and a decoder per region target.

    ``outputs`` maps a target name to its width, e.g. ``{"obj": num_classes, "attr": num_attrs, "feat": 2048}``:
    "obj" serves MRC and MRC-kl, "feat" serves MRFR. (N, H) -> {name: (N, width)}.
    """

    def __init__(self, hidden_size: int, outputs: dict[str, int], activation: str = "gelu",
                 layer_norm_eps: float = 1e-12):
        super().__init__()
        self.transform = PredictionTransform(hidden_size, activation, layer_norm_eps)
        self.decoders = nn.ModuleDict({name: nn.Linear(hidden_size, width) for name, width in outputs.items()})

    def forward(self, hidden: torch.Tensor, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        transformed = self.transform(hidden)
        return {name: self.decoders[name](transformed) for name in (names or list(self.decoders))}


class AnswerHead(nn.Module):
    """LXMERT's QA / VQA head over the pooled output: Linear(H, 2H) -> GELU -> LayerNorm -> Linear(2H, A)."""

    def __init__(self, hidden_size: int, num_answers: int, layer_norm_eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size * 2)
        self.act = activation_fn("gelu")
        self.norm = nn.LayerNorm(hidden_size * 2, eps=layer_norm_eps)
        self.classifier = nn.Linear(hidden_size * 2, num_answers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(self.act(self.dense(pooled))))


def gather_positions(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """Select the rows of ``hidden`` (B, T, H) where ``labels`` (B, T) != ignore_index.

    Returns (N, H) hidden states and (N,) labels, so that heads run only at masked positions.
    """
    selected = labels != ignore_index
    return hidden[selected], labels[selected]
