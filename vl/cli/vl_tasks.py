"""The vision-language tasks of ``vl finetune|predict|evaluate``: ``vqa`` and ``retrieval``.

- ``vl finetune vqa --init CKPT --train-questions Q --train-annotations A --val-questions Q --val-annotations A
  --features STORE --out RUN [--config F] [--set k=v] [--tokenizer DIR]``
- ``vl predict vqa --run RUN --questions Q --features STORE --out RESULTS.json``
- ``vl evaluate vqa --annotations A --results RESULTS.json`` prints the official accuracy, overall and per answer
  type.
- ``vl finetune retrieval --init CKPT --karpathy K.json --features STORE --out RUN [--config F] [--set k=v]``
- ``vl evaluate retrieval --run RUN --karpathy K.json --split test --features STORE --out RANKINGS.json
  [--k 20] [--full]`` prints R@1/5/10 both ways for the first stage, the two-stage ranking (and all pairs).

``--init`` is a run of ours, a Hugging Face LXMERT / VisualBERT / BERT directory, or ``scratch`` (with a
``--config`` whose ``model:`` section names the architecture).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vl.config import atomic_write_text

INIT_HELP = ("checkpoint to start from: a vl pretrain run, a VQA / retrieval run, a Hugging Face LXMERT, "
             "VisualBERT or BERT directory, or 'scratch' (the --config model, freshly initialised)")


def _finetune_vqa(args: argparse.Namespace) -> int:
    from vl.tasks.vqa.commands import finetune_vqa
    from vl.config import load_config
    from vl.tasks.vqa.config import VqaFinetuneConfig

    cfg = load_config(VqaFinetuneConfig, args.config, _overrides(args))
    result, metrics = finetune_vqa(cfg, args.init, args.train_questions, args.train_annotations, args.val_questions,
                                   args.val_annotations, args.features, args.out, args.tokenizer)
    shown = ""
    if metrics:
        per_type = ", ".join(f"{name} {value:.2f}" for name, value in metrics["per_answer_type"].items())
        shown = f"; val accuracy {metrics['overall']:.2f} ({per_type})"
    print(f"finetune vqa: {Path(args.out)} at step {result.step}{shown}")
    return 0


def _predict_vqa(args: argparse.Namespace) -> int:
    from vl.tasks.vqa.commands import predict_vqa

    count = predict_vqa(args.run, args.questions, args.features, args.out, args.batch_size, args.shuffle_images)
    print(f"predict vqa: wrote {count} answers to {args.out}")
    return 0


def _evaluate_vqa(args: argparse.Namespace) -> int:
    from vl.tasks.vqa.commands import evaluate_vqa_files, format_vqa_metrics

    metrics = evaluate_vqa_files(args.annotations, args.results)
    if args.out:
        atomic_write_text(args.out, json.dumps(metrics, indent=2) + "\n")
    print(format_vqa_metrics(metrics))
    return 0


def _finetune_retrieval(args: argparse.Namespace) -> int:
    from vl.tasks.retrieval.commands import finetune_retrieval
    from vl.config import load_config
    from vl.tasks.retrieval.config import RetrievalFinetuneConfig
    from vl.tasks.retrieval.index import format_report

    cfg = load_config(RetrievalFinetuneConfig, args.config, _overrides(args))
    result, report = finetune_retrieval(cfg, args.init, args.karpathy, args.features, args.out, args.tokenizer)
    print(f"finetune retrieval: {Path(args.out)} at step {result.step}")
    if report:
        print(format_report(report))
    return 0


def _evaluate_retrieval(args: argparse.Namespace) -> int:
    from vl.tasks.retrieval.commands import evaluate_retrieval
    from vl.tasks.retrieval.index import format_report

    report = evaluate_retrieval(args.run, args.karpathy, args.split, args.features, args.out, args.k, args.full,
                                args.top, args.max_images, args.batch_size, args.score)
    if args.metrics:
        atomic_write_text(args.metrics, json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"evaluate retrieval: wrote the {report['rankings_from'].replace('_', '-')} rankings to {args.out}")
    return 0


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` pairs, then ``--mode`` as ``finetune.mode``."""
    return [*(args.set or []), *([f"finetune.mode={args.mode}"] if args.mode is not None else [])]


def _add_config_flags(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--config", metavar="F", help=f"YAML with model: (scratch / BERT inits), task and train: "
                                                      f"sections (e.g. {example})")
    parser.add_argument("--set", action="append", metavar="K=V", help="override a config value (repeatable)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory with vocab.txt (default: --init's; "
                                                          "scratch: trained on the training texts)")
    parser.add_argument("--mode", choices=("full", "frozen", "adapters", "scalar-mix"),
                        help="what trains (overrides finetune.mode; default full): frozen trains the heads only, "
                             "adapters the adapters, LayerNorms and heads, scalar-mix a mix of every layer's [CLS] "
                             "and the heads")


