"""Inference speed and accuracy of a fine-tuned model, its int8 copy and a distilled student, on the same inputs.

On a ``vl demo`` output (``--demo DIR``), in one run and with the CPU named:

- VQA (``runs/vqa-single`` and ``runs/vqa-dual``, each as fp32, as int8 (``vl quantize``) and as its half-depth
  student (``vl distill`` with ``configs/distill-vqa-half.yaml``), plus the student's int8 copy): answers/s over the
  test split at ``--batch-size`` and latency per question at batch 1 (features given: the collation from the
  feature store is counted, the detector is not), and test accuracy (official VQA metric);
- retrieval (``runs/retrieval``, fp32 and int8): the latency of one ``vl serve`` query (first stage over the test
  split's images, then the top k re-ranked) and two-stage text->image R@1 on the test split;
- the same fp32 / int8 / half-depth comparison at full size (``--architectures``, default UNITER-base and
  LXMERT-base, randomly initialised: speed does not depend on the weights), on synthetic batches of 20 tokens and
  36 regions.

Students and int8 copies are written under ``--work`` (default ``DIR/compressed``) and reused when there; a
student is trained with ``vl distill`` when missing (about as long as its teacher's fine-tuning). Every model runs
in fp32 or int8 as built (no autocast), on ``torch.get_num_threads()`` threads.

    .venv/bin/python bench/inference.py [--demo demo_out] [--models vqa-single vqa-dual] [--batch-size 64]

Ends with one JSON line: per VQA model and kind, accuracy, answers/s and median ms per question; per retrieval
kind, R@1 and median query ms; the int8/fp32 and student/teacher speed ratios and accuracy shares; per full-size
architecture, answers/s and ms per question of each kind and their speed-ups.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

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


def synthetic_batch(cfg, batch_size: int, text_len: int, regions: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(batch_size, regions, 2, 2, generator=generator).sort(dim=2).values
    batch = {"input_ids": torch.randint(5, cfg.text.vocab_size, (batch_size, text_len), generator=generator),
             "attention_mask": torch.ones(batch_size, text_len, dtype=torch.long),
             "token_type_ids": torch.zeros(batch_size, text_len, dtype=torch.long),
             "region_feats": torch.randn(batch_size, regions, cfg.region.feature_dim, generator=generator),
             "region_boxes": torch.stack([corners[..., 0, 0], corners[..., 0, 1], corners[..., 1, 0],
                                          corners[..., 1, 1]], dim=-1),
             "region_mask": torch.ones(batch_size, regions, dtype=torch.long)}
    if cfg.tags is not None:
        batch["region_tag_ids"] = torch.randint(5, cfg.text.vocab_size, (batch_size, regions, 1), generator=generator)
        batch["region_tag_weights"] = torch.ones(batch_size, regions, 1)
    return batch


def time_architecture(config: str, batch_size: int, repeats: int, num_answers: int = 3129) -> dict[str, dict]:
    """Answer logits of a randomly initialised ``config`` model (speed does not depend on training): fp32, int8
    and the half-depth student, each on the same batches of ``batch_size`` and of 1 (20 tokens, 36 regions)."""
    from vl.compress.distill import fewer_layers
    from vl.compress.quantize import quantize_dynamic
    from vl.fusion import build_fusion
    from vl.fusion.base import load_fusion_config
    from vl.tasks.vqa.model import VqaModel

    cfg = load_fusion_config(ROOT / "configs" / config)
    torch.manual_seed(0)
    models = {"fp32": VqaModel(build_fusion(cfg), num_answers).eval()}
    models["int8"] = quantize_dynamic(copy.deepcopy(models["fp32"]))  # quantize_dynamic works in place
    models["student"] = VqaModel(build_fusion(fewer_layers(cfg, 0.5)), num_answers).eval()
    batches = {size: synthetic_batch(cfg, size, 20, 36) for size in (batch_size, 1)}
    out: dict[str, dict] = {}
    with torch.inference_mode():
        for kind, model in models.items():
            timings = {}
            for size, batch in batches.items():
                model.logits(batch)
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    model.logits(batch)
                    times.append(time.perf_counter() - started)
                timings[size] = statistics.median(times)
            out[kind] = {"answers_per_s": round(batch_size / timings[batch_size], 1),
                         "ms_per_question": round(1000 * timings[1], 2)}
            print(f"{config} {kind}: {out[kind]}", file=sys.stderr)
    for kind in ("int8", "student"):
        out[kind]["speedup"] = round(out[kind]["answers_per_s"] / out["fp32"]["answers_per_s"], 2)
        out[kind]["latency_speedup"] = round(out["fp32"]["ms_per_question"] / out[kind]["ms_per_question"], 2)
    return out


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
    parser.add_argument("--demo", type=Path, help="a vl demo --out directory (without: the full-size timings only)")
    parser.add_argument("--work", type=Path, help="where students and int8 copies go (default DEMO/compressed)")
    parser.add_argument("--models", nargs="+", default=["vqa-single", "vqa-dual"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--latency-questions", type=int, default=200)
    parser.add_argument("--queries", type=int, default=100, help="retrieval queries timed (test captions)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--architectures", nargs="*", default=["uniter-base.yaml", "lxmert-base.yaml"],
                        help="configs/ model files also timed at full size with random weights (no accuracy)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per architecture and batch")
    args = parser.parse_args()
    vqa: dict[str, dict] = {}
    retrieval: dict[str, dict] = {}
    if args.demo is not None:
        work = args.work or args.demo / "compressed"
        work.mkdir(parents=True, exist_ok=True)
        vqa = {name: compare_vqa(args, name, work) for name in args.models}
        if (args.demo / "runs" / "retrieval").is_dir():
            retrieval = compare_retrieval(args, work)
    sizes = {config: time_architecture(config, args.batch_size, args.repeats) for config in args.architectures}
    print(json.dumps({"bench": "inference", **machine_info(), "threads": torch.get_num_threads(),
                      "batch_size": args.batch_size, "split": args.split, "vqa": vqa, "retrieval": retrieval,
                      "architectures": sizes}))
    return 0


def compare_vqa(args: argparse.Namespace, name: str, work: Path) -> dict[str, dict]:
    questions, annotations = vqa_files(args.demo, args.split)
    teacher = args.demo / "runs" / name
    student = ensure_student(args.demo, name, work)
    kinds = {"fp32": teacher, "int8": ensure_int8(teacher, work), "student": student,
             "student_int8": ensure_int8(student, work)}
    out, answers = {}, {}
    for kind, run_dir in kinds.items():
        out[kind], answers[kind] = time_vqa(run_dir, questions, annotations, args.demo / "features", args.batch_size,
                                            args.latency_questions)
        print(f"{name} {kind}: {out[kind]}", file=sys.stderr)
    fp32 = out["fp32"]
    out["ratios"] = {
        f"{kind}_vs_fp32": {"answers_per_s": round(out[kind]["answers_per_s"] / fp32["answers_per_s"], 2),
                            "latency_speedup": round(fp32["ms_per_question"] / out[kind]["ms_per_question"], 2),
                            "accuracy_share": round(out[kind]["accuracy"] / fp32["accuracy"], 3),
                            "accuracy_points": round(out[kind]["accuracy"] - fp32["accuracy"], 2),
                            "same_answer": round(sum(a == b for a, b in zip(answers[kind], answers["fp32"]))
                                                 / len(answers["fp32"]), 4)}
        for kind in ("int8", "student", "student_int8")}
    return out


def compare_retrieval(args: argparse.Namespace, work: Path) -> dict[str, dict]:
    run = args.demo / "runs" / "retrieval"
    out: dict[str, Any] = {}
    for kind, run_dir in {"fp32": run, "int8": ensure_int8(run, work)}.items():
        out[kind] = time_retrieval(run_dir, args.demo, args.queries)
        print(f"retrieval {kind}: {out[kind]}", file=sys.stderr)
    out["int8_latency_speedup"] = round(out["fp32"]["ms_per_query"] / out["int8"]["ms_per_query"], 2)
    return out


if __name__ == "__main__":
    sys.exit(main())
