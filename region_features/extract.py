"""Region feature extraction into a feature store: ``vl-regions extract``.

For each image: K boxes (10-100 by score threshold after class-agnostic NMS, a fixed K, or exactly the given boxes),
their pooled RoI features (fp16 in the store), the object class distribution with argmax and confidence, and every
attribute's probability with the argmax and its confidence (see ``RegionDetector.extract_regions``). Boxes are
stored in original image pixels with the image size, so normalised boxes are ``boxes / [w, h, w, h]``.

- Batched; images are decoded and resized in DataLoader worker processes.
- Resumable: images whose id is already in the store are skipped before decoding.
- Deterministic: the same inputs and flags give the same store (eval mode, fixed order and batching).
- Durable: the store writer commits as it goes and on exit, so a crash or Ctrl-C loses nothing already committed.
- Bad inputs (corrupt, truncated, odd modes, tiny or huge images, unreadable directories, images without
  detections or without given boxes) are warned about, counted and summarised; they never stop the run.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from vl.progress import progress_bar

from region_features.coco import file_id_map, read_instances
from region_features.detector import BoxSelection, RegionDetector
from region_features.images import ProblemLog, list_images
from region_features.pipeline import DetectorLabels, ImageFileDataset, ShardImageDataset, batches_of, to_original
from region_features.store_writer import FeatureStoreWriter
from region_features.runs import load_detector
from region_features.ids import image_id_for
from vl.errors import UserError
from vl.precision import autocast, resolve_precision

Precision = Literal["auto", "fp32", "bf16"]  # resolved by vl.precision: auto is bf16 where native


@dataclass(frozen=True)
class ExtractSummary:
    """What one ``extract`` run did."""

    extracted: int  # images written by this run
    skipped_existing: int  # images already in the store (counted for image directories; shards skip silently)
    problems: int  # bad inputs warned about
    seconds: float
    store_size: int  # images in the store afterwards

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0


class _Stored:
    """Picklable membership test against the ids already in the store (shard workers skip those samples)."""

    def __init__(self, ids: set) -> None:
        self.ids = ids

    def __call__(self, image_id: Any) -> bool:
        return image_id in self.ids


def _given_boxes_by_id(path: str | os.PathLike) -> tuple[dict[Any, torch.Tensor], Any]:
    instances = read_instances(path, "--given-boxes file", require_categories=False)
    boxes = {
        image.image_id: torch.tensor([b.bbox for b in image.boxes], dtype=torch.float32).reshape(-1, 4)
        for image in instances.images
    }
    return boxes, instances


def extract_features(
    detector: str | os.PathLike | tuple[RegionDetector, DetectorLabels],
    out: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    annotations: str | os.PathLike | None = None,
    shards: str | None = None,
    selection: BoxSelection | None = None,
    given_boxes: str | os.PathLike | None = None,
    batch_size: int = 8,
    num_workers: int = 2,
    precision: Precision = "auto",
    channels_last: bool = True,
    progress: bool | None = None,
    problems: ProblemLog | None = None,
    limit: int | None = None,
) -> ExtractSummary:
    """Extract region features of ``images_dir`` (or ``shards``) into the feature store ``out``.

    ``detector``: a run directory / config (see ``load_detector``) or an already loaded ``(model, labels)``.
    ``limit`` stops after that many new images (the rest is left for a later, resumed run).
    """
    if (images_dir is None) == (shards is None):
        raise UserError("give exactly one of --images DIR or --shards PATTERN")
    if shards is not None and annotations is not None:
        raise UserError("--annotations maps image files to ids and has no effect with --shards (a sample's id is "
                        "its JSON image_id, else its key): drop --annotations")
    if batch_size < 1 or num_workers < 0:
        raise UserError("--batch-size must be >= 1 and --workers >= 0")
    problems = problems if problems is not None else ProblemLog()
    selection = selection if selection is not None else BoxSelection()
    precision = resolve_precision(precision, "cpu", what="--precision")
    loaded_here = not isinstance(detector, tuple)
    model, labels = load_detector(detector) if loaded_here else detector
    model.eval()
    if loaded_here:  # a caller's model keeps its norms: it may be trained after
        model.fold_batch_norms()
    if channels_last:
        model.use_channels_last()
    boxes_by_id: dict[Any, torch.Tensor] | None = None
    given_instances = None
    if given_boxes is not None:
        boxes_by_id, given_instances = _given_boxes_by_id(given_boxes)
    id_source = read_instances(annotations, "--annotations file", require_categories=False) if annotations else None
    meta = {
        "class_names": labels.class_names,
        "attribute_names": list(labels.attributes),
        "category_ids": [category["id"] for category in labels.categories],
        "detector": str(detector) if not isinstance(detector, tuple) else model.cfg.backbone,
        "backbone": model.cfg.backbone,
        "boxes": "given" if given_boxes is not None else "fixed" if selection.num_boxes else "threshold",
        "min_boxes": selection.min_boxes,
        "max_boxes": selection.max_boxes,
        "num_boxes": selection.num_boxes,
        "score_threshold": selection.score_threshold,
        "nms_threshold": selection.nms_threshold,
    }
    stored_before = _store_ids(out) if shards is not None else []
    started = time.time()
    extracted = skipped = 0
    with FeatureStoreWriter(out, model.feature_dim, model.num_classes, model.num_attributes, meta) as writer:
        total: int | None
        if images_dir is not None:
            file_ids = file_id_map(id_source if id_source is not None else given_instances)
            items, seen = [], set()
            for path in list_images(images_dir, problems):
                image_id = image_id_for(path, images_dir, file_ids)
                if image_id in seen:
                    problems.warn("duplicate id", path, f"image id {image_id!r} is taken by another file; skipped")
                    continue
                seen.add(image_id)
                if image_id in writer:
                    skipped += 1
                    continue
                items.append((image_id, path))
            if limit is not None:
                items = items[:limit]
            dataset = ImageFileDataset(items, model.cfg.min_size, model.cfg.max_size)
            total = len(items)
        else:
            from region_features.ids import expand_shards

            dataset = ShardImageDataset(expand_shards(shards), model.cfg.min_size, model.cfg.max_size,
                                        skip=_Stored(set(stored_before)))
            total = limit
        bar = progress_bar(total=total, desc="extract", unit="img", show=progress,
                   dynamic_ncols=True, file=sys.stderr)
        try:
            for batch in batches_of(dataset, batch_size, num_workers, problems):
                batch = _usable(batch, writer, boxes_by_id, problems)
                if limit is not None:
                    batch = batch[: max(0, limit - extracted)]
                if batch:
                    records = extract_batch(model, batch, selection, boxes_by_id, precision, problems)
                    for sample, record in zip(batch, records):
                        writer.add(sample["image_id"], record)
                    extracted += len(batch)
                bar.update(len(batch))
                if limit is not None and extracted >= limit:
                    break
        finally:
            bar.close()
        store_size = len(writer)
    summary = ExtractSummary(extracted, skipped, problems.total, round(time.time() - started, 3), store_size)
    return summary


def _store_ids(out: str | os.PathLike) -> list:
    from region_features.store import FeatureStore

    root = Path(out)
    if not (root / "store.json").is_file():
        return []
    with FeatureStore(root) as store:
        return store.ids()


def _usable(batch: list[dict], writer: FeatureStoreWriter, boxes_by_id: dict | None, problems: ProblemLog) -> list:
    """Drop samples already stored (duplicate ids in shards) or without given boxes, with a warning each."""
    kept, ids = [], set()
    for sample in batch:
        image_id = sample["image_id"]
        if image_id in writer or image_id in ids:
            problems.warn("duplicate id", sample["path"], f"image id {image_id!r} is already stored; skipped")
            continue
        if boxes_by_id is not None and image_id not in boxes_by_id:
            problems.warn("no given boxes", sample["path"], f"--given-boxes has no image {image_id!r}; skipped")
            continue
        ids.add(image_id)
        kept.append(sample)
    return kept


def extract_batch(
    model: RegionDetector,
    batch: list[dict],
    selection: BoxSelection,
    boxes_by_id: dict | None,
    precision: Literal["fp32", "bf16"],
    problems: ProblemLog,
) -> list[dict]:
    """Store records (see ``region_features.store_format``) for one batch of decoded samples."""
    given = None
    if boxes_by_id is not None:
        given = [boxes_by_id[sample["image_id"]] * sample["scale"] for sample in batch]
    with torch.inference_mode(), autocast(precision, "cpu"):
        regions = model.extract_regions([sample["image"] for sample in batch], selection, given_boxes=given)
    records = []
    for sample, region in zip(batch, regions):
        if boxes_by_id is not None:
            boxes = boxes_by_id[sample["image_id"]]  # exactly the given boxes, not a rescaled round trip
        else:
            boxes = to_original(region["boxes"], sample)
            confident = region["selection_scores"] >= selection.score_threshold
            if selection.num_boxes is None and not bool(confident.any()):
                problems.warn("no detections", sample["path"],
                              f"no box scored >= {selection.score_threshold}; kept the {len(boxes)} best boxes")
        height, width = sample["orig_size"]
        records.append({
            "image_h": int(height),
            "image_w": int(width),
            "boxes": boxes.numpy().astype("float32"),
            "features": region["region_feats"].float().numpy().astype("float16"),
            "object_ids": region["object_ids"].numpy(),
            "object_conf": region["object_conf"].float().numpy(),
            "object_probs": region["object_probs"].float().numpy().astype("float16"),
            "attr_ids": region["attr_ids"].numpy(),
            "attr_conf": region["attr_conf"].float().numpy(),
            "attr_probs": region["attr_probs"].float().numpy().astype("float16"),
        })
    return records


def describe_summary(summary: ExtractSummary, problems: ProblemLog, out: str | os.PathLike) -> str:
    """The end-of-run line(s) printed by ``vl-regions extract``."""
    lines = [
        f"extracted {summary.extracted} images into {out} ({summary.images_per_second:.1f} images/s); "
        f"{summary.skipped_existing} already stored; the store holds {summary.store_size}",
        problems.summary(),
    ]
    return "\n".join(lines)

