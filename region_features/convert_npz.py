"""Converting between a feature store and a directory of per-image ``.npz`` files (``vl-regions convert``, format
``npz-dir``).

A directory of ``ID.npz`` files, one per image. Import understands the common producers' keys:
features: ``features`` or ``x`` (K, D); boxes: ``boxes`` or ``bbox`` (K, 4) pixels, else ``norm_bb`` (K, >=4)
normalised (UNITER); size: ``image_h``/``image_w`` or ``img_h``/``img_w`` (without one, ``norm_bb`` is kept
normalised with image_h = image_w = 1); classes: ``object_probs`` (K, C) or ``soft_labels`` (K, C + 1,
background first, dropped; rows renormalised when the background column is non-zero), ``objects_id`` /
``object_ids``, ``objects_conf`` / ``object_conf`` / ``conf``; attributes: ``attrs_id`` / ``attr_ids``,
``attrs_conf`` / ``attr_conf``, ``attr_probs`` (K, A); id: ``image_id`` (0-d) or the file name. Missing class or
attribute ids become -1 with confidence 0. Object arrays (pickles, e.g. bottom-up-attention.pytorch's ``info``)
are never loaded.
Export writes ``image_id, image_h, image_w, num_boxes, boxes, norm_bb`` (K, 6: x1, y1, x2, y2, w, h normalised,
UNITER style), ``features`` (float16), ``objects_id, objects_conf, conf, attrs_id, attrs_conf`` and, when stored,
``soft_labels`` (K, C + 1) with a zero background column and ``attr_probs`` (K, A).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from region_features.convert import (
    VG_NUM_CLASSES,
    BadInput,
    ConvertStats,
    LazyWriter,
    add_or_count,
    existing_header,
    import_id,
    resolve_counts,
)
from region_features.images import ProblemLog
from region_features.store import FeatureStore
from region_features.store_format import ImageId, normalize_image_id
from region_features.store_writer import DEFAULT_SHARD_BYTES
from vl.errors import UserError
from vl.progress import progress_bar

BAD_FILE = "bad file"
NO_IMAGE_SIZE = "no image size"


def _first_key(data: Mapping, keys: tuple[str, ...]) -> np.ndarray | None:
    for key in keys:
        if key in data:
            return data[key]
    return None


def _scalar_int(value: np.ndarray, name: str) -> int:
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "iuf":
        raise BadInput(f"{name} must be one number, got shape {array.shape} dtype {array.dtype}")
    return int(array.reshape(()))


def record_from_npz(data: Mapping[str, np.ndarray], num_classes: int) -> tuple[dict, bool]:
    """Map one npz file's arrays to a store record; returns (record, had_image_size). BadInput when unusable."""
    features = _first_key(data, ("features", "x"))
    if features is None:
        raise BadInput("has no 'features' (or 'x') array")
    features = np.asarray(features)
    if features.ndim != 2:
        raise BadInput(f"features has shape {features.shape}, expected (K, D)")
    num_boxes = features.shape[0]
    height = _first_key(data, ("image_h", "img_h"))
    width = _first_key(data, ("image_w", "img_w"))
    has_size = height is not None and width is not None
    image_h = _scalar_int(height, "image_h") if has_size else 1
    image_w = _scalar_int(width, "image_w") if has_size else 1
    boxes = _first_key(data, ("boxes", "bbox"))
    if boxes is not None:
        if not has_size:
            raise BadInput("has pixel boxes but no image_h / image_w")
    else:
        norm_bb = _first_key(data, ("norm_bb",))
        if norm_bb is None:
            raise BadInput("has no 'boxes', 'bbox' or 'norm_bb' array")
        norm_bb = np.asarray(norm_bb, dtype=np.float32)
        if norm_bb.ndim != 2 or norm_bb.shape[1] < 4:
            raise BadInput(f"norm_bb has shape {norm_bb.shape}, expected (K, >=4)")
        boxes = norm_bb[:, :4] * np.array([image_w, image_h, image_w, image_h], dtype=np.float32)
    record: dict[str, Any] = {"image_h": image_h, "image_w": image_w, "boxes": boxes, "features": features}
    probs = _first_key(data, ("object_probs",))
    if probs is None and "soft_labels" in data:
        soft = np.asarray(data["soft_labels"], dtype=np.float32)
        if soft.ndim != 2 or soft.shape[1] != num_classes + 1:
            raise BadInput(f"soft_labels has shape {soft.shape}, expected (K, {num_classes + 1}) with background")
        probs = soft[:, 1:]
        background = soft[:, 0] > 0
        if background.any():  # renormalise the foreground distribution of rows that had background mass
            totals = probs[background].sum(axis=1, keepdims=True)
            probs[background] = np.where(totals > 0, probs[background] / np.maximum(totals, 1e-12), 0.0)
    if probs is not None:
        record["object_probs"] = probs
    object_ids = _first_key(data, ("objects_id", "object_ids"))
    object_conf = _first_key(data, ("objects_conf", "object_conf", "conf"))
    if object_ids is None and probs is not None:
        object_ids = np.asarray(probs).argmax(axis=1) if num_boxes else np.zeros(0, np.int64)
        if object_conf is None:
            object_conf = np.asarray(probs).max(axis=1) if num_boxes else np.zeros(0, np.float32)
    record["object_ids"] = object_ids if object_ids is not None else np.full(num_boxes, -1, dtype=np.int64)
    record["object_conf"] = object_conf if object_conf is not None else np.zeros(num_boxes, dtype=np.float32)
    attr_ids = _first_key(data, ("attrs_id", "attr_ids"))
    attr_conf = _first_key(data, ("attrs_conf", "attr_conf"))
    record["attr_ids"] = attr_ids if attr_ids is not None else np.full(num_boxes, -1, dtype=np.int64)
    record["attr_conf"] = attr_conf if attr_conf is not None else np.zeros(num_boxes, dtype=np.float32)
    if "attr_probs" in data:  # every attribute's probability, as vl-regions extract stores it
        record["attr_probs"] = np.asarray(data["attr_probs"], dtype=np.float32)
    return record, has_size


