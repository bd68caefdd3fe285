"""``vl-regions train``, ``detect``, ``evaluate`` and ``extract`` (contract: docs/cli.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vl.config import atomic_write_text
from vl.errors import UserError
from vl.precision import autocast, resolve_precision
from vl.progress import progress_bar


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train the region detector on COCO instances",
        description="Train the Faster R-CNN region detector (with an attribute head when the annotations carry "
        "'attributes'). Resumes when --out already holds a checkpoint; evaluates COCO mAP on the validation set.",
    )
    train.add_argument("--instances", required=True, metavar="A.json", help="COCO instances to train on")
    train.add_argument("--images", required=True, metavar="DIR", help="directory the instances' file_names are in")
    train.add_argument("--out", required=True, metavar="RUN", help="run directory (created, or resumed)")
    train.add_argument("--val-instances", metavar="B.json", help="COCO instances to evaluate on")
    train.add_argument("--val-images", metavar="DIR2", help="directory of the validation images")
    train.add_argument("--config", metavar="F", help="run config YAML (default: built-in defaults), e.g. "
                       "configs/detector-tiny.yaml")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="k=v",
                       help="override a config value, e.g. --set train.steps=500 (repeatable)")
    train.set_defaults(func=run_train)

    detect = subparsers.add_parser(
        "detect",
        help="write COCO detection results for a directory of images",
        description="Run a trained detector on every image under DIR and write COCO detection results JSON "
        "([{image_id, category_id, bbox: [x, y, w, h], score}]). Image ids follow docs/cli.md's rule.",
    )
    detect.add_argument("--detector", required=True, metavar="RUN", help="a vl-regions train run (or a config "
                        "YAML whose detector.weights_path names torchvision weights)")
    detect.add_argument("--images", required=True, metavar="DIR")
    detect.add_argument("--annotations", metavar="A.json", help="COCO JSON mapping file_name to image id")
    detect.add_argument("--out", required=True, metavar="DETS.json")
    _add_runtime_flags(detect)
    detect.set_defaults(func=run_detect)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="score a detector on annotated images: COCO mAP and attribute accuracy",
        description="Run a trained detector on the images of COCO instances A.json and print, as one JSON line, "
        "COCO box mAP@[.5:.95] and mAP@0.5 (pycocotools) and, with an attribute head, attribute accuracy: for each "
        "ground-truth box with n attributes, the share of the head's n most probable attributes that are true.",
    )
    evaluate.add_argument("--detector", required=True, metavar="RUN", help="a vl-regions train run")
    evaluate.add_argument("--instances", required=True, metavar="A.json", help="COCO instances to score against")
    evaluate.add_argument("--images", required=True, metavar="DIR", help="directory the instances' file_names are in")
    evaluate.add_argument("--out", metavar="METRICS.json", help="also write the metrics to this file")
    _add_runtime_flags(evaluate)
    evaluate.set_defaults(func=run_evaluate)

    extract = subparsers.add_parser(
        "extract",
        help="extract region features into a feature store",
        description="Per image: boxes (10-100 by score threshold with class-agnostic NMS, a fixed --num-boxes, or "
        "--given-boxes), pooled RoI features (fp16), object class distribution and attribute argmax. Resumable: "
        "images already in STORE are skipped. Bad images are warned about and summarised, never fatal.",
    )
    extract.add_argument("--detector", required=True, metavar="RUN", help="a vl-regions train run (or a config "
                         "YAML whose detector.weights_path names torchvision weights)")
    source = extract.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="a directory of images (searched recursively)")
    source.add_argument("--shards", metavar="PATTERN", help="webdataset shards: brace pattern, glob or directory")
    extract.add_argument("--annotations", metavar="A.json", help="COCO JSON mapping file_name to image id")
    extract.add_argument("--out", required=True, metavar="STORE", help="feature store (created or continued)")
    extract.add_argument("--min-boxes", type=int, help="fewest boxes per image (default 10)")
    extract.add_argument("--max-boxes", type=int, help="most boxes per image (default 100)")
    extract.add_argument("--score-threshold", type=float, help="keep boxes scoring at least this (default 0.2)")
    extract.add_argument("--num-boxes", type=int, metavar="K", help="exactly K boxes per image instead")
    extract.add_argument("--nms", type=float, default=0.3, help="class-agnostic NMS IoU between boxes (default 0.3)")
    extract.add_argument("--given-boxes", metavar="A.json", help="COCO instances: describe exactly these boxes")
    _add_runtime_flags(extract)
    extract.set_defaults(func=run_extract)


def _add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="image-decoding worker processes (default 2)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="bf16 autocast where the CPU supports it natively (auto, the default), or fp32")


def run_train(args: argparse.Namespace) -> int:
    from vl.train.detector import train_detector

    metrics = train_detector(args.instances, args.images, args.out, args.val_instances, args.val_images,
                             args.config, args.overrides)
    if metrics:
        print(json.dumps(metrics))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from region_features.coco import read_instances
    from region_features.images import ProblemLog
    from region_features.evaluate import evaluate_detector
    from region_features.runs import load_detector

    if args.batch_size < 1 or args.workers < 0:
        raise UserError("--batch-size must be >= 1 and --workers >= 0")
    if not Path(args.images).is_dir():
        raise UserError(f"--images {args.images} is not a directory")
    instances = read_instances(args.instances)
    model, labels = load_detector(args.detector)
    problems = ProblemLog()
    metrics = evaluate_detector(model, instances, args.images, labels, args.batch_size, args.workers, problems,
                                precision=resolve_precision(args.precision, "cpu", what="--precision"))
    if args.out:
        atomic_write_text(args.out, json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))
    if problems.total:
        print(problems.summary(), file=sys.stderr)
    return 0


def run_detect(args: argparse.Namespace) -> int:
    from region_features.coco import file_id_map, read_instances
    from region_features.ids import image_id_for
    from region_features.images import ProblemLog, list_images
    from region_features.pipeline import ImageFileDataset, batches_of, detection_results
    from region_features.runs import load_detector

    if args.batch_size < 1 or args.workers < 0:
        raise UserError("--batch-size must be >= 1 and --workers >= 0")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as dets.json")
    model, labels = load_detector(args.detector)
    precision = resolve_precision(args.precision, "cpu", what="--precision")
    problems = ProblemLog()
    file_ids = file_id_map(read_instances(args.annotations, "--annotations file", require_categories=False)
                           if args.annotations else None)
    items, seen = [], set()
    for path in list_images(args.images, problems):
        image_id = image_id_for(path, args.images, file_ids)
        if image_id in seen:
            problems.warn("duplicate id", path, f"image id {image_id!r} already taken by another file; skipped")
            continue
        seen.add(image_id)
        items.append((image_id, path))
    dataset = ImageFileDataset(items, model.cfg.min_size, model.cfg.max_size)
    results: list[dict] = []
    with progress_bar(total=len(items), desc="detect", unit="img") as bar:
        for batch in batches_of(dataset, args.batch_size, args.workers, problems):
            if batch:
                with torch.inference_mode(), autocast(precision, "cpu"):
                    detections = model.detect_resized([sample["image"] for sample in batch])
                results.extend(detection_results(batch, detections, labels))
            bar.update(len(batch))
    atomic_write_text(out, json.dumps(results) + "\n")
    print(f"wrote {len(results)} detections for {len(items)} images to {out}; {problems.summary()}", file=sys.stderr)
    return 0


def run_extract(args: argparse.Namespace) -> int:
    from region_features.detector import BoxSelection
    from region_features.extract import describe_summary, extract_features
    from region_features.images import ProblemLog

    if args.num_boxes is not None:
        clashing = [flag for flag, value in (("--min-boxes", args.min_boxes), ("--max-boxes", args.max_boxes),
                                             ("--score-threshold", args.score_threshold)) if value is not None]
        if clashing:
            raise UserError(f"--num-boxes fixes the box count; drop {clashing[0]}")
    if args.given_boxes is not None and (args.num_boxes is not None or args.min_boxes is not None
                                         or args.max_boxes is not None):
        raise UserError("--given-boxes describes exactly the given boxes; drop --num-boxes/--min-boxes/--max-boxes")
    selection = BoxSelection(
        min_boxes=args.min_boxes if args.min_boxes is not None else 10,
        max_boxes=args.max_boxes if args.max_boxes is not None else 100,
        score_threshold=args.score_threshold if args.score_threshold is not None else 0.2,
        num_boxes=args.num_boxes,
        nms_threshold=args.nms,
    )
    problems = ProblemLog()
    summary = extract_features(
        args.detector, args.out, images_dir=args.images, annotations=args.annotations, shards=args.shards,
        selection=selection, given_boxes=args.given_boxes, batch_size=args.batch_size, num_workers=args.workers,
        precision=args.precision, problems=problems,
    )
    print(describe_summary(summary, problems, args.out), file=sys.stderr)
    return 0
