"""Scoring a detector on annotated images: COCO box mAP (pycocotools) and attribute accuracy."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch

from region_features.coco import CocoInstances
from region_features.detector import BoxSelection, RegionDetector
from region_features.images import ProblemLog
from region_features.pipeline import DetectorLabels, ImageFileDataset, batches_of, detection_results
from vl.precision import autocast


def evaluate_detector(
    model: RegionDetector,
    instances: CocoInstances,
    images_dir: str | os.PathLike,
    labels: DetectorLabels,
    batch_size: int = 8,
    num_workers: int = 0,
    problems: ProblemLog | None = None,
    precision: str = "fp32",
) -> dict:
    """COCO box mAP (pycocotools) and attribute accuracy on an annotated image set (``precision``: a resolved
    ``vl.precision`` choice for the forward passes).

    Attribute accuracy: for each ground-truth box with n >= 1 attributes, the attribute head (conditioned on the
    class the model predicts for that box) ranks all attributes; the share of its top n that are true. Chance level
    is n / A (``attr_chance``). ``attr_top1`` is the share of boxes whose single best attribute is true.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    problems = problems or ProblemLog()
    images_dir = Path(images_dir)
    items = [(image.image_id, images_dir / image.file_name) for image in instances.images]
    gt_boxes = {image.image_id: image.boxes for image in instances.images}
    attribute_index = {name: i for i, name in enumerate(labels.attributes)}
    dataset = ImageFileDataset(items, model.cfg.min_size, model.cfg.max_size)
    was_training = model.training
    model.eval()
    results: list[dict] = []
    attr_hits = attr_total = top1_hits = attr_boxes = 0
    chance = 0.0
    try:
        for batch in batches_of(dataset, batch_size, num_workers, problems):
            with torch.inference_mode(), autocast(precision, "cpu"):
                detections = model.detect_resized([sample["image"] for sample in batch])
            results.extend(detection_results(batch, detections, labels))
            if model.num_attributes == 0:
                continue
            given = []
            for sample in batch:
                boxes = [b.bbox for b in gt_boxes[sample["image_id"]] if not b.iscrowd]
                given.append(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * sample["scale"])
            with torch.inference_mode(), autocast(precision, "cpu"):
                regions = model.extract_regions([s["image"] for s in batch], BoxSelection(), given_boxes=given)
            for sample, region in zip(batch, regions):
                boxes = [b for b in gt_boxes[sample["image_id"]] if not b.iscrowd]
                for box, probs in zip(boxes, region["attr_probs"]):
                    truth = {attribute_index[a] for a in box.attributes if a in attribute_index}
                    if not truth:
                        continue
                    ranked = torch.argsort(probs, descending=True).tolist()
                    attr_hits += len(truth & set(ranked[: len(truth)]))
                    attr_total += len(truth)
                    top1_hits += int(ranked[0] in truth)
                    attr_boxes += 1
                    chance += len(truth) / len(labels.attributes)
    finally:
        model.train(was_training)
    metrics = {"images": len(items), "detections": len(results)}
    gt = _coco_ground_truth(instances)
    if results and gt["annotations"]:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(results)
            evaluator = COCOeval(coco_gt, coco_dt, "bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics["mAP"] = round(float(max(evaluator.stats[0], 0.0)), 4)
        metrics["mAP@0.5"] = round(float(max(evaluator.stats[1], 0.0)), 4)
    else:
        metrics["mAP"] = metrics["mAP@0.5"] = 0.0
    if attr_boxes:
        metrics["attr_accuracy"] = round(attr_hits / attr_total, 4)
        metrics["attr_top1"] = round(top1_hits / attr_boxes, 4)
        metrics["attr_chance"] = round(chance / attr_boxes, 4)
    return metrics


def _coco_ground_truth(instances: CocoInstances) -> dict:
    """A pycocotools-ready dict from the parsed instances (``area`` from the box, ids renumbered)."""
    images, annotations = [], []
    for image in instances.images:
        images.append({"id": image.image_id, "file_name": image.file_name,
                       "width": image.width or 0, "height": image.height or 0})
        for box in image.boxes:
            x1, y1, x2, y2 = box.bbox
            annotations.append({"id": len(annotations) + 1, "image_id": image.image_id,
                                "category_id": box.category_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": int(box.iscrowd)})
    return {"images": images, "annotations": annotations, "categories": instances.categories}
