"""Inference-side plumbing shared by evaluation, ``detect`` and ``extract``: label names, weight files, image batches
decoded and resized in DataLoader workers, and COCO detection results.

Images are decoded (``region_features.images.load_image``) and resized to the detector's input scale inside the
workers, so the main process only normalises, batches and runs the model. A sample is a dict:
``image_id``, ``path`` (a file, or ``SHARD:KEY`` for shard samples), ``image`` (3, h, w) uint8 at model scale,
``orig_size`` (H, W) of the file, ``scale`` (4,) float32 ``[sx, sy, sx, sy]`` mapping original pixels to model pixels.
Bad inputs never stop a run: they are warned about (one line naming the file) and counted in a ``ProblemLog``.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from region_features.detector import resized_shape
from region_features.images import ImageFileDataset as _DecodedImages
from region_features.images import ProblemLog, collate_image_items, load_image
from vl.atomic import atomic_output
from vl.config import atomic_write_text
from vl.errors import UserError

SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class DetectorLabels:
    """Names of a detector's outputs: label ``i`` (1..C) is ``categories[i-1]`` (COCO ``{"id", "name"}``); attribute
    ``j`` is ``attributes[j]``; a horizontal flip maps attribute ``j`` to ``flip_attributes[j]``."""

    categories: list[dict[str, Any]]
    attributes: list[str] = field(default_factory=list)
    flip_attributes: list[int] = field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return [str(category["name"]) for category in self.categories]

    def write(self, path: str | os.PathLike) -> None:
        payload = {"categories": self.categories, "attributes": self.attributes,
                   "flip_attributes": self.flip_attributes}
        atomic_write_text(path, json.dumps(payload, indent=1) + "\n")

    @classmethod
    def read(cls, path: str | os.PathLike) -> DetectorLabels:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} is missing: the run does not name its classes")
        try:
            data = json.loads(path.read_text())
            return cls(list(data["categories"]), list(data.get("attributes", [])),
                       list(data.get("flip_attributes", [])))
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path} is not a labels file: {err}") from None


# ----------------------------------------------------------------------------------------------------------- weights


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_output(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "producer": "vl-regions"})


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors state dict saved by ``save_weights``; every mismatch is a UserError naming the file."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - any reader failure means a bad file
        raise UserError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]})") from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'" if unexpected
                  else f"'{wrong[0]}' has shape {list(state[wrong[0]].shape)}, expected {list(own[wrong[0]].shape)}")
        raise UserError(f"{path}: weights do not fit the run's config ({detail})")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------- images


class ResizeToModel:
    """PIL image -> (3, h, w) uint8 tensor at the detector's input scale (picklable, runs in DataLoader workers)."""

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        height, width, _ = resized_shape(image.height, image.width, self.min_size, self.max_size)
        if (width, height) != image.size:
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class ImageFileDataset(_DecodedImages):
    """Image files ``(image_id, path)`` decoded and resized to model scale in DataLoader workers (items as in
    ``region_features.images.ImageFileDataset`` with the original size)."""

    def __init__(self, paths_with_ids: Sequence[tuple[Any, str | os.PathLike]], min_size: int, max_size: int) -> None:
        super().__init__(paths_with_ids, max_side=max_size, transform=ResizeToModel(min_size, max_size),
                         with_original_size=True)


