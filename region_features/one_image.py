"""One image file described as the feature store keeps it, straight from a loaded detector: what
``vl-regions extract`` would store for it and ``FeatureStore`` would read back (``describe_image``), for callers that
answer about a single image without a store (``vl vqa``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from region_features.images import load_image
from region_features.pipeline import ResizeToModel, to_original
from vl.errors import UserError


def describe_image(detector: Any, image_path: str | os.PathLike, selection: Any,
                   flag: str = "--image") -> dict[str, np.ndarray]:
    """Regions of one image file as ``vl-regions extract`` stores them and ``FeatureStore`` reads them back:
    ``features`` (K, D) (rounded through float16, as the store keeps them), ``normalized_boxes`` (K, 4), the class
    and attribute distributions with their argmax and confidence (``object_probs``, ``object_ids``,
    ``object_conf``, ``attr_probs``, ``attr_ids``, ``attr_conf``). ``detector`` is a loaded ``RegionDetector``,
    ``selection`` the ``BoxSelection`` that picks the boxes. A missing or unreadable image is a UserError naming
    ``flag``."""
    image_path = Path(image_path)
    if not image_path.is_file():
        raise UserError(f"{flag} {image_path} is not a file")
    loaded = load_image(image_path, detector.cfg.max_size)
    if loaded.image is None:
        raise UserError(f"{flag} {image_path}: {loaded.warning}")
    orig_w, orig_h = loaded.original_size
    image = ResizeToModel(detector.cfg.min_size, detector.cfg.max_size)(loaded.image)  # (3, h, w) uint8
    scale_x, scale_y = image.shape[-1] / orig_w, image.shape[-2] / orig_h
    sample = {"orig_size": (orig_h, orig_w),
              "scale": torch.tensor([scale_x, scale_y, scale_x, scale_y], dtype=torch.float32)}
    with torch.inference_mode():
        region = detector.extract_regions([image], selection)[0]
    boxes = to_original(region["boxes"], sample)
    normalized = (boxes / torch.tensor([orig_w, orig_h, orig_w, orig_h], dtype=torch.float32)).clamp(0.0, 1.0)

    def stored(key: str) -> np.ndarray:  # as the store keeps it: float16
        return region[key].float().numpy().astype(np.float16)

    return {"features": stored("region_feats"), "normalized_boxes": normalized.numpy().astype(np.float32),
            "object_probs": stored("object_probs"), "object_ids": region["object_ids"].numpy(),
            "object_conf": region["object_conf"].float().numpy(), "attr_probs": stored("attr_probs"),
            "attr_ids": region["attr_ids"].numpy(), "attr_conf": region["attr_conf"].float().numpy()}
