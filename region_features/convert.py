"""What the feature-store converters of ``vl-regions convert`` share: the conversion statistics, the image-id rule
on import, the target store created at the first record, and the class and attribute counts. The formats are in
``region_features.convert_lxmert`` (``lxmert-tsv``) and ``region_features.convert_npz`` (``npz-dir``);
``docs/feature-store.md`` has the details.

Image ids on import follow the CLI rule: the trailing number of the id or file name (``COCO_val2014_000000000042``
-> 42), else the string itself; ``--keep-ids`` keeps them verbatim as strings. Importing into an existing store skips
images it already has, so an interrupted import can be rerun.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from region_features.ids import image_id_from_filename
from region_features.store_format import ImageId, normalize_image_id, read_header
from region_features.store_writer import FeatureStoreWriter
from vl.errors import UserError

FORMATS = ("lxmert-tsv", "npz-dir")
# Visual Genome's bottom-up-attention vocabulary, which LXMERT / UNITER features use.
VG_NUM_CLASSES = 1600
VG_NUM_ATTRIBUTES = 400
DUPLICATE = "duplicate id"


@dataclass
class ConvertStats:
    """What a conversion did: records written, records already in the target store, inputs skipped as bad."""

    converted: int = 0
    skipped: int = 0
    bad: int = 0


class BadInput(Exception):
    """One row or file that cannot be converted; the message says why."""


# -------------------------------------------------------------------------------------------------------- helpers


def import_id(raw: Any, keep_ids: bool) -> ImageId:
    if isinstance(raw, str) and not keep_ids:
        return image_id_from_filename(raw) if raw else raw
    return raw if isinstance(raw, str) else normalize_image_id(raw)


def read_names(path: str | None, what: str) -> list[str] | None:
    if path is None:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserError(f"cannot read {what} file {path}: {err.strerror or err}") from err
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise UserError(f"{what} file {path} is empty")
    return names


def existing_header(store_root: str | os.PathLike) -> dict | None:
    root = Path(store_root)
    return read_header(root) if (root / "store.json").exists() else None


class LazyWriter:
    """Creates the target store at the first record, when the feature dimension is known."""

    def __init__(self, root: str | os.PathLike, num_classes: int, num_attributes: int, meta: dict, **options: Any):
        self.root, self.num_classes, self.num_attributes, self.meta, self.options = (
            root,
            num_classes,
            num_attributes,
            meta,
            options,
        )
        header = existing_header(root)
        self.writer: FeatureStoreWriter | None = None
        if header is not None:  # open now, so that resume can skip what is stored
            self.writer = FeatureStoreWriter(root, header["feature_dim"], num_classes, num_attributes, meta, **options)

    def __contains__(self, image_id: ImageId) -> bool:
        return self.writer is not None and image_id in self.writer

    def add(self, image_id: ImageId, record: dict) -> None:
        if self.writer is None:
            feature_dim = np.asarray(record["features"]).shape[1]
            self.writer = FeatureStoreWriter(
                self.root, feature_dim, self.num_classes, self.num_attributes, self.meta, **self.options
            )
        self.writer.add(image_id, record)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def resolve_counts(
    store_root: str | os.PathLike,
    num_classes: int | None,
    num_attributes: int | None,
    class_names: list[str] | None,
    attribute_names: list[str] | None,
    default_classes: int,
) -> tuple[int, int, dict]:
    header = existing_header(store_root)
    if num_classes is None:
        num_classes = len(class_names) if class_names else header["num_classes"] if header else default_classes
    if num_attributes is None:
        if attribute_names:
            num_attributes = len(attribute_names)
        else:
            num_attributes = header["num_attributes"] if header else VG_NUM_ATTRIBUTES
    meta: dict = {}
    if class_names is not None:
        meta["class_names"] = class_names
    if attribute_names is not None:
        meta["attribute_names"] = attribute_names
    return num_classes, num_attributes, meta


def add_or_count(writer: LazyWriter, image_id: ImageId, record: dict, stats: ConvertStats, seen: set) -> str | None:
    """Add a record; return a problem message for a duplicate, count a record already stored as skipped."""
    if image_id in writer:
        if image_id in seen:
            return f"image id {image_id!r} occurs again; skipped"
        stats.skipped += 1
        return None
    writer.add(image_id, record)
    seen.add(image_id)
    stats.converted += 1
    return None
