"""Inference speed and accuracy of a fine-tuned model, its int8 copy and a distilled student, on the same inputs.

On a ``vl demo`` output (``--demo DIR``), in one run and with the CPU named:

- VQA (``runs/vqa-single`` and ``runs/vqa-dual``, each as fp32, as int8 (``vl quantize``) and as its half-depth
  student (``vl distill`` with ``configs/distill-vqa-half.yaml``), plus the student's int8 copy): answers/s over the
  test split at ``--batch-size`` and latency per question at batch 1 (features given: the collation from the
  feature store is counted, the detector is not), and test accuracy (official VQA metric);
- retrieval (``runs/retrieval``, fp32 and int8): the latency of one ``vl serve`` query (first stage over the test
  split's images, then the top k re-ranked) and two-stage text->image R@1 on the test split.

Students and int8 copies are written under ``--work`` (default ``DIR/compressed``) and reused when there; a
student is trained with ``vl distill`` when missing (about as long as its teacher's fine-tuning). Every model runs
in fp32 or int8 as built (no autocast), on ``torch.get_num_threads()`` threads.

    .venv/bin/python bench/inference.py --demo demo_out [--models vqa-single vqa-dual] [--batch-size 64]

Ends with one JSON line: per VQA model and kind, accuracy, answers/s and median ms per question; per retrieval
kind, R@1 and median query ms; the int8/fp32 and student/teacher speed ratios and accuracy shares.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from vl.compress.distill import distill
from vl.compress.quantize import quantize_run
from vl.data.formats import read_vqa_annotations
from vl.precision import machine_info
from vl.tasks.runs import load_any_task_run
from vl.tasks.vqa.commands import question_inputs
from vl.tasks.vqa.metric import evaluate_vqa
from vl.tasks.vqa.model import answer_logits, predicted_answers

ROOT = Path(__file__).resolve().parents[1]
VQA_FILES = ("v2_OpenEnded_mscoco_{split}2014_questions.json", "v2_mscoco_{split}2014_annotations.json")


def vqa_files(demo: Path, split: str) -> tuple[Path, Path]:
    questions, annotations = (demo / "world" / "vqa" / name.format(split=split) for name in VQA_FILES)
    return questions, annotations


def ensure_student(demo: Path, teacher: str, work: Path) -> Path:
    out = work / f"{teacher}-student"
    if not (out / "model.safetensors").is_file():
        train_q, train_a = vqa_files(demo, "train")
        print(f"bench: distilling {teacher} into {out}", file=sys.stderr)
        distill(str(ROOT / "configs" / "distill-vqa-half.yaml"), [], str(demo / "runs" / teacher), str(out),
                {"train_questions": str(train_q), "train_annotations": str(train_a),
                 "features": str(demo / "features")})
    return out


def ensure_int8(run_dir: Path, work: Path) -> Path:
    out = work / f"{run_dir.name}-int8"
    if not (out / "model.safetensors").is_file():
        quantize_run(run_dir, out)
    return out


def time_vqa(run_dir: Path, questions: Path, annotations: Path, features: Path, batch_size: int,
             latency_questions: int) -> tuple[dict[str, float], list[str]]:
    model, run, tokenizer = load_any_task_run(run_dir)
    examples, collate = question_inputs(run, tokenizer, questions, features)
    with torch.inference_mode():
        answer_logits(model, examples[:batch_size], collate, batch_size)  # warm-up
        started = time.perf_counter()
        logits = answer_logits(model, examples, collate, batch_size)
        seconds = time.perf_counter() - started
        singles = []
        for example in examples[:latency_questions]:
            started = time.perf_counter()
            answer_logits(model, [example], collate, 1)
            singles.append(time.perf_counter() - started)
    answers = predicted_answers(logits, list(run.answers))
    results = [{"question_id": example.question_id, "answer": answer} for example, answer in zip(examples, answers)]
    metrics = evaluate_vqa(read_vqa_annotations(annotations), results)
    weights = sum(path.stat().st_size for path in run_dir.glob("model.safetensors"))
    layers = sum(stack.num_layers for stack in (run.model.text, run.model.vision, run.model.cross) if stack)
    return {"accuracy": round(metrics["overall"], 2), "answers_per_s": round(len(examples) / seconds, 1),
            "ms_per_question": round(1000 * statistics.median(singles), 2), "weights_mb": round(weights / 2**20, 2),
            "layers": layers}, answers


def time_retrieval(run_dir: Path, demo: Path, queries: int) -> dict[str, float]:
    from vl.serve.app import RetrievalService
    from vl.tasks.retrieval.index import evaluate_index

    service = RetrievalService(run_dir, demo / "world" / "dataset_coco.json", "test", demo / "features",
                               demo / "world" / "images", progress=False)
    texts = service.split.texts[:queries]
    service.search(texts[0])  # warm-up
    times = [service.search(text)["ms"] for text in texts]
    with torch.inference_mode():
        report, _ = evaluate_index(service.index, service.k)
    return {"text_to_image_r1": round(report["two_stage"]["text_to_image"]["R@1"], 2),
            "ms_per_query": round(statistics.median(times), 2), "k": service.k}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", required=True, type=Path, help="a vl demo --out directory")
    parser.add_argument("--work", type=Path, help="where students and int8 copies go (default DEMO/compressed)")
    parser.add_argument("--models", nargs="+", default=["vqa-single", "vqa-dual"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--latency-questions", type=int, default=200)
    parser.add_argument("--queries", type=int, default=100, help="retrieval queries timed (test captions)")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    work = args.work or args.demo / "compressed"
    work.mkdir(parents=True, exist_ok=True)
    questions, annotations = vqa_files(args.demo, args.split)
    features = args.demo / "features"

    vqa: dict[str, dict[str, dict[str, float]]] = {}
    for name in args.models:
        teacher = args.demo / "runs" / name
        student = ensure_student(args.demo, name, work)
        kinds = {"fp32": teacher, "int8": ensure_int8(teacher, work), "student": student,
                 "student_int8": ensure_int8(student, work)}
        vqa[name], answers = {}, {}
        for kind, run_dir in kinds.items():
            vqa[name][kind], answers[kind] = time_vqa(run_dir, questions, annotations, features, args.batch_size,
                                                      args.latency_questions)
            print(f"{name} {kind}: {vqa[name][kind]}", file=sys.stderr)
        fp32 = vqa[name]["fp32"]
        vqa[name]["ratios"] = {
            f"{kind}_vs_fp32": {"answers_per_s": round(vqa[name][kind]["answers_per_s"] / fp32["answers_per_s"], 2),
                                "latency_speedup": round(fp32["ms_per_question"] / vqa[name][kind]["ms_per_question"],
                                                         2),
                                "accuracy_share": round(vqa[name][kind]["accuracy"] / fp32["accuracy"], 3),
                                "accuracy_points": round(vqa[name][kind]["accuracy"] - fp32["accuracy"], 2),
                                "same_answer": round(sum(a == b for a, b in zip(answers[kind], answers["fp32"]))
                                                     / len(answers["fp32"]), 4)}
            for kind in ("int8", "student", "student_int8")}

    retrieval: dict[str, dict[str, float]] = {}
    run = args.demo / "runs" / "retrieval"
    if run.is_dir():
        for kind, run_dir in {"fp32": run, "int8": ensure_int8(run, work)}.items():
            retrieval[kind] = time_retrieval(run_dir, args.demo, args.queries)
            print(f"retrieval {kind}: {retrieval[kind]}", file=sys.stderr)
        retrieval["int8_latency_speedup"] = round(retrieval["fp32"]["ms_per_query"] / retrieval["int8"]["ms_per_query"],
                                                  2)
    print(json.dumps({"bench": "inference", **machine_info(), "threads": torch.get_num_threads(),
                      "batch_size": args.batch_size, "split": args.split, "vqa": vqa, "retrieval": retrieval}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
