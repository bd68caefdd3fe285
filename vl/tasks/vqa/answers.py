"""The VQA answer vocabulary and soft targets: counting normalised answers, the vocabulary of the frequent ones,
each annotated question's official leave-one-annotator-out scores, and ``answers.json``."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from vl.config import atomic_write_text
from vl.data.formats import VqaAnnotation
from vl.errors import UserError
from vl.tasks.vqa.config import AnswerCounting
from vl.tasks.vqa.metric import normalize_answer, vqa_accuracy

ANSWERS_FILE = "answers.json"


def count_answers(annotations: Sequence[VqaAnnotation], counting: AnswerCounting = "multiple_choice") -> Counter:
    """Occurrences of each normalised answer: one per question (its ``multiple_choice_answer``) or one per
    annotator answer (``counting="all"``)."""
    counts: Counter = Counter()
    for annotation in annotations:
        answers = [annotation.multiple_choice_answer] if counting == "multiple_choice" else annotation.answer_strings
        for answer in answers:
            normalized = normalize_answer(answer)
            if normalized:
                counts[normalized] += 1
    return counts


def build_answer_vocab(annotations: Sequence[VqaAnnotation], min_count: int,
                       counting: AnswerCounting = "multiple_choice") -> list[str]:
    """Normalised answers occurring at least ``min_count`` times, most frequent first (ties alphabetical)."""
    counts = count_answers(annotations, counting)
    kept = [(answer, count) for answer, count in counts.items() if count >= min_count]
    return [answer for answer, _ in sorted(kept, key=lambda item: (-item[1], item[0]))]


def saved_or_built_answers(saved: Sequence[str | os.PathLike], annotations: Sequence[VqaAnnotation],
                           min_count: int, counting: AnswerCounting, what: str, key: str) -> list[str]:
    """The vocabulary of the first existing ``answers.json`` among ``saved``, else built from ``annotations``
    (``build_answer_vocab``); a UserError naming ``what`` (the annotations' flag and path) and the config ``key``
    to lower when no answer is frequent enough."""
    for path in saved:
        if Path(path).is_file():
            return read_answers(path)
    answers = build_answer_vocab(annotations, min_count, counting)
    if not answers:
        raise UserError(f"no answer of {what} occurs {min_count} times or more: lower {key}")
    return answers


def soft_targets(gt_answers: Sequence[str], answer_index: dict[str, int]) -> dict[int, float]:
    """``{vocabulary index: score}`` for every vocabulary answer among the annotators' (normalised) answers, the
    score being the official leave-one-annotator-out accuracy of predicting it (``vqa_accuracy``)."""
    targets: dict[int, float] = {}
    for candidate in dict.fromkeys(normalize_answer(answer) for answer in gt_answers):
        index = answer_index.get(candidate)
        if index is None:
            continue
        score = vqa_accuracy(candidate, gt_answers)
        if score > 0:
            targets[index] = score
    return targets


def write_answers(answers: Sequence[str], path: str | os.PathLike) -> None:
    atomic_write_text(path, json.dumps({"answers": list(answers)}, indent=0) + "\n")


def read_answers(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing: the run has no answer vocabulary")
    try:
        answers = json.loads(path.read_text(encoding="utf-8"))["answers"]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not an answers file ({err})") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise UserError(f"{path}: 'answers' must be a non-empty list of strings")
    return answers
