"""Detection training samples from COCO instances: images with their boxes, labels and attribute vectors.

``DetectionTrainData[(index, flip)]`` decodes one image and its boxes; ``EpochSampler`` yields the
``(index, flip)`` keys in a seeded order per epoch, from a resumable position. A trainer batches them (see
``vl.train.detector``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from region_features.coco import CocoInstances
from region_features.images import load_image
from region_features.pipeline import DetectorLabels


class DetectionTrainData(Dataset):
    """COCO instances as training samples. Indexed by ``(index, flip)`` (see ``EpochSampler``).

    Returns a dict: ``index``, ``path``, ``image`` (3, H, W) uint8 or None when unreadable, ``warning`` (str or
    None), ``boxes`` (N, 4) float32 x1y1x2y2, ``labels`` (N,) int64 in 1..C, ``attributes`` (N, A) float32
    multi-hot. Crowd and degenerate boxes are left out; boxes are clipped to the decoded image.
    """

    def __init__(self, instances: CocoInstances, images_dir: str | os.PathLike, labels: DetectorLabels) -> None:
        self.images_dir = Path(images_dir)
        self.label_of = {category["id"]: i + 1 for i, category in enumerate(labels.categories)}
        attribute_index = {name: i for i, name in enumerate(labels.attributes)}
        self.flip_perm = torch.tensor(labels.flip_attributes or list(range(len(labels.attributes))), dtype=torch.long)
        self.items = []
        for image in instances.images:
            boxes = [b for b in image.boxes if not b.iscrowd and b.category_id in self.label_of]
            attributes = np.zeros((len(boxes), len(labels.attributes)), dtype=np.float32)
            for row, box in enumerate(boxes):
                for name in box.attributes:
                    if name in attribute_index:
                        attributes[row, attribute_index[name]] = 1.0
            self.items.append((
                str(self.images_dir / image.file_name),
                np.array([b.bbox for b in boxes], dtype=np.float32).reshape(-1, 4),
                np.array([self.label_of[b.category_id] for b in boxes], dtype=np.int64),
                attributes,
            ))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, bool]) -> dict:
        index, flip = key
        path, boxes, labels, attributes = self.items[index]
        loaded = load_image(path)
        sample = {"index": index, "path": path, "image": None, "warning": loaded.warning}
        if loaded.image is None:
            return sample
        image = torch.from_numpy(np.asarray(loaded.image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
        height, width = image.shape[-2:]
        boxes = torch.from_numpy(boxes).clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        valid = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        boxes, labels, attributes = boxes[valid], torch.from_numpy(labels)[valid], torch.from_numpy(attributes)[valid]
        if flip:
            image = image.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            attributes = attributes[:, self.flip_perm]  # an involution: left <-> right twins
        sample.update(image=image.contiguous(), boxes=boxes, labels=labels, attributes=attributes)
        return sample


class EpochSampler(Sampler):
    """Yields ``(index, flip)`` in a seeded order per epoch, starting at ``start`` (a resumed position)."""

    def __init__(self, size: int, seed: int, flip: bool) -> None:
        self.size, self.seed, self.flip = size, seed, flip
        self.epoch = 0
        self.start = 0

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        flips = (torch.rand(self.size, generator=generator) < 0.5).tolist()
        for position in range(self.start, self.size):
            yield order[position], bool(flips[position]) and self.flip

    def __len__(self) -> int:
        return self.size - self.start


def attribute_pos_weights(dataset: DetectionTrainData, cap: float) -> torch.Tensor:
    """Per attribute: (boxes without it) / (boxes with it), clamped to [1, cap]; (A,)."""
    attributes = np.concatenate([item[3] for item in dataset.items]) if dataset.items else np.zeros((0, 0))
    positives = torch.from_numpy(attributes.sum(0)).float()
    negatives = len(attributes) - positives
    return (negatives / positives.clamp_min(1.0)).clamp(1.0, cap)
