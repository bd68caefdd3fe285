"""Token classification (tagging: NER, POS, chunking): one class per word, predicted at its first word piece.

Input JSONL, one object per line: ``{"tokens": [str, ...], "tags": [str, ...]}`` (equal lengths; an ``id`` is
carried along). Words past ``max_len`` word pieces are not seen by the model and get the most frequent training
tag. Predictions JSONL: ``{"tokens": [...], "tags": [...]}`` per input line. Metrics: word accuracy, and when the
tags are BIO (``B-X``/``I-X``/``O``), entity precision, recall and F1 as conlleval counts them.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vl.encoders.heads import gather_positions
from vl.errors import UserError
from vl.text.finetune import FinetuneConfig, pad_batch, read_jsonl, write_jsonl
from vl.text.tokenizer import Tokenizer

IGNORE_INDEX = -100


class TokenClassificationHead(nn.Module):
    """Dropout -> Linear(H, C) at every position; (B, T, H) -> (B, T, C). The loss uses the labelled positions."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        selected, targets = gather_positions(logits, batch["labels"])  # (N, C), (N,)
        if targets.numel() == 0:
            zero = logits.float().sum() * 0.0
            return {"tag": zero, "tag_acc": zero.detach()}
        return {"tag": F.cross_entropy(selected.float(), targets),
                "tag_acc": (selected.detach().argmax(dim=-1) == targets).float().mean()}


@dataclass(frozen=True)
class TagFeature:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # tag index at each word's first piece, -100 elsewhere
    word_starts: tuple[int, ...]  # per word: the position of its first piece, -1 when the model does not see it


