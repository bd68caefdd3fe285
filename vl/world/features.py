"""Region features for the generated world without a detector: one region per ground-truth object.

Tests, benchmarks and examples of pretraining need a feature store whose regions carry what the captions talk about,
and they must not wait for a detector to train. ``write_world_features`` reads a world's COCO instances and writes,
per object, a feature that encodes its shape (category), colour and size as scaled one-hot blocks plus Gaussian noise,
its ground-truth box, a soft class distribution peaked at its category (for MRC-kl) and its colour as attribute.

Feature layout (``feature_dim`` >= ``len(SHAPES) + len(COLORS) + 1``): ``[shape one-hot | colour one-hot | size |
zero padding]`` times ``signal``, plus N(0, ``noise``) in every dimension. Classes are the world's categories in id
order; attributes are the colours followed by the sizes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from region_features.store_writer import FeatureStoreWriter
from vl.world.dataset import COLORS, SHAPES, SIZES, WorldPaths
from vl.errors import UserError

MIN_FEATURE_DIM = len(SHAPES) + len(COLORS) + 1
ATTRIBUTE_NAMES = tuple(COLORS) + tuple(SIZES)


def world_region_record(objects: Sequence[dict], categories: dict[int, int], image_w: int, image_h: int,
                        feature_dim: int, rng: np.random.Generator, signal: float = 1.0, noise: float = 0.1,
                        class_confidence: float = 0.8) -> dict[str, np.ndarray | int]:
    """A store record for one image from its COCO annotations (``bbox`` [x, y, w, h], ``category_id``,
    ``attributes`` [colour, size]); ``categories`` maps category id -> class index."""
    num_classes = len(categories)
    num_boxes = len(objects)
    features = rng.normal(0.0, noise, size=(num_boxes, feature_dim)).astype(np.float32)
    boxes = np.zeros((num_boxes, 4), dtype=np.float32)
    object_ids = np.zeros(num_boxes, dtype=np.int64)
    probs = np.full((num_boxes, num_classes), (1.0 - class_confidence) / max(num_classes - 1, 1), dtype=np.float32)
    attr_ids = np.full(num_boxes, -1, dtype=np.int64)
    for row, annotation in enumerate(objects):
        x, y, w, h = (float(v) for v in annotation["bbox"])
        boxes[row] = (x, y, min(x + w, image_w), min(y + h, image_h))
        class_index = categories[int(annotation["category_id"])]
        object_ids[row] = class_index
        probs[row, class_index] = class_confidence
        features[row, class_index] += signal
        attributes = annotation.get("attributes") or []
        for attribute in attributes:
            if attribute in COLORS:
                color_index = list(COLORS).index(attribute)
                features[row, len(SHAPES) + color_index] += signal
                attr_ids[row] = color_index
            elif attribute in SIZES:
                features[row, len(SHAPES) + len(COLORS)] += signal * (1.0 if attribute == "large" else -1.0)
    return {
        "image_h": int(image_h),
        "image_w": int(image_w),
        "boxes": boxes,
        "features": features,
        "object_ids": object_ids,
        "object_conf": np.full(num_boxes, class_confidence, dtype=np.float32),
        "object_probs": probs,
        "attr_ids": attr_ids,
        "attr_conf": np.where(attr_ids >= 0, 1.0, 0.0).astype(np.float32),
    }


def write_world_features(world: WorldPaths | str | os.PathLike, out: str | os.PathLike,
                         splits: Sequence[str] = ("train", "val", "test"), feature_dim: int = 16, seed: int = 0,
                         signal: float = 1.0, noise: float = 0.1, skip_image_ids: Sequence[int] = ()) -> Path:
    """Write a feature store at ``out`` with one region per ground-truth object of the world's ``splits``.

    Images listed in ``skip_image_ids`` are left out (to test samples without features). Returns ``out``.
    """
    paths = world if isinstance(world, WorldPaths) else WorldPaths(Path(world))
    if feature_dim < MIN_FEATURE_DIM:
        raise UserError(f"feature_dim {feature_dim} is too small for the world's features (need {MIN_FEATURE_DIM})")
    rng = np.random.default_rng(seed)
    skip = set(skip_image_ids)
    writer = None
    try:
        for split in splits:
            instances_path = paths.instances(split)
            if not instances_path.is_file():
                raise UserError(f"world instances file not found: {instances_path}")
            instances = json.loads(instances_path.read_text())
            categories = {int(c["id"]): index for index, c in enumerate(sorted(instances["categories"],
                                                                                key=lambda c: c["id"]))}
            if writer is None:
                class_names = [c["name"] for c in sorted(instances["categories"], key=lambda c: c["id"])]
                writer = FeatureStoreWriter(out, feature_dim, len(categories), len(ATTRIBUTE_NAMES),
                                            {"class_names": class_names, "attribute_names": list(ATTRIBUTE_NAMES),
                                             "source": "vl.world.features"}, fsync=False)
            by_image: dict[int, list[dict]] = {}
            for annotation in instances["annotations"]:
                by_image.setdefault(int(annotation["image_id"]), []).append(annotation)
            for image in instances["images"]:
                image_id = int(image["id"])
                if image_id in skip or image_id in writer:
                    continue
                record = world_region_record(by_image.get(image_id, []), categories, int(image["width"]),
                                             int(image["height"]), feature_dim, rng, signal, noise)
                writer.add(image_id, record)
    finally:
        if writer is not None:
            writer.close()
    return Path(out)
