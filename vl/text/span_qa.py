"""Extractive question answering (SQuAD v1.1): predict the start and end word piece of the answer in the context.

Input: SQuAD v1.1 JSON, ``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers":
[{"text", "answer_start"}]}]}]}]}``. A context longer than the window is read in overlapping windows
(``doc_stride`` apart), ``[CLS] question [SEP] window [SEP]``; a training window that does not contain the answer
points at [CLS]. At prediction the best span (start + end logit, end >= start, at most ``max_answer_len`` pieces)
over all windows wins, a piece counting only in the window where it has the most context on both sides (BERT).
Predictions: JSON ``{question_id: answer_text}``. Metrics: exact match and F1 with the official SQuAD v1.1
answer normalisation (lower case, no punctuation, no articles, single spaces).
"""

from __future__ import annotations

import json
import os
import re
import string
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vl.config import atomic_write_text
from vl.errors import UserError
from vl.text.finetune import FinetuneConfig, pad_batch
from vl.text.tokenizer import Tokenizer


# --------------------------------------------------------------------------------------------------------------
# The official SQuAD v1.1 metric


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse white space (SQuAD v1.1's evaluate)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QAExample:
    qid: str
    question: str
    context: str
    answers: tuple[str, ...]
    answer_start: int  # character offset of the first answer, -1 without answers


@dataclass(frozen=True)
class QAFeature:
    example_index: int
    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...]
    start_position: int  # training target (0 = [CLS] when the window misses the answer)
    end_position: int
    context_offset: int  # position of the window's first context piece
    char_spans: tuple[tuple[int, int], ...]  # (start, end) characters of each window piece in the context
    max_context: tuple[bool, ...]  # per window piece: this window gives it the most context


