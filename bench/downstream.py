"""Downstream on the generated world: does pretraining help VQA, and does two-stage retrieval match full ITM scoring?

On a generated world with synthetic region features (one region per object, ``vl.world.features``):

1. pretrain UNITER-tiny (``configs/pretrain-uniter-tiny.yaml``, what ``vl pretrain`` runs) on the train shards, or
   reuse ``--pretrained RUN``;
2. fine-tune VQA with the same budget (steps, batch, learning rate, tokenizer, architecture) from the pretrained run
   and from scratch, once per ``--seeds`` seed; report the official accuracy on the test questions (mean, min, max);
3. fine-tune retrieval from the pretrained run; on the test split report R@1/5/10 both ways for the first stage
   (cached single-modality embeddings), the two-stage ranking (top ``--k`` re-ranked by ITM) and full ITM scoring of
   every pair, with their wall times.

    .venv/bin/python bench/downstream.py [--train 300] [--pretrain-steps 2000] [--vqa-steps 1000] [--seeds 0 1 2]
                                         [--retrieval-steps 400] [--k 20] [--out DIR]

Ends with one JSON line of the figures: VQA accuracy (pretrained, scratch, gain), retrieval recalls per method,
chance R@1, the two-stage R@10 gap to full scoring and the time ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from vl.world.dataset import WorldConfig, generate_world
from vl.world.features import write_world_features
from vl.tasks.retrieval.commands import evaluate_retrieval, finetune_retrieval
from vl.config import load_config
from vl.tasks.retrieval.config import RetrievalFinetuneConfig
from vl.tasks.retrieval.index import format_report
from vl.tasks.vqa.commands import evaluate_vqa_files, finetune_vqa, format_vqa_metrics, predict_vqa
from vl.tasks.vqa.config import VqaFinetuneConfig
from vl.train.pretrain_config import VLPretrainConfig
from vl.train.pretrain_vl import pretrain_vl
from vl.precision import machine_info


ROOT = Path(__file__).resolve().parents[1]

def log(message: str) -> None:
    print(f"[downstream] {message}", file=sys.stderr, flush=True)


def run_vqa(world, store: Path, init: str, tokenizer: str, out: Path, steps: int, seed: int) -> dict:
    cfg = load_config(VqaFinetuneConfig, ROOT / "configs" / "finetune-vqa-tiny.yaml",
                                   [f"train.steps={steps}", f"train.seed={seed}", "train.log_every=25"])
    start = time.perf_counter()
    finetune_vqa(cfg, init, world.vqa_questions("train"), world.vqa_annotations("train"), world.vqa_questions("val"),
                 world.vqa_annotations("val"), store, out, tokenizer_dir=tokenizer)
    seconds = time.perf_counter() - start
    results = out / "test_results.json"
    predict_vqa(out, world.vqa_questions("test"), store, results)
    metrics = evaluate_vqa_files(world.vqa_annotations("test"), results)
    log(f"VQA from {init if init == 'scratch' else 'pretrained'}:\n{format_vqa_metrics(metrics)}")
    return {"test_accuracy": round(metrics["overall"], 2),
            "per_answer_type": {k: round(v, 2) for k, v in metrics["per_answer_type"].items()},
            "val_accuracy": round(json.loads((out / "val_metrics.json").read_text())["overall"], 2),
            "train_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=300, help="training images in the generated world")
    parser.add_argument("--test", type=int, default=100, help="test images (retrieval ranks all of them)")
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--vqa-steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="VQA fine-tuning seeds")
    parser.add_argument("--retrieval-steps", type=int, default=400)
    parser.add_argument("--k", type=int, default=20, help="first-stage candidates re-ranked by ITM")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrained", help="reuse this pretraining run (made on a world of the same seed/sizes)")
    parser.add_argument("--out", help="keep the world, store and runs here (default: a temporary directory)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models: 1 is fastest)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        world = generate_world(root / "world", WorldConfig(seed=7, train=args.train, val=60, test=args.test, size=64,
                                                           shard_size=50, questions_per_image=6),
                               force=True, progress=False)
        store = root / "features"
        shutil.rmtree(store, ignore_errors=True)
        write_world_features(world, store)

        pretrained = Path(args.pretrained) if args.pretrained else root / "pretrain"
        pretrain_seconds = 0.0
        if not args.pretrained:
            shutil.rmtree(pretrained, ignore_errors=True)
            cfg = load_config(VLPretrainConfig, ROOT / "configs" / "pretrain-uniter-tiny.yaml",
                                       [f"train.steps={args.pretrain_steps}", "train.batch_size=32",
                                        "train.log_every=25", f"train.save_every={args.pretrain_steps}",
                                        f"train.seed={args.seed}", "data.shuffle_buffer=1000"])
            log(f"pretraining UNITER-tiny for {args.pretrain_steps} steps")
            start = time.perf_counter()
            pretrain_vl(cfg, pretrained, str(store), shards=world.shard_pattern("train"))
            pretrain_seconds = time.perf_counter() - start

        # The scratch baseline gets the pretrained run's tokenizer, so both models have the same shape.
        tokenizer = str(pretrained)
        vqa_pretrained = [run_vqa(world, store, str(pretrained), tokenizer, root / f"vqa-pretrained-{seed}",
                                  args.vqa_steps, seed) for seed in args.seeds]
        vqa_scratch = [run_vqa(world, store, "scratch", tokenizer, root / f"vqa-scratch-{seed}", args.vqa_steps, seed)
                       for seed in args.seeds]

        cfg = load_config(RetrievalFinetuneConfig, ROOT / "configs" / "finetune-retrieval-tiny.yaml",
                                             [f"train.steps={args.retrieval_steps}", f"train.seed={args.seed}",
                                              "train.log_every=25", f"retrieval.rerank_k={args.k}"])
        log(f"fine-tuning retrieval for {args.retrieval_steps} steps")
        start = time.perf_counter()
        finetune_retrieval(cfg, str(pretrained), world.karpathy, store, root / "retrieval")
        retrieval_seconds = time.perf_counter() - start
        report = evaluate_retrieval(root / "retrieval", world.karpathy, "test", store, root / "RANKINGS.json",
                                    k=args.k, full=True)
        log("retrieval on the test split:\n" + format_report(report))
        itm_only = evaluate_retrieval(root / "retrieval", world.karpathy, "test", store, root / "RANKINGS-itm.json",
                                      k=args.k, full=True, pair_score="itm")
        log("the same, re-ranked by the ITM score alone:\n" + format_report(itm_only))

    def recalls(method: str, source: dict | None = None) -> dict:
        source = source or report
        return {direction: {name: round(value, 2) for name, value in source[method][direction].items()}
                for direction in ("text_to_image", "image_to_text")}

    two, full = report["two_stage"], report["full"]
    gap = {direction: round(two[direction]["R@10"] - full[direction]["R@10"], 2)
           for direction in ("text_to_image", "image_to_text")}
    pretrained_acc, scratch_acc = summary(vqa_pretrained), summary(vqa_scratch)
    figures = {
        "vqa": {"test_accuracy": {"pretrained": pretrained_acc, "scratch": scratch_acc},
                "gain_points": round(pretrained_acc["mean"] - scratch_acc["mean"], 2),
                "wins": sum(p["test_accuracy"] > s["test_accuracy"] for p, s in zip(vqa_pretrained, vqa_scratch)),
                "seeds": args.seeds, "steps": args.vqa_steps,
                "runs": {"pretrained": vqa_pretrained, "scratch": vqa_scratch}},
        "retrieval": {
            "num_images": report["num_images"], "num_captions": report["num_captions"], "k": args.k,
            "chance_R@1": {"text_to_image": round(100.0 / report["num_images"], 2),
                           "image_to_text": round(100.0 * 5 / report["num_captions"], 2)},
            "first_stage": recalls("first_stage"), "two_stage": recalls("two_stage"), "full": recalls("full"),
            "two_stage_minus_full_R@10": gap,
            "seconds": {"first_stage": first_seconds(report), "two_stage": two["seconds"], "full": full["seconds"]},
            "two_stage_time_fraction": round(two["seconds"] / max(full["seconds"], 1e-9), 3),
            "pair_score": report["pair_score"],
            "itm_only": {"two_stage": recalls("two_stage", itm_only), "full": recalls("full", itm_only)},
            "train_seconds": round(retrieval_seconds, 1), "steps": args.retrieval_steps,
        },
        "pretrain": {"steps": args.pretrain_steps if not args.pretrained else None,
                     "seconds": round(pretrain_seconds, 1)},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps({**figures, **machine_info()}))


def summary(runs: list[dict]) -> dict:
    values = [run["test_accuracy"] for run in runs]
    return {"mean": round(sum(values) / len(values), 2), "min": min(values), "max": max(values)}


def first_seconds(report: dict) -> float:
    return report["first_stage"]["seconds"]


if __name__ == "__main__":
    main()
