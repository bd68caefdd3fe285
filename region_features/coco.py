"""COCO instances for the detector: reading (with per-box ``attributes``), label maps and the image-id rule.

Formats are those of docs/cli.md. Boxes are converted from COCO ``[x, y, w, h]`` to ``x1y1x2y2`` pixels.
Object labels are contiguous: label ``i`` (1..C) is the i-th category by ascending id, 0 is background.
Attribute ids index the sorted attribute vocabulary of the training annotations.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vl.errors import UserError


@dataclass
class InstanceBox:
    """One annotated box: ``bbox`` x1y1x2y2 pixels, COCO ``category_id``, attribute names."""

    bbox: tuple[float, float, float, float]
    category_id: int
    attributes: tuple[str, ...] = ()
    iscrowd: bool = False


@dataclass
class ImageRecord:
    image_id: int | str
    file_name: str
    width: int | None = None
    height: int | None = None
    boxes: list[InstanceBox] = field(default_factory=list)


@dataclass
class CocoInstances:
    """A COCO instances file: images in file order with their boxes, categories in file order."""

    path: str
    images: list[ImageRecord]
    categories: list[dict[str, Any]]
    has_attributes: bool

    def attribute_names(self) -> list[str]:
        return sorted({name for image in self.images for box in image.boxes for name in box.attributes})

    def by_id(self) -> dict[int | str, ImageRecord]:
        return {image.image_id: image for image in self.images}


def read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{what} {path} is not valid JSON: {err}") from None


def read_instances(path: str | os.PathLike, what: str = "COCO instances file", require_categories: bool = True
                   ) -> CocoInstances:
    """Read and check a COCO instances file; any structural problem is a UserError naming the file and entry."""
    data = read_json(path, what)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{what} {path} has no 'images' list")
    annotations = data.get("annotations", [])
    categories = data.get("categories", [])
    if not isinstance(annotations, list) or not isinstance(categories, list):
        raise UserError(f"{what} {path}: 'annotations' and 'categories' must be lists")
    if require_categories and not categories:
        raise UserError(f"{what} {path} has no categories")
    category_ids = set()
    for index, category in enumerate(categories):
        if not isinstance(category, dict) or not isinstance(category.get("id"), int) or "name" not in category:
            raise UserError(f"{what} {path}: categories[{index}] needs an integer 'id' and a 'name'")
        category_ids.add(category["id"])
    images: dict[Any, ImageRecord] = {}
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise UserError(f"{what} {path}: images[{index}] needs 'id' and 'file_name'")
        images[image["id"]] = ImageRecord(image["id"], image["file_name"], image.get("width"), image.get("height"))
    has_attributes = False
    for index, ann in enumerate(annotations):
        where = f"{what} {path}: annotations[{index}]"
        if not isinstance(ann, dict):
            raise UserError(f"{where} is not an object")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise UserError(f"{where} needs 'bbox': [x, y, w, h]")
        if ann.get("image_id") not in images:
            raise UserError(f"{where} refers to image_id {ann.get('image_id')!r}, which is not in 'images'")
        category_id = ann.get("category_id", 0)
        if category_ids and category_id not in category_ids:
            raise UserError(f"{where} has category_id {category_id!r}, which is not in 'categories'")
        attributes = ann.get("attributes", [])
        if attributes is None:
            attributes = []
        if not isinstance(attributes, list) or not all(isinstance(a, str) for a in attributes):
            raise UserError(f"{where}: 'attributes' must be a list of strings")
        has_attributes = has_attributes or "attributes" in ann
        x, y, w, h = (float(v) for v in bbox)
        images[ann["image_id"]].boxes.append(
            InstanceBox((x, y, x + w, y + h), category_id, tuple(attributes), bool(ann.get("iscrowd", 0)))
        )
    return CocoInstances(str(path), list(images.values()), categories, has_attributes)


def file_id_map(instances: CocoInstances | None) -> dict[str, int | str]:
    """``file_name`` -> image id, keyed by the file name as written and by its base name."""
    mapping: dict[str, int | str] = {}
    if instances is None:
        return mapping
    for image in instances.images:
        mapping.setdefault(Path(image.file_name).name, image.image_id)
        mapping[image.file_name] = image.image_id
    return mapping


# "left"/"right" as a word or a word's head ("leftmost", "right-hand"), never inside a word ("bright", "upright").
_LEFT_RIGHT = re.compile(r"\b(left|right)(?=\b|most|ward|side)", re.IGNORECASE)


def swap_left_right(name: str) -> str:
    """The attribute word a horizontal flip turns ``name`` into ("left" <-> "right", "leftmost" <-> "rightmost")."""

    def swap(match: re.Match) -> str:
        word = match.group(1)
        swapped = {"left": "right", "right": "left"}[word.lower()]
        if word.isupper():
            return swapped.upper()
        return swapped.capitalize() if word[0].isupper() else swapped

    return _LEFT_RIGHT.sub(swap, name)


def flip_permutation(attribute_names: list[str]) -> list[int]:
    """Index map for a horizontal flip: attribute ``i`` becomes ``perm[i]`` (itself unless a left/right twin exists)."""
    index = {name: i for i, name in enumerate(attribute_names)}
    return [index.get(swap_left_right(name), i) for i, name in enumerate(attribute_names)]