class ShardImageDataset(IterableDataset):
    """Images from webdataset tar shards (img2dataset layout), decoded and resized in DataLoader workers.

    Shards are split across workers (every n-th shard) in list order. The image id is the sample's JSON
    ``image_id`` when present, else its key (docs/cli.md). Samples whose id is in ``skip`` are not decoded; samples
    without an image member or in an unreadable shard come back with image None and a warning. Items are
    ``(image_id, "SHARD:KEY.EXT", image, warning, original_size)``.
    """

    def __init__(self, shards: Sequence[str], min_size: int, max_size: int,
                 skip: Callable[[Any], bool] | None = None) -> None:
        self.shards = list(shards)
        self.resize = ResizeToModel(min_size, max_size)
        self.max_side = max_size
        self.skip = skip

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in self.shards[worker::workers]:
            yield from self._read_shard(shard)

    def _read_shard(self, shard: str) -> Iterator[tuple]:
        """Samples of one shard in file order; a sample's members are adjacent in the tar (webdataset's rule)."""
        from region_features.images import ImageWarning

        current_key, members = None, {}
        try:
            with tarfile.open(shard, "r|*") as tar:  # streamed: one sample in memory at a time
                for member in tar:
                    if not member.isfile() or "." not in Path(member.name).name:
                        continue
                    directory, name = os.path.split(member.name)
                    key, ext = name.split(".", 1)
                    key = f"{directory}/{key}" if directory else key
                    ext = ext.lower()
                    if key != current_key:
                        if current_key is not None:
                            yield from self._sample(shard, current_key, members)
                        current_key, members = key, {}
                    if ext in (*SHARD_IMAGE_EXTENSIONS, "json"):
                        handle = tar.extractfile(member)
                        if handle is not None:
                            members[ext] = handle.read()
        except (OSError, tarfile.TarError, EOFError) as err:
            yield (None, shard, None, ImageWarning("unreadable shard", f"cannot read shard ({err}); rest skipped"),
                   None)
        if current_key is not None:
            yield from self._sample(shard, current_key, members)

    def _sample(self, shard: str, key: str, members: dict[str, bytes]) -> Iterator[tuple]:
        from region_features.images import ImageWarning
        from region_features.ids import image_id_of

        meta: dict = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"])
                meta = meta if isinstance(meta, dict) else {}
            except (ValueError, UnicodeDecodeError):
                meta = {}
        image_id = image_id_of(key, meta)  # the webdataset key, as vl pretrain reads it
        if self.skip is not None and self.skip(image_id):
            return
        ext = next((e for e in SHARD_IMAGE_EXTENSIONS if e in members), None)
        name = f"{shard}:{key}.{ext or 'jpg'}"
        if ext is None:
            yield image_id, name, None, ImageWarning("missing image", "sample has no image member"), None
            return
        image, warning, original_size = self._decode(members[ext], ext)
        yield image_id, name, image, warning, original_size

    def _decode(self, data: bytes, ext: str) -> tuple:
        # load_image reads files; a private temporary file keeps its conversions and bad-input handling.
        with tempfile.NamedTemporaryFile(suffix=f".{ext}") as handle:
            handle.write(data)
            handle.flush()
            loaded = load_image(handle.name, self.max_side)
        image = self.resize(loaded.image) if loaded.image is not None else None
        return image, loaded.warning, loaded.original_size


def batches_of(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    num_workers: int,
    problems: ProblemLog,
) -> Iterator[list[dict]]:
    """Batches of decoded samples (dicts, see the module docstring) in dataset order; bad images are warned about
    through ``problems`` and left out (a batch may come out empty)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_image_items)
    for ids, paths, images, warnings, sizes in loader:
        batch = []
        for image_id, path, image, warning, size in zip(ids, paths, images, warnings, sizes):
            problems.warn_image(path, warning)
            if image is None:
                continue
            orig_w, orig_h = size
            sx, sy = image.shape[-1] / orig_w, image.shape[-2] / orig_h
            batch.append({"image_id": image_id, "path": path, "image": image, "orig_size": (orig_h, orig_w),
                          "scale": torch.tensor([sx, sy, sx, sy], dtype=torch.float32)})
        yield batch


def to_original(boxes: torch.Tensor, sample: dict) -> torch.Tensor:
    """Model-scale x1y1x2y2 boxes -> pixels of the original image, clipped to it."""
    boxes = boxes.float() / sample["scale"]
    height, width = sample["orig_size"]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


def detection_results(batch: list[dict], detections: list[dict], labels: DetectorLabels) -> list[dict]:
    """COCO detection results (``image_id``, ``category_id``, ``bbox`` [x, y, w, h] original pixels, ``score``)."""
    results = []
    for sample, detection in zip(batch, detections):
        boxes = to_original(detection["boxes"], sample)
        for box, score, label in zip(boxes.tolist(), detection["scores"].tolist(), detection["labels"].tolist()):
            x1, y1, x2, y2 = box
            results.append({
                "image_id": sample["image_id"],
                "category_id": labels.categories[label - 1]["id"],
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": round(float(score), 5),
            })
    return results

