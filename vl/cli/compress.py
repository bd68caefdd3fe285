"""Compression: ``vl quantize RUN --out RUN_INT8`` (dynamic int8 of a fine-tuned VQA or retrieval run) and
``vl distill --teacher RUN --config STUDENT.yaml [VQA flags | --karpathy K.json] --features STORE --out RUN`` or
``... --train F [--val F] --out RUN`` for a text classifier (a smaller student of the teacher's task on its soft
scores)."""

from __future__ import annotations

import argparse


def _quantize(args: argparse.Namespace) -> int:
    from vl.compress.quantize import describe, quantize_run

    info = quantize_run(args.run, args.out)
    print(f"wrote {args.out}: {describe(info)}")
    return 0


def _distill(args: argparse.Namespace) -> int:
    from vl.compress.distill import distill

    if (args.val_questions is None) != (args.val_annotations is None):
        from vl.errors import UserError

        raise UserError("give both --val-questions and --val-annotations, or neither")
    data = {key: getattr(args, key) for key in ("train_questions", "train_annotations", "val_questions",
                                                 "val_annotations", "karpathy", "features", "train", "val")}
    result, metrics, info = distill(args.config, args.set or [], args.teacher, args.out, data)
    layers = ", ".join(f"{name} {pair['teacher']}->{pair['student']}" for name, pair in info["layers"].items())
    shown = ""
    if metrics and info["task"] == "vqa":
        shown = f"; val accuracy {metrics['overall']:.2f}"
    elif metrics and info["task"] == "retrieval":
        shown = f"; val text->image R@1 {metrics['two_stage']['text_to_image']['R@1']:.1f}"
    elif metrics:
        shown = "; val " + ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
    print(f"distill {info['task']}: {args.out} at step {result.step} (layers {layers}){shown}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distill", help="train a smaller student on a fine-tuned VQA, retrieval or classify teacher's scores",
        description="Train a student (the --config model:, or the teacher's architecture with distill.layer_fraction "
                    "of its layers) on the task's targets and on the teacher's scores at distill.temperature, "
                    "starting from every other teacher layer (distill.init). A VQA teacher takes the VQA flags and "
                    "--features, a retrieval teacher --karpathy and --features, a text classifier --train. The "
                    "result is an ordinary run of the teacher's task.")
    parser.add_argument("--teacher", required=True, metavar="RUN", help="fine-tuned VQA, retrieval or classify run")
    parser.add_argument("--config", metavar="STUDENT.yaml",
                        help="student config (configs/distill-{vqa,retrieval,text}-half.yaml)")
    parser.add_argument("--train-questions", metavar="Q.json", help="VQA")
    parser.add_argument("--train-annotations", metavar="A.json", help="VQA")
    parser.add_argument("--val-questions", metavar="Q.json", help="VQA")
    parser.add_argument("--val-annotations", metavar="A.json", help="VQA")
    parser.add_argument("--karpathy", metavar="K.json", help="retrieval: the Karpathy split file")
    parser.add_argument("--features", metavar="STORE", help="VQA, retrieval: the region feature store")
    parser.add_argument("--train", metavar="F", help="classify: training data (JSONL)")
    parser.add_argument("--val", metavar="F", help="classify: validation data (JSONL)")
    parser.add_argument("--out", required=True, metavar="RUN", help="the student's run directory")
    parser.add_argument("--set", action="append", metavar="K=V", help="override a config value (repeatable)")
    parser.set_defaults(func=_distill)

    parser = subparsers.add_parser(
        "quantize", help="int8 linear layers of a fine-tuned VQA or retrieval run",
        description="Quantize every linear layer of a fine-tuned VQA or retrieval run to int8 (PyTorch's dynamic "
                    "quantization: per-channel int8 weights, activations quantized per batch). The new run "
                    "directory says so in quantization.json; vl predict, vl evaluate, vl vqa and vl serve load it.")
    parser.add_argument("run", metavar="RUN", help="fine-tuned VQA or retrieval run directory")
    parser.add_argument("--out", required=True, metavar="RUN_INT8", help="the int8 run directory to write")
    parser.set_defaults(func=_quantize)
