"""Converting between a feature store and LXMERT's TSV (``vl-regions convert``, format ``lxmert-tsv``).

LXMERT / bottom-up-attention TSV: no header, tab-separated, one image per line, fields in the order
``img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features``; the array
fields are base64 of raw little-endian buffers: objects_id int64 (K,), objects_conf float32 (K,), attrs_id int64
(K,), attrs_conf float32 (K,), boxes float32 (K, 4) pixel x1y1x2y2, features float32 (K, D). Read and written as
a stream (one line in memory). Lines that do not parse are warned about with their line number, counted and
skipped. Export writes the features as float32, as LXMERT's loader expects. The format holds one attribute per
box (``attrs_id``, the most probable), so a store's attribute distributions (``attr_probs``) are not exported.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from region_features.convert import (
    VG_NUM_CLASSES,
    BadInput,
    ConvertStats,
    LazyWriter,
    add_or_count,
    import_id,
    resolve_counts,
)
from region_features.images import ProblemLog
from region_features.store import FeatureStore
from region_features.store_format import ImageId
from region_features.store_writer import DEFAULT_SHARD_BYTES
from vl.errors import UserError
from vl.progress import progress_bar

LXMERT_FIELDNAMES = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)
BAD_ROW = "bad row"


@contextlib.contextmanager
def _raised_csv_field_limit() -> Iterator[None]:
    """LXMERT's feature fields are far above csv's default 128 KiB field limit; raise it for the duration."""
    previous = csv.field_size_limit()
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            break
        except OverflowError:  # pragma: no cover - 32-bit C long
            limit //= 2
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _split_tsv_line(text: str) -> list[str]:
    if '"' not in text:
        return text.split("\t")
    return next(csv.reader([text], delimiter="\t"))


def _b64_array(field: str, dtype: str, name: str) -> np.ndarray:
    text = field.strip()
    if len(text) >= 3 and text[0] == "b" and text[1] in "'\"" and text[-1] == text[1]:  # a Python-3 str(bytes)
        text = text[2:-1]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadInput(f"{name} is not valid base64 ({err})") from err
    itemsize = np.dtype(dtype).itemsize
    if len(raw) % itemsize:
        raise BadInput(f"{name} holds {len(raw)} bytes, not a whole number of {np.dtype(dtype).name}")
    return np.frombuffer(raw, dtype=dtype)


def _parse_int(field: str, name: str) -> int:
    try:
        return int(field.strip())
    except ValueError as err:
        raise BadInput(f"{name} {field[:40]!r} is not an integer") from err


def parse_lxmert_row(fields: list[str]) -> tuple[str, dict]:
    """Decode one LXMERT TSV row into (img_id, record); BadInput with the reason when it does not parse."""
    if len(fields) != len(LXMERT_FIELDNAMES):
        raise BadInput(f"has {len(fields)} fields, expected {len(LXMERT_FIELDNAMES)} ({', '.join(LXMERT_FIELDNAMES)})")
    values = dict(zip(LXMERT_FIELDNAMES, fields))
    num_boxes = _parse_int(values["num_boxes"], "num_boxes")
    if num_boxes < 0:
        raise BadInput(f"num_boxes is {num_boxes}")
    record: dict[str, Any] = {
        "image_h": _parse_int(values["img_h"], "img_h"),
        "image_w": _parse_int(values["img_w"], "img_w"),
    }
    for name, key, dtype in (
        ("objects_id", "object_ids", "<i8"),
        ("objects_conf", "object_conf", "<f4"),
        ("attrs_id", "attr_ids", "<i8"),
        ("attrs_conf", "attr_conf", "<f4"),
    ):
        array = _b64_array(values[name], dtype, name)
        if array.size != num_boxes:
            raise BadInput(f"{name} holds {array.size} values, num_boxes is {num_boxes}")
        record[key] = array
    boxes = _b64_array(values["boxes"], "<f4", "boxes")
    if boxes.size != num_boxes * 4:
        raise BadInput(f"boxes holds {boxes.size} values, expected num_boxes * 4 = {num_boxes * 4}")
    record["boxes"] = boxes.reshape(num_boxes, 4)
    features = _b64_array(values["features"], "<f4", "features")
    if num_boxes == 0:
        if features.size:
            raise BadInput(f"features holds {features.size} values for 0 boxes")
        record["features"] = features.reshape(0, 0)
    else:
        if features.size == 0 or features.size % num_boxes:
            raise BadInput(f"features holds {features.size} values, not a multiple of num_boxes {num_boxes}")
        record["features"] = features.reshape(num_boxes, -1)
    return values["img_id"], record


def import_lxmert_tsv(
    tsv_path: str | os.PathLike,
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
    """Stream an LXMERT TSV file into a feature store (created or continued). Bad lines are warned and skipped.

    ``num_classes`` / ``num_attributes`` default to the class/attribute name lists, then the existing store, then
    Visual Genome's 1600 / 400. Records with zero boxes take the feature dimension of the other records.
    """
    tsv_path = Path(tsv_path)
    problems = problems if problems is not None else ProblemLog()
    if not tsv_path.is_file():
        raise UserError(
            f"LXMERT TSV file {tsv_path} does not exist" if not tsv_path.exists() else f"{tsv_path} is not a file"
        )
    num_classes, num_attributes, meta = resolve_counts(
        store_root, num_classes, num_attributes, class_names, attribute_names, VG_NUM_CLASSES
    )
    meta["source"] = f"lxmert-tsv:{tsv_path.name}"
    stats = ConvertStats()
    writer = LazyWriter(store_root, num_classes, num_attributes, meta, shard_bytes=shard_bytes)
    waiting_for_dim: list[tuple[int, ImageId, dict]] = []  # zero-box records seen before the feature dim is known
    seen: set = set()

    def add(line_number: int, image_id: ImageId, record: dict) -> None:
        try:
            duplicate = add_or_count(writer, image_id, record, stats, seen)
        except UserError as err:
            duplicate = str(err)
        if duplicate is not None:
            stats.bad += 1
            problems.warn(BAD_ROW, tsv_path, f"line {line_number}: {duplicate}")

    try:
        with open(tsv_path, "rb") as handle, _raised_csv_field_limit():
            progress = progress_bar(total=os.fstat(handle.fileno()).st_size, unit="B", unit_scale=True, desc="import")
            for line_number, line in enumerate(handle, start=1):
                progress.update(len(line))
                text = line.rstrip(b"\r\n")
                if not text.strip():
                    continue
                try:
                    img_id, record = parse_lxmert_row(_split_tsv_line(text.decode("utf-8")))
                    if line_number == 1 and img_id == "img_id":  # a header line some tools write
                        continue
                    image_id = import_id(img_id, keep_ids)
                except (BadInput, UnicodeDecodeError, csv.Error, UserError) as err:
                    stats.bad += 1
                    problems.warn(BAD_ROW, tsv_path, f"line {line_number}: {err}; skipped")
                    continue
                if record["features"].shape[0] == 0:
                    dim = writer.writer.feature_dim if writer.writer is not None else None
                    if dim is None:
                        waiting_for_dim.append((line_number, image_id, record))
                        continue
                    record["features"] = np.zeros((0, dim), dtype=np.float32)
                add(line_number, image_id, record)
                if waiting_for_dim and writer.writer is not None:
                    for waiting_line, waiting_id, waiting in waiting_for_dim:
                        waiting["features"] = np.zeros((0, writer.writer.feature_dim), dtype=np.float32)
                        add(waiting_line, waiting_id, waiting)
                    waiting_for_dim.clear()
            progress.close()
        if waiting_for_dim:  # only zero-box records: nothing says the feature dimension
            for waiting_line, _, _ in waiting_for_dim:
                stats.bad += 1
                problems.warn(BAD_ROW, tsv_path, f"line {waiting_line}: no boxes, and no row gives the feature size")
    finally:
        writer.close()
    if stats.converted == 0 and stats.skipped == 0:
        raise UserError(f"LXMERT TSV file {tsv_path} has no valid rows")
    return stats


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def export_lxmert_tsv(store: FeatureStore | str | os.PathLike, tsv_path: str | os.PathLike) -> int:
    """Write every record of a store as one LXMERT TSV line (float32 features); returns the number of lines."""
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    tsv_path = Path(tsv_path)
    if tsv_path.is_dir():
        raise UserError(f"output {tsv_path} is a directory; lxmert-tsv writes one file")
    tsv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tsv_path.with_name(f".{tsv_path.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            for image_id in progress_bar(store.ids(), desc="export", unit="img"):
                record = store[image_id]
                writer.writerow(
                    [
                        str(record["image_id"]),
                        record["image_h"],
                        record["image_w"],
                        _b64(record["object_ids"], "<i8"),
                        _b64(record["object_conf"], "<f4"),
                        _b64(record["attr_ids"], "<i8"),
                        _b64(record["attr_conf"], "<f4"),
                        record["num_boxes"],
                        _b64(record["boxes"], "<f4"),
                        _b64(record["features"], "<f4"),
                    ]
                )
                count += 1
        os.replace(tmp, tsv_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count
