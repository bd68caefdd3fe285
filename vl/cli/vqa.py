"""``vl vqa``: answer one question about one image file, end to end (region extraction, then the VQA model)."""

from __future__ import annotations

import argparse


def _vqa(args: argparse.Namespace) -> int:
    from vl.tasks.vqa.one_image import answer_image_question

    overrides = {key: value for key, value in (("num_boxes", args.num_boxes), ("min_boxes", args.min_boxes),
                                               ("max_boxes", args.max_boxes),
                                               ("score_threshold", args.score_threshold))
                 if value is not None}
    answers = answer_image_question(args.run, args.detector, args.image, args.question, args.top, overrides)
    width = max(len(answer) for answer, _ in answers)
    for answer, score in answers:
        print(f"{answer:<{width}}  {score:.3f}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "vqa", help="answer a question about one image file",
        description="Answer one question about one image: the detector run extracts the image's regions (boxes "
                    "chosen as for the run's training features unless overridden), then the VQA run scores every "
                    "answer of its vocabulary. Prints the top answers with their scores (sigmoid, 0-1).")
    parser.add_argument("--run", required=True, metavar="RUN", help="VQA run directory (vl finetune vqa)")
    parser.add_argument("--detector", required=True, metavar="DRUN", help="detector run (vl-regions train) or config")
    parser.add_argument("--image", required=True, metavar="IMG", help="image file (jpg, png, webp, ...)")
    parser.add_argument("--question", required=True, metavar="TEXT", help="the question, in quotes")
    parser.add_argument("--top", type=int, default=5, metavar="N", help="answers to print (default 5)")
    parser.add_argument("--num-boxes", type=int, metavar="K", help="a fixed number of regions")
    parser.add_argument("--min-boxes", type=int, metavar="N", help="fewest regions")
    parser.add_argument("--max-boxes", type=int, metavar="N", help="most regions")
    parser.add_argument("--score-threshold", type=float, metavar="S", help="keep boxes scoring at least S")
    parser.set_defaults(func=_vqa)