def add_finetune_parsers(tasks: argparse._SubParsersAction) -> None:
    parser = tasks.add_parser(
        "vqa", help="visual question answering (VQA v2)",
        description="Fine-tune a vision-language model on VQA v2: answer classification over the training answers "
                    "seen at least vqa.min_answer_count times, against soft scores. Questions are joined with "
                    "region features by image id. Resumes when --out already holds a checkpoint.")
    parser.add_argument("--init", required=True, metavar="CKPT", help=INIT_HELP)
    parser.add_argument("--train-questions", required=True, metavar="Q", help="VQA v2 questions JSON (training)")
    parser.add_argument("--train-annotations", required=True, metavar="A", help="VQA v2 annotations JSON (training)")
    parser.add_argument("--val-questions", metavar="Q", help="VQA v2 questions JSON (validation)")
    parser.add_argument("--val-annotations", metavar="A", help="VQA v2 annotations JSON (validation)")
    parser.add_argument("--features", required=True, metavar="STORE", help="region feature store directory")
    parser.add_argument("--out", required=True, metavar="RUN", help="run directory")
    _add_config_flags(parser, "configs/finetune-vqa-tiny.yaml")
    parser.set_defaults(func=_finetune_vqa)

    parser = tasks.add_parser(
        "retrieval", help="image-text retrieval (Karpathy split)",
        description="Fine-tune a vision-language model for image-text retrieval: ITM with hard negatives mined by "
                    "the current model (UNITER), plus a contrastive loss on single-modality encodings that serve "
                    "as the cheap first stage of retrieval. Resumes when --out already holds a checkpoint.")
    parser.add_argument("--init", required=True, metavar="CKPT", help=INIT_HELP)
    parser.add_argument("--karpathy", required=True, metavar="K.json", help="Karpathy split JSON (dataset_coco.json)")
    parser.add_argument("--features", required=True, metavar="STORE", help="region feature store directory")
    parser.add_argument("--out", required=True, metavar="RUN", help="run directory")
    _add_config_flags(parser, "configs/finetune-retrieval-tiny.yaml")
    parser.set_defaults(func=_finetune_retrieval)


def add_predict_parsers(tasks: argparse._SubParsersAction) -> None:
    parser = tasks.add_parser("vqa", help="answer VQA questions with a fine-tuned run",
                              description="Answer every question of a VQA v2 questions file; writes the official "
                                          "results JSON [{question_id, answer}].")
    parser.add_argument("--run", required=True, metavar="RUN", help="VQA run directory (vl finetune vqa)")
    parser.add_argument("--questions", required=True, metavar="Q", help="VQA v2 questions JSON")
    parser.add_argument("--features", required=True, metavar="STORE", help="region feature store directory")
    parser.add_argument("--out", required=True, metavar="RESULTS.json", help="results file to write")
    parser.add_argument("--batch-size", type=int, metavar="N", help="questions per forward pass")
    parser.add_argument("--shuffle-images", type=int, metavar="SEED",
                        help="image-blind control: answer each question on another image's regions (a seeded "
                             "derangement), to measure how much the answers depend on the image")
    parser.set_defaults(func=_predict_vqa)


def add_evaluate_parsers(tasks: argparse._SubParsersAction) -> None:
    parser = tasks.add_parser("vqa", help="official VQA accuracy, overall and per answer type",
                              description="Score VQA results with the official VQA v2 accuracy (10-annotator "
                                          "leave-one-out, official answer normalisation).")
    parser.add_argument("--annotations", required=True, metavar="A", help="VQA v2 annotations JSON")
    parser.add_argument("--results", required=True, metavar="RESULTS.json", help="results from vl predict vqa")
    parser.add_argument("--out", metavar="JSON", help="also write every metric (per question type too) here")
    parser.set_defaults(func=_evaluate_vqa)

    parser = tasks.add_parser(
        "retrieval", help="Recall@1/5/10 of a retrieval run; writes RANKINGS.json",
        description="Rank a Karpathy split's images for every caption and its captions for every image. First "
                    "stage: cosine similarity of cached single-modality embeddings; second stage: the top --k "
                    "re-ranked by the full model's pair score. --full also scores every pair. Prints R@1/5/10 both "
                    "ways and the wall time of each method.")
    parser.add_argument("--run", required=True, metavar="RUN", help="retrieval run directory")
    parser.add_argument("--karpathy", required=True, metavar="K.json", help="Karpathy split JSON")
    parser.add_argument("--split", default="test", help="split to evaluate (default test)")
    parser.add_argument("--features", required=True, metavar="STORE", help="region feature store directory")
    parser.add_argument("--out", required=True, metavar="RANKINGS.json",
                        help="rankings to write (two-stage; with --full, the full ITM ranking)")
    parser.add_argument("--k", type=int, metavar="K", help="first-stage candidates re-ranked (default: the run's "
                                                           "retrieval.rerank_k)")
    parser.add_argument("--full", action="store_true", help="also score every pair (O(N^2) forward passes)")
    parser.add_argument("--score", choices=("itm", "itm+similarity", "itm+contrastive"),
                        help="pair score that re-ranks: ITM, ITM + first-stage cosine, or ITM + the contrastive "
                             "logit (cosine / temperature) (default: the run's retrieval.pair_score)")
    parser.add_argument("--top", type=int, default=10, metavar="N", help="ranked ids per query in RANKINGS.json "
                                                                         "(default 10)")
    parser.add_argument("--max-images", type=int, metavar="N", help="evaluate only the split's first N images")
    parser.add_argument("--batch-size", type=int, metavar="N", help="pairs per forward pass")
    parser.add_argument("--metrics", metavar="JSON", help="also write the report (recalls, times) here")
    parser.set_defaults(func=_evaluate_retrieval)
