"""Sequence classification, single sentence or pair: one class per input, from the [CLS] position.

Input JSONL, one object per line: ``{"text": str, "text_pair": str (optional), "label": any JSON value}``; an
``id`` field is carried into the predictions. Predictions JSONL: the input object with ``label`` set to the
predicted class. Metric: accuracy (and macro-F1 over the gold classes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vl.errors import UserError
from vl.text.finetune import FinetuneConfig, pad_batch, read_jsonl, write_jsonl
from vl.text.tokenizer import Tokenizer


def label_key(value: Any) -> str:
    """A hashable, type-preserving key of a JSON label (1 and "1" are different labels)."""
    return f"{type(value).__name__}:{value}"


class SequenceClassificationHead(nn.Module):
    """Dropout -> Linear(H, H) -> tanh -> dropout -> Linear(H, C) on the [CLS] row; (B, T, H) -> (B, C)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.classifier = nn.Linear(hidden_size, num_labels)
        for linear in (self.dense, self.classifier):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.dense(self.dropout(hidden[:, 0])))
        return self.classifier(self.dropout(x))

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        return {"cls": F.cross_entropy(logits.float(), labels),
                "cls_acc": (logits.detach().argmax(dim=-1) == labels).float().mean()}


@dataclass(frozen=True)
class ClassifyFeature:
    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...]
    label: int  # class index, -1 when unknown


class ClassifyTask:
    name = "classify"
    metric = "accuracy"

    def read(self, path: str | os.PathLike) -> list[dict[str, Any]]:
        rows = read_jsonl(path, "classification")
        for number, row in enumerate(rows, start=1):
            if not isinstance(row.get("text"), str):
                raise UserError(f"{path}: example {number} has no string 'text'")
            if "text_pair" in row and row["text_pair"] is not None and not isinstance(row["text_pair"], str):
                raise UserError(f"{path}: example {number} has a 'text_pair' that is not a string")
        return rows

    def labels(self, examples: Sequence[dict[str, Any]]) -> tuple[Any, ...]:
        values: dict[str, Any] = {}
        for number, example in enumerate(examples, start=1):
            if "label" not in example:
                raise UserError(f"training example {number} has no 'label'")
            if isinstance(example["label"], (dict, list)):
                raise UserError(f"training example {number}: 'label' must be a string, number or boolean")
            values.setdefault(label_key(example["label"]), example["label"])
        if len(values) < 2:
            raise UserError("the training file has fewer than two distinct labels")
        return tuple(values[key] for key in sorted(values))

    def featurize(self, examples: Sequence[dict[str, Any]], tokenizer: Tokenizer, labels: Sequence[Any],
                  cfg: FinetuneConfig, training: bool) -> list[ClassifyFeature]:
        index = {label_key(label): i for i, label in enumerate(labels)}
        singles = [i for i, e in enumerate(examples) if e.get("text_pair") is None]
        pairs = [i for i, e in enumerate(examples) if e.get("text_pair") is not None]
        encoded: dict[int, Any] = {}
        if singles:
            for i, enc in zip(singles, tokenizer.encode_batch([examples[i]["text"] for i in singles],
                                                              max_len=cfg.max_len)):
                encoded[i] = enc
        if pairs:
            for i, enc in zip(pairs, tokenizer.encode_batch([examples[i]["text"] for i in pairs],
                                                            [examples[i]["text_pair"] for i in pairs],
                                                            max_len=cfg.max_len)):
                encoded[i] = enc
        features = []
        for i, example in enumerate(examples):
            label = -1
            if "label" in example:
                label = index.get(label_key(example["label"]), -1)
                if label < 0 and training:
                    raise UserError(f"training example {i + 1} has unknown label {example['label']!r}")
            features.append(ClassifyFeature(tuple(encoded[i].ids), tuple(encoded[i].type_ids), label))
        return features

    def collate(self, features: Sequence[ClassifyFeature]) -> dict[str, torch.Tensor]:
        input_ids = pad_batch([f.input_ids for f in features], 0)
        return {
            "input_ids": input_ids,
            "attention_mask": pad_batch([[1] * len(f.input_ids) for f in features], 0),
            "token_type_ids": pad_batch([f.token_type_ids for f in features], 0),
            "labels": torch.tensor([f.label for f in features], dtype=torch.long),
        }

    def build_head(self, hidden_size: int, num_labels: int, dropout: float) -> nn.Module:
        return SequenceClassificationHead(hidden_size, num_labels, dropout)

    def decode(self, examples: Sequence[dict[str, Any]], features: Sequence[ClassifyFeature],
               outputs: Sequence[torch.Tensor], labels: Sequence[Any], cfg: FinetuneConfig) -> list[Any]:
        return [labels[int(logits.argmax())] for logits in outputs]

    def score(self, examples: Sequence[dict[str, Any]], predictions: Sequence[Any]) -> dict[str, float]:
        if len(predictions) != len(examples):
            raise UserError(f"{len(predictions)} predictions for {len(examples)} gold examples")
        if any("label" not in example for example in examples):
            raise UserError("a gold example has no 'label'")
        gold = [label_key(example["label"]) for example in examples]
        predicted = [label_key(label) for label in predictions]
        correct = sum(g == p for g, p in zip(gold, predicted))
        f1s = []
        for cls in sorted(set(gold)):
            tp = sum(g == cls and p == cls for g, p in zip(gold, predicted))
            fp = sum(g != cls and p == cls for g, p in zip(gold, predicted))
            fn = sum(g == cls and p != cls for g, p in zip(gold, predicted))
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        return {"accuracy": 100.0 * correct / len(gold), "macro_f1": 100.0 * sum(f1s) / len(f1s),
                "count": float(len(gold))}

    def write_predictions(self, examples: Sequence[dict[str, Any]], predictions: Sequence[Any],
                          path: str | os.PathLike) -> None:
        write_jsonl([{**example, "label": label} for example, label in zip(examples, predictions)], path)

    def read_predictions(self, path: str | os.PathLike) -> list[Any]:
        rows = read_jsonl(path, "--predictions")
        for number, row in enumerate(rows, start=1):
            if "label" not in row:
                raise UserError(f"--predictions {path}: line {number} has no 'label'")
        return [row["label"] for row in rows]


TASK = ClassifyTask()