def bio_chunks(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entity chunks (type, start, end) of a BIO/IOB tag sequence, with conlleval's rules."""
    chunks = set()
    start, kind = None, None
    for position, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-") if "-" in tag else (tag, "", "")
        begins = prefix == "B" or (prefix == "I" and (kind != label or start is None))
        ends = start is not None and (prefix in ("O", "B") or begins or label != kind)
        if ends:
            chunks.add((kind, start, position))
            start, kind = None, None
        if begins:
            start, kind = position, label
    return chunks


class TagTask:
    name = "tag"
    metric = "accuracy"

    def read(self, path: str | os.PathLike) -> list[dict[str, Any]]:
        rows = read_jsonl(path, "tagging")
        for number, row in enumerate(rows, start=1):
            tokens = row.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise UserError(f"{path}: example {number} has no 'tokens' list of strings")
            tags = row.get("tags")
            if tags is not None and (not isinstance(tags, list) or len(tags) != len(tokens)
                                     or not all(isinstance(t, str) for t in tags)):
                raise UserError(f"{path}: example {number} needs 'tags': one string per token")
        return rows

    def labels(self, examples: Sequence[dict[str, Any]]) -> tuple[str, ...]:
        counts: Counter[str] = Counter()
        for number, example in enumerate(examples, start=1):
            if example.get("tags") is None:
                raise UserError(f"training example {number} has no 'tags'")
            counts.update(example["tags"])
        if len(counts) < 2:
            raise UserError("the training file has fewer than two distinct tags")
        return tuple(tag for tag, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    def featurize(self, examples: Sequence[dict[str, Any]], tokenizer: Tokenizer, labels: Sequence[str],
                  cfg: FinetuneConfig, training: bool) -> list[TagFeature]:
        index = {tag: i for i, tag in enumerate(labels)}
        backend = tokenizer.backend
        backend.no_truncation()
        words = [example["tokens"] if example["tokens"] else [""] for example in examples]
        encodings = backend.encode_batch(words, is_pretokenized=True, add_special_tokens=False)
        features = []
        for number, (example, encoding) in enumerate(zip(examples, encodings), start=1):
            pieces = list(encoding.ids)[: cfg.max_len - 2]
            word_of_piece = list(encoding.word_ids)[: cfg.max_len - 2]
            starts = [-1] * len(example["tokens"])
            piece_labels = [IGNORE_INDEX] * (len(pieces) + 2)
            for position, word in enumerate(word_of_piece, start=1):
                if word is not None and word < len(starts) and starts[word] < 0:
                    starts[word] = position
                    tags = example.get("tags")
                    if tags is not None:
                        if tags[word] not in index:
                            if training:
                                raise UserError(f"training example {number} has unknown tag {tags[word]!r}")
                            continue
                        piece_labels[position] = index[tags[word]]
            ids = (tokenizer.cls_id, *pieces, tokenizer.sep_id)
            features.append(TagFeature(ids, tuple(piece_labels), tuple(starts)))
        return features

    def collate(self, features: Sequence[TagFeature]) -> dict[str, torch.Tensor]:
        input_ids = pad_batch([f.input_ids for f in features], 0)
        return {
            "input_ids": input_ids,
            "attention_mask": pad_batch([[1] * len(f.input_ids) for f in features], 0),
            "token_type_ids": torch.zeros_like(input_ids),
            "labels": pad_batch([f.labels for f in features], IGNORE_INDEX),
        }

    def build_head(self, hidden_size: int, num_labels: int, dropout: float) -> nn.Module:
        return TokenClassificationHead(hidden_size, num_labels, dropout)

    def decode(self, examples: Sequence[dict[str, Any]], features: Sequence[TagFeature],
               outputs: Sequence[torch.Tensor], labels: Sequence[str], cfg: FinetuneConfig) -> list[list[str]]:
        predictions = []
        for feature, logits in zip(features, outputs):
            best = logits.argmax(dim=-1).tolist()  # (T,)
            predictions.append([labels[best[start]] if start >= 0 else labels[0] for start in feature.word_starts])
        return predictions

    def score(self, examples: Sequence[dict[str, Any]], predictions: Sequence[Sequence[str]]) -> dict[str, float]:
        if len(predictions) != len(examples):
            raise UserError(f"{len(predictions)} predictions for {len(examples)} gold examples")
        correct = total = 0
        true_chunks = pred_chunks = matched = 0
        bio = False
        for number, (example, predicted) in enumerate(zip(examples, predictions), start=1):
            gold = example.get("tags")
            if gold is None:
                raise UserError(f"gold example {number} has no 'tags'")
            if len(predicted) != len(gold):
                raise UserError(f"prediction {number} has {len(predicted)} tags for {len(gold)} tokens")
            correct += sum(g == p for g, p in zip(gold, predicted))
            total += len(gold)
            bio = bio or any(tag[:2] in ("B-", "I-") for tag in gold)
            gold_set, pred_set = bio_chunks(gold), bio_chunks(predicted)
            true_chunks += len(gold_set)
            pred_chunks += len(pred_set)
            matched += len(gold_set & pred_set)
        metrics = {"accuracy": 100.0 * correct / max(total, 1), "count": float(len(examples))}
        if bio:
            precision = matched / pred_chunks if pred_chunks else 0.0
            recall = matched / true_chunks if true_chunks else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            metrics.update(precision=100.0 * precision, recall=100.0 * recall, f1=100.0 * f1)
        return metrics

    def write_predictions(self, examples: Sequence[dict[str, Any]], predictions: Sequence[Sequence[str]],
                          path: str | os.PathLike) -> None:
        rows = []
        for example, tags in zip(examples, predictions):
            row = {"id": example["id"]} if "id" in example else {}
            rows.append({**row, "tokens": example["tokens"], "tags": list(tags)})
        write_jsonl(rows, path)

    def read_predictions(self, path: str | os.PathLike) -> list[list[str]]:
        rows = read_jsonl(path, "--predictions")
        for number, row in enumerate(rows, start=1):
            if not isinstance(row.get("tags"), list):
                raise UserError(f"--predictions {path}: line {number} has no 'tags' list")
        return [row["tags"] for row in rows]


TASK = TagTask()