class SpanHead(nn.Module):
    """Linear(H, 2): start and end logits per position; (B, T, H) -> (B, T, 2)."""

    def __init__(self, hidden_size: int, num_labels: int = 2, dropout: float = 0.1):
        super().__init__()
        self.qa_outputs = nn.Linear(hidden_size, 2)
        nn.init.normal_(self.qa_outputs.weight, std=0.02)
        nn.init.zeros_(self.qa_outputs.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.qa_outputs(hidden)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        padding = ~batch["attention_mask"].bool()  # (B, T)
        logits = logits.float().masked_fill(padding[..., None], -1e4)
        start_logits, end_logits = logits[..., 0], logits[..., 1]  # (B, T) each
        start_loss = F.cross_entropy(start_logits, batch["start_positions"])
        end_loss = F.cross_entropy(end_logits, batch["end_positions"])
        exact = ((start_logits.detach().argmax(-1) == batch["start_positions"])
                 & (end_logits.detach().argmax(-1) == batch["end_positions"])).float().mean()
        return {"span": (start_loss + end_loss) / 2, "span_acc": exact}


def _find_answer(context: str, text: str, start: int) -> int:
    """The answer's character start: ``start`` when the text is there, else its nearest occurrence, else -1."""
    if context[start:start + len(text)] == text:
        return start
    found = [m.start() for m in re.finditer(re.escape(text), context)]
    return min(found, key=lambda s: abs(s - start)) if found else -1


class SpanQATask:
    name = "span-qa"
    metric = "f1"

    def read(self, path: str | os.PathLike) -> list[QAExample]:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"SQuAD file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"SQuAD file {path} is not valid JSON ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise UserError(f"SQuAD file {path} has no 'data' list (expected SQuAD v1.1 JSON)")
        examples = []
        try:
            for article in data["data"]:
                for paragraph in article["paragraphs"]:
                    context = paragraph["context"]
                    for qa in paragraph["qas"]:
                        answers = qa.get("answers", [])
                        texts = tuple(str(answer["text"]) for answer in answers)
                        start = int(answers[0]["answer_start"]) if answers else -1
                        examples.append(QAExample(str(qa["id"]), str(qa["question"]), str(context), texts, start))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise UserError(f"SQuAD file {path} is malformed: missing or bad field {err}") from None
        if not examples:
            raise UserError(f"SQuAD file {path} holds no questions")
        return examples

    def labels(self, examples: Sequence[QAExample]) -> tuple[str, ...]:
        return ()

    def featurize(self, examples: Sequence[QAExample], tokenizer: Tokenizer, labels: Sequence[str],
                  cfg: FinetuneConfig, training: bool) -> list[QAFeature]:
        backend = tokenizer.backend
        backend.no_truncation()
        questions = backend.encode_batch([e.question for e in examples], add_special_tokens=False)
        unique_contexts = list(dict.fromkeys(e.context for e in examples))
        context_encodings = dict(zip(unique_contexts, backend.encode_batch(unique_contexts,
                                                                             add_special_tokens=False)))
        features: list[QAFeature] = []
        skipped = 0
        for index, (example, question) in enumerate(zip(examples, questions)):
            query = list(question.ids)[: cfg.max_query_len]
            capacity = cfg.max_len - len(query) - 3
            if capacity < 1:
                raise UserError(f"finetune.max_len {cfg.max_len} leaves no room for the context after a "
                                f"{len(query)}-piece question; raise max_len or lower max_query_len")
            context = context_encodings[example.context]
            ids, offsets = list(context.ids), list(context.offsets)
            answer_tokens = None
            if training:
                if not example.answers:
                    raise UserError(f"training question {example.qid} has no answer")
                char_start = _find_answer(example.context, example.answers[0], example.answer_start)
                if char_start < 0:
                    skipped += 1
                    continue
                char_end = char_start + len(example.answers[0])
                inside = [i for i, (s, e) in enumerate(offsets) if s < char_end and e > char_start]
                if not inside:
                    skipped += 1
                    continue
                answer_tokens = (inside[0], inside[-1])
            windows = []
            start = 0
            while True:
                end = min(start + capacity, len(ids))
                windows.append((start, end))
                if end >= len(ids):
                    break
                start += min(cfg.doc_stride, capacity)
            best_window = {}
            for w, (start, end) in enumerate(windows):
                for token in range(start, end):
                    score = min(token - start, end - 1 - token) + 0.01 * (end - start)
                    if token not in best_window or score > best_window[token][0]:
                        best_window[token] = (score, w)
            for w, (start, end) in enumerate(windows):
                input_ids = (tokenizer.cls_id, *query, tokenizer.sep_id, *ids[start:end], tokenizer.sep_id)
                context_offset = len(query) + 2
                types = (0,) * context_offset + (1,) * (end - start + 1)
                start_position = end_position = 0
                if answer_tokens is not None and start <= answer_tokens[0] and answer_tokens[1] < end:
                    start_position = context_offset + answer_tokens[0] - start
                    end_position = context_offset + answer_tokens[1] - start
                features.append(QAFeature(
                    index, input_ids, types, start_position, end_position, context_offset,
                    tuple((int(s), int(e)) for s, e in offsets[start:end]),
                    tuple(best_window[token][1] == w for token in range(start, end)),
                ))
        if skipped:
            print(f"span-qa: skipped {skipped} training question(s) whose answer is not found in the context",
                  file=sys.stderr)
        return features

    def collate(self, features: Sequence[QAFeature]) -> dict[str, torch.Tensor]:
        return {
            "input_ids": pad_batch([f.input_ids for f in features], 0),
            "attention_mask": pad_batch([[1] * len(f.input_ids) for f in features], 0),
            "token_type_ids": pad_batch([f.token_type_ids for f in features], 0),
            "start_positions": torch.tensor([f.start_position for f in features], dtype=torch.long),
            "end_positions": torch.tensor([f.end_position for f in features], dtype=torch.long),
        }

    def build_head(self, hidden_size: int, num_labels: int, dropout: float) -> nn.Module:
        return SpanHead(hidden_size)

    def decode(self, examples: Sequence[QAExample], features: Sequence[QAFeature], outputs: Sequence[torch.Tensor],
               labels: Sequence[str], cfg: FinetuneConfig) -> dict[str, str]:
        best: dict[int, tuple[float, str]] = {}
        for feature, logits in zip(features, outputs):
            window = len(feature.char_spans)
            context_logits = logits[feature.context_offset:feature.context_offset + window]  # (W, 2)
            if len(context_logits) == 0:
                continue
            k = min(cfg.n_best, len(context_logits))
            starts = torch.topk(context_logits[:, 0], k).indices.tolist()
            ends = torch.topk(context_logits[:, 1], k).indices.tolist()
            context = examples[feature.example_index].context
            for s in starts:
                if not feature.max_context[s]:
                    continue
                for e in ends:
                    if e < s or e - s + 1 > cfg.max_answer_len:
                        continue
                    score = float(context_logits[s, 0] + context_logits[e, 1])
                    current = best.get(feature.example_index)
                    if current is None or score > current[0]:
                        best[feature.example_index] = (score, context[feature.char_spans[s][0]:
                                                                       feature.char_spans[e][1]])
        return {example.qid: best.get(index, (0.0, ""))[1] for index, example in enumerate(examples)}

    def score(self, examples: Sequence[QAExample], predictions: dict[str, str]) -> dict[str, float]:
        exact = f1 = 0.0
        for example in examples:
            if not example.answers:
                raise UserError(f"gold question {example.qid} has no answers")
            prediction = predictions.get(example.qid, "")  # unanswered questions score 0, as officially
            exact += max(exact_match_score(prediction, truth) for truth in example.answers)
            f1 += max(f1_score(prediction, truth) for truth in example.answers)
        total = len(examples)
        return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total, "count": float(total)}

    def write_predictions(self, examples: Sequence[QAExample], predictions: dict[str, str],
                          path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(predictions, indent=2, ensure_ascii=False) + "\n")

    def read_predictions(self, path: str | os.PathLike) -> dict[str, str]:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--predictions file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"--predictions {path} is not valid JSON ({err})") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise UserError(f"--predictions {path} must be a JSON object {{question_id: answer_text}}")
        return data


TASK = SpanQATask()
