"""Prior-only VQA baseline on the generated world: the floor every model must clear.

    .venv/bin/python bench/prior_baseline.py [--world DIR | --train 2000 --val 200 --test 500 --size 224 --seed 0]

For each question type (``how many``, ``what color is the``, ``is the``...) it predicts the most frequent training
answer of that type, never looking at the image or the rest of the question, and scores the test split with the
official VQA accuracy (``vl.tasks.vqa.metric``). Without ``--world`` it first generates a world into a temporary
directory. Prints one JSON line: overall and per-answer-type accuracy (percent), per question type, and counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path


from vl.data.formats import read_vqa_annotations, read_vqa_questions
from vl.world.dataset import WorldConfig, WorldPaths, generate_world, load_world
from vl.tasks.vqa.metric import evaluate_vqa
from vl.precision import machine_info


def prior_answers(train_annotations) -> tuple[dict[str, str], str]:
    """The most frequent training answer per question type, and overall (for types unseen in training)."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for ann in train_annotations:
        by_type[ann.question_type][ann.multiple_choice_answer] += 1
        overall[ann.multiple_choice_answer] += 1
    # Ties break by answer text so the baseline is deterministic.
    def top(counter: Counter) -> str:
        return min(counter.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    return {qtype: top(counter) for qtype, counter in by_type.items()}, top(overall)


def run(world: WorldPaths) -> dict:
    train = read_vqa_annotations(world.vqa_annotations("train"))
    test = read_vqa_annotations(world.vqa_annotations("test"))
    test_questions = read_vqa_questions(world.vqa_questions("test"))
    per_type, fallback = prior_answers(train)
    results = [{"question_id": ann.question_id, "answer": per_type.get(ann.question_type, fallback)} for ann in test]
    scores = evaluate_vqa(test, results)
    answer_types = Counter(ann.answer_type for ann in test)
    yes_no = [ann.multiple_choice_answer for ann in test if ann.answer_type == "yes/no"]
    return {
        "bench": "prior_baseline",
        "overall": round(scores["overall"], 2),
        "per_answer_type": {k: round(v, 2) for k, v in scores["per_answer_type"].items()},
        "per_question_type": {k: round(v, 2) for k, v in scores["per_question_type"].items()},
        "prior_answers": dict(sorted(per_type.items())),
        "train_questions": len(train),
        "test_questions": len(test_questions),
        "test_answer_types": dict(sorted(answer_types.items())),
        "test_yes_share": round(yes_no.count("yes") / max(1, len(yes_no)), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", help="an existing world (vl generate-world --out DIR ...)")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.world:
        figures = run(load_world(args.world))
        figures["world"] = args.world
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = WorldConfig(seed=args.seed, train=args.train, val=args.val, test=args.test, size=args.size)
            start = time.perf_counter()
            world = generate_world(Path(tmp) / "world", cfg, progress=False)
            generation_s = time.perf_counter() - start
            figures = run(world)
            figures["world"] = {"seed": args.seed, "train": args.train, "val": args.val, "test": args.test,
                                "size": args.size, "generation_s": round(generation_s, 2),
                                "generation_images_per_s": round((args.train + args.val + args.test) / generation_s,
                                                                 1)}
    print(json.dumps({**figures, **machine_info()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
