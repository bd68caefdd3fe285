"""The text-core tasks of ``vl finetune|predict|evaluate``: ``classify``, ``tag`` and ``span-qa``.

- ``vl finetune TASK --init CKPT --train F --val F --out RUN [--mode M] [--config F] [--set k=v]``
- ``vl predict TASK --run RUN --input F --out PRED``
- ``vl evaluate TASK --gold F --predictions PRED [--out METRICS.json]`` prints one JSON line of metrics.

Formats: JSONL for classify (``text``, optional ``text_pair``, ``label``) and tag (``tokens``, ``tags``);
SQuAD v1.1 JSON in and ``{question_id: answer}`` JSON out for span-qa.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vl.config import atomic_write_text

TASK_HELP = {
    "classify": ("sequence classification (single text or pair)", "JSONL: text, optional text_pair, label"),
    "tag": ("token classification: one tag per word (label on its first word piece)", "JSONL: tokens, tags"),
    "span-qa": ("extractive question answering (SQuAD v1.1)", "SQuAD v1.1 JSON"),
}


def text_task(name: str):
    """The task object for ``name`` (explicit imports: the registry of text tasks)."""
    from vl.text import classify, span_qa, tag

    return {"classify": classify.TASK, "tag": tag.TASK, "span-qa": span_qa.TASK}[name]


def _finetune(args: argparse.Namespace) -> int:
    from vl.config import load_config
    from vl.text.finetune import TextFinetuneConfig, finetune_text

    overrides = list(args.set or [])
    if args.mode is not None:
        overrides.append(f"finetune.mode={args.mode}")
    cfg = load_config(TextFinetuneConfig, args.config, overrides)
    result, metrics = finetune_text(text_task(args.task), cfg, args.init, args.train, args.val, args.out)
    shown = ", ".join(f"{key} {value:.2f}" for key, value in metrics.items() if key != "count")
    print(f"finetune {args.task}: {Path(args.out)} at step {result.step}" + (f"; val {shown}" if shown else ""))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from vl.text.finetune import predict_text

    count = predict_text(text_task(args.task), args.run, args.input, args.out)
    print(f"predict {args.task}: wrote {count} predictions to {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from vl.text.finetune import evaluate_predictions

    metrics = evaluate_predictions(text_task(args.task), args.gold, args.predictions)
    line = json.dumps(metrics)
    if args.out:
        atomic_write_text(args.out, line + "\n")
    print(line)
    return 0


def add_finetune_parsers(tasks: argparse._SubParsersAction) -> None:
    for name, (what, fmt) in TASK_HELP.items():
        parser = tasks.add_parser(name, help=what, description=f"Fine-tune the text core: {what}. Input: {fmt}. "
                                  "Resumes when --out already holds a checkpoint.")
        parser.add_argument("--init", required=True, metavar="CKPT",
                            help="a text run of ours or a Hugging Face BERT directory (with vocab.txt)")
        parser.add_argument("--train", required=True, metavar="F", help=f"training data ({fmt})")
        parser.add_argument("--val", metavar="F", help="validation data, scored during and after training")
        parser.add_argument("--out", required=True, metavar="RUN", help="run directory")
        parser.add_argument("--mode", choices=("full", "frozen", "adapters", "scalar-mix"),
                            help="what trains (overrides finetune.mode; default full)")
        parser.add_argument("--config", metavar="F", help="YAML with finetune: and train: sections "
                                                          "(e.g. configs/text-finetune-tiny.yaml)")
        parser.add_argument("--set", action="append", metavar="K=V", help="override a config value (repeatable)")
        parser.set_defaults(func=_finetune)


def add_predict_parsers(tasks: argparse._SubParsersAction) -> None:
    for name, (what, fmt) in TASK_HELP.items():
        out = "predictions JSON {id: answer}" if name == "span-qa" else "predictions JSONL"
        parser = tasks.add_parser(name, help=what, description=f"Predict with a fine-tuned {name} run. Input: {fmt}; "
                                  f"output: {out}.")
        parser.add_argument("--run", required=True, metavar="RUN", help="fine-tuning run directory")
        parser.add_argument("--input", required=True, metavar="F", help=f"examples to predict ({fmt})")
        parser.add_argument("--out", required=True, metavar="PRED", help=f"output file ({out})")
        parser.set_defaults(func=_predict)


def add_evaluate_parsers(tasks: argparse._SubParsersAction) -> None:
    metrics = {"classify": "accuracy and macro-F1", "tag": "word accuracy and, for BIO tags, entity F1",
               "span-qa": "SQuAD v1.1 exact match and F1 (official normalisation)"}
    for name, (_, fmt) in TASK_HELP.items():
        parser = tasks.add_parser(name, help=f"{metrics[name]}",
                                  description=f"Score {name} predictions: {metrics[name]}. Prints one JSON line.")
        parser.add_argument("--gold", required=True, metavar="F", help=f"gold annotations ({fmt})")
        parser.add_argument("--predictions", required=True, metavar="PRED", help="predictions from vl predict")
        parser.add_argument("--out", metavar="JSON", help="also write the metrics here")
        parser.set_defaults(func=_evaluate)
