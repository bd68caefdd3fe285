"""The official VQA accuracy: hand-computed cases, the normalisation rules, and agreement with a transcription of
the official script's loop on random answers."""

from __future__ import annotations

import random
import re

import pytest

from vl.data.formats import VqaAnnotation, VqaAnswer
from vl.errors import UserError
from vl.tasks.vqa.metric import (
    CONTRACTIONS,
    MANUAL_MAP,
    evaluate_vqa,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
)


def annotation(question_id: int, answers: list[str], answer_type: str = "other",
               question_type: str = "what") -> VqaAnnotation:
    return VqaAnnotation(question_id=question_id, image_id=1,
                         answers=tuple(VqaAnswer(a, "yes", i + 1) for i, a in enumerate(answers)),
                         multiple_choice_answer=max(set(answers), key=answers.count), answer_type=answer_type,
                         question_type=question_type)


@pytest.mark.parametrize(("matching", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_annotator_out(matching, expected):
    # 2 of 10: leaving out one of the 2 leaves 1 match (1/3), leaving out any of the other 8 leaves 2 (2/3):
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6, not min(1, 2/3) = 0.667.
    answers = ["yes"] * matching + ["no"] * (10 - matching)
    assert vqa_accuracy("yes", answers) == pytest.approx(expected)


@pytest.mark.parametrize(("prediction", "normalized"), [
    ("Two", "2"),
    ("two dogs", "2 dogs"),
    ("none", "0"),
    ("The Dog", "dog"),
    ("a cat and an owl", "cat and owl"),
    ("yes.", "yes"),
    ("3.5", "3.5"),
    ("1,000", "1000"),
    ("dont", "don't"),
    ("isnt it", "isn't it"),
    ("black/white", "black white"),
    ("black / white", "black white"),
    ("  red\n", "red"),
    ("red\tcar", "red car"),
    ("it's", "it's"),
])
def test_prediction_normalisation(prediction, normalized):
    assert normalize_answer(prediction) == normalized


def test_official_tables_are_complete():
    assert MANUAL_MAP["ten"] == "10" and len(MANUAL_MAP) == 12
    assert len(CONTRACTIONS) == 120 and CONTRACTIONS["youre"] == "you're"
    assert process_punctuation("what?!") == "what  "  # marks away from spaces become spaces...
    assert process_punctuation("what ?") == "what "  # ...and next to a space they are deleted
    assert process_digit_article("An Apple") == "apple"


def test_ground_truth_is_only_punctuation_processed_and_only_when_answers_differ():
    # Exactly the official behaviour: unanimous answers are compared as they are...
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0  # (the prediction is always normalised)
    # ...and differing answers get punctuation processing, not the digit/article step.
    assert vqa_accuracy("2", ["two"] * 9 + ["2"]) == pytest.approx(0.3)
    assert vqa_accuracy("dog", ["dog?"] * 9 + ["cat"]) == pytest.approx(0.0)  # "dog?" -> "dog " after punctuation
    assert vqa_accuracy("dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)


def _official_reference(gts: dict[int, dict], res: dict[int, dict]) -> dict[str, float]:
    """A transcription of the official ``VQAEval.evaluate`` loop (dict answers, ``item != gtAnsDatum``)."""
    acc_qa, acc_ans_type = [], {}
    for ques_id in gts:
        res_ans = res[ques_id]["answer"].replace("\n", " ").replace("\t", " ").strip()
        res_ans = process_digit_article(process_punctuation(res_ans))
        gt_answers = [ans["answer"] for ans in gts[ques_id]["answers"]]
        if len(set(gt_answers)) > 1:
            for ans_dic in gts[ques_id]["answers"]:
                ans_dic["answer"] = process_punctuation(ans_dic["answer"])
        gt_acc = []
        for gt_ans_datum in gts[ques_id]["answers"]:
            other_gt_ans = [item for item in gts[ques_id]["answers"] if item != gt_ans_datum]
            matching = [item for item in other_gt_ans if item["answer"] == res_ans]
            gt_acc.append(min(1, float(len(matching)) / 3))
        avg = float(sum(gt_acc)) / len(gt_acc)
        acc_qa.append(avg)
        acc_ans_type.setdefault(gts[ques_id]["answer_type"], []).append(avg)
    out = {"overall": 100 * sum(acc_qa) / len(acc_qa)}
    out.update({k: 100 * sum(v) / len(v) for k, v in acc_ans_type.items()})
    return out


def test_agrees_with_the_official_loop_on_random_answers():
    rng = random.Random(0)
    vocab = ["yes", "no", "2", "two", "red", "Red", "a red", "the dog", "dog.", "dog", "1,000", "1000", "dont",
             "don't", "black/white", "black white"]
    annotations, gts, res = [], {}, {}
    for question_id in range(300):
        pool = rng.sample(vocab, rng.randint(1, 4))
        answers = [rng.choice(pool) for _ in range(10)]
        answer_type = rng.choice(["yes/no", "number", "other"])
        annotations.append(annotation(question_id, answers, answer_type))
        gts[question_id] = {"answer_type": answer_type,
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                        for i, a in enumerate(answers)]}
        res[question_id] = {"answer": rng.choice(vocab + ["  Yes ", "Two."])}
    ours = evaluate_vqa(annotations, [{"question_id": q, "answer": r["answer"]} for q, r in res.items()])
    reference = _official_reference(gts, res)
    assert ours["overall"] == pytest.approx(reference["overall"])
    for answer_type, value in ours["per_answer_type"].items():
        assert value == pytest.approx(reference[answer_type])
    assert 0 < ours["overall"] < 100


def test_evaluate_reports_overall_per_answer_type_and_per_question_type():
    annotations = [
        annotation(1, ["yes"] * 10, "yes/no", "is the"),
        annotation(2, ["2"] * 2 + ["3"] * 8, "number", "how many"),
        annotation(3, ["red"] * 10, "other", "what color is the"),
        annotation(4, ["no"] * 10, "yes/no", "is there a"),
    ]
    results = {1: "yes", 2: "two", 3: "blue", 4: "no"}
    scores = evaluate_vqa(annotations, results)
    assert scores["overall"] == pytest.approx(100 * (1 + 0.6 + 0 + 1) / 4)
    assert scores["per_answer_type"] == pytest.approx({"yes/no": 100.0, "number": 60.0, "other": 0.0})
    assert scores["per_question_type"] == pytest.approx(
        {"is the": 100.0, "how many": 60.0, "what color is the": 0.0, "is there a": 100.0})
    assert scores["num_questions"] == 4 and "per_group" not in scores
    grouped = evaluate_vqa(annotations, results, groups={1: "spatial", 4: "existence", 3: "colour"})
    assert grouped["per_group"] == pytest.approx({"spatial": 100.0, "existence": 100.0, "colour": 0.0})
    assert grouped["overall"] == scores["overall"]


def test_results_must_answer_exactly_the_annotated_questions():
    annotations = [annotation(1, ["yes"] * 10), annotation(2, ["no"] * 10)]
    with pytest.raises(UserError, match=re.escape("do not answer 1 of 2 annotated questions (first: question_id 2)")):
        evaluate_vqa(annotations, {1: "yes"})
    with pytest.raises(UserError, match="not annotated"):
        evaluate_vqa(annotations, {1: "yes", 2: "no", 3: "no"})
    with pytest.raises(UserError, match="answered twice"):
        evaluate_vqa(annotations, [{"question_id": 1, "answer": "yes"}, {"question_id": 1, "answer": "no"}])
    with pytest.raises(UserError, match="must be an object"):
        evaluate_vqa(annotations, [{"question_id": 1}])
