"""The official VQA accuracy, reimplemented to give the same numbers as the VQA v2 evaluation script.

The official script (``vqaEval.py`` of the VQA API, GT-Vision-Lab) scores one predicted answer against the 10
annotator answers like this, and so does ``vqa_accuracy``:

1. the prediction has ``\\n`` and ``\\t`` turned into spaces and is stripped, then goes through
   ``process_punctuation`` and ``process_digit_article`` (lower case, number words to digits, articles dropped,
   missing apostrophes of contractions restored);
2. the annotator answers go through ``process_punctuation`` only, and only when they are not all identical (the
   released annotations are already normalised; this mirrors the script exactly);
3. for each of the 10 annotators in turn, leave that annotator out and score ``min(1, #matches among the other 9
   / 3)``; the question's accuracy is the mean of the 10 scores. So 4 or more matching answers out of 10 give 1.0,
   3 give 0.9, 2 give 0.6 (not 2/3), 1 gives 0.3 and 0 give 0.

Overall accuracy is the mean over questions; per answer type and per question type likewise over their questions.
Accuracies are returned in percent, like the official script (which also rounds them to 2 decimals for display).
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from vl.data.formats import VqaAnnotation
from vl.errors import UserError

# The official tables, verbatim.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
              "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# The official pattern; "(?!<=\d)" is a lookahead (the script's typo for a lookbehind), so in effect it removes every
# period that is not followed by a digit.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The script calls ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in ``count``, so at most 32 periods go.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


# Pure functions of short strings that repeat across a split (every question has 10 annotator answers, mostly the
# same few words): cached, the soft targets of the generated world's 6,000 training questions take 0.12 s, not 0.76.
@functools.lru_cache(maxsize=1 << 18)
def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: a punctuation mark next to a space (or any mark, when the text holds a
    digit-comma-digit) is deleted, otherwise replaced by a space; periods not followed by a digit are deleted."""
    out = text
    for mark in PUNCT:
        if (mark + " " in text or " " + mark in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower case, number words 0-10 to digits, drop a/an/the, restore
    contractions (``dont`` -> ``don't``), words joined by single spaces."""
    words = []
    for word in text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


@functools.lru_cache(maxsize=1 << 18)
def normalize_answer(answer: str) -> str:
    """A predicted answer as the official script compares it (steps 1 of the module docstring)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """One question's official accuracy in [0, 1]: the mean over annotators of ``min(1, matches among the
    others / 3)``. ``gt_answers`` are the annotators' answers (normally 10)."""
    if not gt_answers:
        raise UserError("a VQA annotation needs at least one annotator answer")
    predicted = normalize_answer(prediction)
    answers = list(gt_answers)
    if len(set(answers)) > 1:
        answers = [process_punctuation(answer) for answer in answers]
    scores = []
    for left_out in range(len(answers)):
        matching = sum(1 for i, answer in enumerate(answers) if i != left_out and answer == predicted)
        scores.append(min(1.0, matching / 3.0))
    return sum(scores) / len(scores)


def _results_map(results: Mapping[int, str] | Sequence[Mapping[str, Any]]) -> dict[int, str]:
    if isinstance(results, Mapping):
        return {int(k): str(v) for k, v in results.items()}
    mapping: dict[int, str] = {}
    for i, item in enumerate(results):
        if not isinstance(item, Mapping) or "question_id" not in item or "answer" not in item:
            raise UserError(f"VQA results[{i}] must be an object with question_id and answer")
        question_id = int(item["question_id"])
        if question_id in mapping:
            raise UserError(f"VQA results[{i}]: question_id {question_id} is answered twice")
        if not isinstance(item["answer"], str):
            raise UserError(f"VQA results[{i}].answer must be a string, got {item['answer']!r}")
        mapping[question_id] = item["answer"]
    return mapping


def evaluate_vqa(annotations: Sequence[VqaAnnotation],
                 results: Mapping[int, str] | Sequence[Mapping[str, Any]],
                 groups: Mapping[int, str] | None = None) -> dict[str, Any]:
    """Official VQA accuracy of ``results`` (``{question_id: answer}`` or ``[{"question_id", "answer"}]``) against
    ``annotations`` (from ``read_vqa_annotations``). Like the official script, the results must answer exactly the
    annotated questions. Returns percentages::

        {"overall": 61.3, "per_answer_type": {"yes/no": ..., "number": ..., "other": ...},
         "per_question_type": {"how many": ..., ...}, "num_questions": N}

    ``groups`` (question id -> a group name, any grouping of one's own) adds ``"per_group"``: the accuracy of each
    group's questions (questions without a group are left out of it).
    """
    answers = _results_map(results)
    if not annotations:
        raise UserError("no VQA annotations to evaluate against")
    annotated = {ann.question_id for ann in annotations}
    missing = [ann.question_id for ann in annotations if ann.question_id not in answers]
    if missing:
        raise UserError(f"VQA results do not answer {len(missing)} of {len(annotated)} annotated questions "
                        f"(first: question_id {missing[0]})")
    extra = sorted(set(answers) - annotated)
    if extra:
        raise UserError(f"VQA results answer {len(extra)} questions that are not annotated (first: question_id "
                        f"{extra[0]})")
    per_question: list[float] = []
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    by_group: dict[str, list[float]] = defaultdict(list)
    for ann in annotations:
        accuracy = vqa_accuracy(answers[ann.question_id], ann.answer_strings)
        per_question.append(accuracy)
        by_answer_type[ann.answer_type].append(accuracy)
        by_question_type[ann.question_type].append(accuracy)
        if groups is not None and ann.question_id in groups:
            by_group[groups[ann.question_id]].append(accuracy)

    def percent(values: list[float]) -> float:
        return 100.0 * sum(values) / len(values)

    metrics = {
        "overall": percent(per_question),
        "per_answer_type": {name: percent(values) for name, values in sorted(by_answer_type.items())},
        "per_question_type": {name: percent(values) for name, values in sorted(by_question_type.items())},
        "num_questions": len(per_question),
    }
    if groups is not None:
        metrics["per_group"] = {name: percent(values) for name, values in sorted(by_group.items())}
    return metrics