def _npz_image_id(data: Mapping[str, np.ndarray], stem: str, keep_ids: bool) -> ImageId:
    if "image_id" in data:
        value = np.asarray(data["image_id"])
        if value.ndim == 0 and value.dtype.kind in "iu":
            return normalize_image_id(int(value))
        if value.ndim == 0 and value.dtype.kind == "U":
            return str(value)
        raise BadInput(f"image_id has shape {value.shape} dtype {value.dtype}; expected one int or string")
    return import_id(stem, keep_ids)


def _peek_num_classes(paths: list[Path]) -> int | None:
    """The class count of the first readable file's soft_labels / object_probs, if any."""
    for path in paths[:16]:
        try:
            with np.load(path, allow_pickle=False) as data:
                if "object_probs" in data.files:
                    return int(data["object_probs"].shape[1])
                if "soft_labels" in data.files:
                    return int(data["soft_labels"].shape[1]) - 1
        except Exception:  # noqa: BLE001 - a bad file is reported by the import loop itself
            continue
    return None


def import_npz_dir(
    npz_dir: str | os.PathLike,
    store_root: str | os.PathLike,
    *,
    num_classes: int | None = None,
    num_attributes: int | None = None,
    class_names: list[str] | None = None,
    attribute_names: list[str] | None = None,
    keep_ids: bool = False,
    problems: ProblemLog | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> ConvertStats:
    """Import a directory of per-image ``.npz`` files (sorted by name) into a feature store; bad files are warned."""
    npz_dir = Path(npz_dir)
    problems = problems if problems is not None else ProblemLog()
    if not npz_dir.is_dir():
        raise UserError(
            f"npz directory {npz_dir} does not exist" if not npz_dir.exists() else f"{npz_dir} is not a directory"
        )
    try:
        paths = sorted(
            Path(entry.path) for entry in os.scandir(npz_dir) if entry.name.endswith(".npz") and entry.is_file()
        )
    except OSError as err:
        raise UserError(f"cannot read npz directory {npz_dir}: {err.strerror or err}") from err
    if not paths:
        raise UserError(f"npz directory {npz_dir} has no .npz files")
    if num_classes is None and class_names is None and existing_header(store_root) is None:
        num_classes = _peek_num_classes(paths)
    num_classes, num_attributes, meta = resolve_counts(
        store_root, num_classes, num_attributes, class_names, attribute_names, VG_NUM_CLASSES
    )
    meta["source"] = f"npz-dir:{npz_dir.name}"
    stats = ConvertStats()
    writer = LazyWriter(store_root, num_classes, num_attributes, meta, shard_bytes=shard_bytes)
    seen: set = set()
    try:
        for path in progress_bar(paths, desc="import", unit="file"):
            try:
                with np.load(path, allow_pickle=False) as data:
                    image_id = _npz_image_id(data, path.stem, keep_ids)
                    record, has_size = record_from_npz(data, num_classes)
                if not has_size:
                    problems.warn(NO_IMAGE_SIZE, path, "no image_h/image_w: boxes stored normalised, image size 1x1")
                message = add_or_count(writer, image_id, record, stats, seen)
            except (BadInput, UserError, ValueError, OSError, KeyError, zipfile.BadZipFile, EOFError) as err:
                message = str(err).splitlines()[0] if str(err) else type(err).__name__
            if message is not None:
                stats.bad += 1
                problems.warn(BAD_FILE, path, f"{message}; skipped")
    finally:
        writer.close()
    if stats.converted == 0 and stats.skipped == 0:
        raise UserError(f"npz directory {npz_dir} has no usable .npz files")
    return stats


_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def export_npz_dir(store: FeatureStore | str | os.PathLike, out_dir: str | os.PathLike) -> int:
    """Write one ``ID.npz`` per image (keys in the module docstring); returns the number of files."""
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    count = 0
    for image_id in progress_bar(store.ids(), desc="export", unit="img"):
        record = store[image_id]
        name = _UNSAFE_NAME.sub("_", str(image_id)).lstrip(".") or "image"
        if name in used:
            name = f"{name}-{count}"
        used.add(name)
        width, height = record["image_w"], record["image_h"]
        norm = record["normalized_boxes"]
        arrays: dict[str, np.ndarray] = {
            "image_id": np.array(image_id),
            "image_h": np.array(height, dtype=np.int64),
            "image_w": np.array(width, dtype=np.int64),
            "num_boxes": np.array(record["num_boxes"], dtype=np.int64),
            "boxes": record["boxes"],
            "norm_bb": np.concatenate([norm, norm[:, 2:3] - norm[:, 0:1], norm[:, 3:4] - norm[:, 1:2]], axis=1),
            "features": record["features"],
            "objects_id": record["object_ids"],
            "objects_conf": record["object_conf"],
            "conf": record["object_conf"],
            "attrs_id": record["attr_ids"],
            "attrs_conf": record["attr_conf"],
        }
        if "object_probs" in record:
            probs = record["object_probs"]
            arrays["soft_labels"] = np.concatenate([np.zeros((len(probs), 1), dtype=probs.dtype), probs], axis=1)
        if "attr_probs" in record:
            arrays["attr_probs"] = record["attr_probs"]
        path = out_dir / f"{name}.npz"
        tmp = out_dir / f".{name}.npz.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        count += 1
    return count
