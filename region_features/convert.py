"""Converting feature stores from and to the formats users already have: ``vl-regions convert``.

Formats (``docs/feature-store.md`` has the details):

``lxmert-tsv``
    LXMERT / bottom-up-attention TSV: no header, tab-separated, one image per line, fields in the order
    ``img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features``; the array
    fields are base64 of raw little-endian buffers: objects_id int64 (K,), objects_conf float32 (K,), attrs_id int64
    (K,), attrs_conf float32 (K,), boxes float32 (K, 4) pixel x1y1x2y2, features float32 (K, D). Read and written as
    a stream (one line in memory). Lines that do not parse are warned about with their line number, counted and
    skipped. Export writes the features as float32, as LXMERT's loader expects. The format holds one attribute per
    box (``attrs_id``, the most probable), so a store's attribute distributions (``attr_probs``) are not exported.

``npz-dir``
    A directory of ``ID.npz`` files, one per image. Import understands the common producers' keys:
    features: ``features`` or ``x`` (K, D); boxes: ``boxes`` or ``bbox`` (K, 4) pixels, else ``norm_bb`` (K, >=4)
    normalised (UNITER); size: ``image_h``/``image_w`` or ``img_h``/``img_w`` (without one, ``norm_bb`` is kept
    normalised with image_h = image_w = 1); classes: ``object_probs`` (K, C) or ``soft_labels`` (K, C + 1,
    background first, dropped; rows renormalised when the background column is non-zero), ``objects_id`` /
    ``object_ids``, ``objects_conf`` / ``object_conf`` / ``conf``; attributes: ``attrs_id`` / ``attr_ids``,
    ``attrs_conf`` / ``attr_conf``, ``attr_probs`` (K, A); id: ``image_id`` (0-d) or the file name. Missing class or
    attribute ids become
    -1 with confidence 0. Object arrays (pickles, e.g. bottom-up-attention.pytorch's ``info``) are never loaded.
    Export writes ``image_id, image_h, image_w, num_boxes, boxes, norm_bb`` (K, 6: x1, y1, x2, y2, w, h normalised,
    UNITER style), ``features`` (float16), ``objects_id, objects_conf, conf, attrs_id, attrs_conf`` and, when stored,
    ``soft_labels`` (K, C + 1) with a zero background column and ``attr_probs`` (K, A).

Image ids on import follow the CLI rule: the trailing number of the id or file name (``COCO_val2014_000000000042``
-> 42), else the string itself; ``--keep-ids`` keeps them verbatim as strings. Importing into an existing store skips
images it already has, so an interrupted import can be rerun.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import os
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from vl.progress import progress_bar

from region_features.images import ProblemLog
from region_features.store import (
    DEFAULT_SHARD_BYTES,
    FeatureStore,
    FeatureStoreWriter,
    ImageId,
    normalize_image_id,
    read_header,
)
from region_features.ids import image_id_from_filename
from vl.errors import UserError

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
FORMATS = ("lxmert-tsv", "npz-dir")
# Visual Genome's bottom-up-attention vocabulary, which LXMERT / UNITER features use.
VG_NUM_CLASSES = 1600
VG_NUM_ATTRIBUTES = 400
BAD_ROW = "bad row"
BAD_FILE = "bad file"
DUPLICATE = "duplicate id"
NO_IMAGE_SIZE = "no image size"


@dataclass
class ConvertStats:
    """What a conversion did: records written, records already in the target store, inputs skipped as bad."""

    converted: int = 0
    skipped: int = 0
    bad: int = 0


class _BadInput(Exception):
    """One row or file that cannot be converted; the message says why."""


# -------------------------------------------------------------------------------------------------------- helpers


def _import_id(raw: Any, keep_ids: bool) -> ImageId:
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


def _existing_header(store_root: str | os.PathLike) -> dict | None:
    root = Path(store_root)
    return read_header(root) if (root / "store.json").exists() else None


class _LazyWriter:
    """Creates the target store at the first record, when the feature dimension is known."""

    def __init__(self, root: str | os.PathLike, num_classes: int, num_attributes: int, meta: dict, **options: Any):
        self.root, self.num_classes, self.num_attributes, self.meta, self.options = (
            root,
            num_classes,
            num_attributes,
            meta,
            options,
        )
        header = _existing_header(root)
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


def _resolve_counts(
    store_root: str | os.PathLike,
    num_classes: int | None,
    num_attributes: int | None,
    class_names: list[str] | None,
    attribute_names: list[str] | None,
    default_classes: int,
) -> tuple[int, int, dict]:
    header = _existing_header(store_root)
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


def _add_or_count(writer: _LazyWriter, image_id: ImageId, record: dict, stats: ConvertStats, seen: set) -> str | None:
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


# ---------------------------------------------------------------------------------------------------- LXMERT TSV


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
        raise _BadInput(f"{name} is not valid base64 ({err})") from err
    itemsize = np.dtype(dtype).itemsize
    if len(raw) % itemsize:
        raise _BadInput(f"{name} holds {len(raw)} bytes, not a whole number of {np.dtype(dtype).name}")
    return np.frombuffer(raw, dtype=dtype)


def _parse_int(field: str, name: str) -> int:
    try:
        return int(field.strip())
    except ValueError as err:
        raise _BadInput(f"{name} {field[:40]!r} is not an integer") from err


def parse_lxmert_row(fields: list[str]) -> tuple[str, dict]:
    """Decode one LXMERT TSV row into (img_id, record); _BadInput with the reason when it does not parse."""
    if len(fields) != len(LXMERT_FIELDNAMES):
        raise _BadInput(f"has {len(fields)} fields, expected {len(LXMERT_FIELDNAMES)} ({', '.join(LXMERT_FIELDNAMES)})")
    values = dict(zip(LXMERT_FIELDNAMES, fields))
    num_boxes = _parse_int(values["num_boxes"], "num_boxes")
    if num_boxes < 0:
        raise _BadInput(f"num_boxes is {num_boxes}")
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
            raise _BadInput(f"{name} holds {array.size} values, num_boxes is {num_boxes}")
        record[key] = array
    boxes = _b64_array(values["boxes"], "<f4", "boxes")
    if boxes.size != num_boxes * 4:
        raise _BadInput(f"boxes holds {boxes.size} values, expected num_boxes * 4 = {num_boxes * 4}")
    record["boxes"] = boxes.reshape(num_boxes, 4)
    features = _b64_array(values["features"], "<f4", "features")
    if num_boxes == 0:
        if features.size:
            raise _BadInput(f"features holds {features.size} values for 0 boxes")
        record["features"] = features.reshape(0, 0)
    else:
        if features.size == 0 or features.size % num_boxes:
            raise _BadInput(f"features holds {features.size} values, not a multiple of num_boxes {num_boxes}")
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
    num_classes, num_attributes, meta = _resolve_counts(
        store_root, num_classes, num_attributes, class_names, attribute_names, VG_NUM_CLASSES
    )
    meta["source"] = f"lxmert-tsv:{tsv_path.name}"
    stats = ConvertStats()
    writer = _LazyWriter(store_root, num_classes, num_attributes, meta, shard_bytes=shard_bytes)
    waiting_for_dim: list[tuple[int, ImageId, dict]] = []  # zero-box records seen before the feature dim is known
    seen: set = set()

    def add(line_number: int, image_id: ImageId, record: dict) -> None:
        try:
            duplicate = _add_or_count(writer, image_id, record, stats, seen)
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
                    image_id = _import_id(img_id, keep_ids)
                except (_BadInput, UnicodeDecodeError, csv.Error, UserError) as err:
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


# --------------------------------------------------------------------------------------------------------- npz dir


def _first_key(data: Mapping, keys: tuple[str, ...]) -> np.ndarray | None:
    for key in keys:
        if key in data:
            return data[key]
    return None


def _scalar_int(value: np.ndarray, name: str) -> int:
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "iuf":
        raise _BadInput(f"{name} must be one number, got shape {array.shape} dtype {array.dtype}")
    return int(array.reshape(()))


def record_from_npz(data: Mapping[str, np.ndarray], num_classes: int) -> tuple[dict, bool]:
    """Map one npz file's arrays to a store record; returns (record, had_image_size). _BadInput when unusable."""
    features = _first_key(data, ("features", "x"))
    if features is None:
        raise _BadInput("has no 'features' (or 'x') array")
    features = np.asarray(features)
    if features.ndim != 2:
        raise _BadInput(f"features has shape {features.shape}, expected (K, D)")
    num_boxes = features.shape[0]
    height = _first_key(data, ("image_h", "img_h"))
    width = _first_key(data, ("image_w", "img_w"))
    has_size = height is not None and width is not None
    image_h = _scalar_int(height, "image_h") if has_size else 1
    image_w = _scalar_int(width, "image_w") if has_size else 1
    boxes = _first_key(data, ("boxes", "bbox"))
    if boxes is not None:
        if not has_size:
            raise _BadInput("has pixel boxes but no image_h / image_w")
    else:
        norm_bb = _first_key(data, ("norm_bb",))
        if norm_bb is None:
            raise _BadInput("has no 'boxes', 'bbox' or 'norm_bb' array")
        norm_bb = np.asarray(norm_bb, dtype=np.float32)
        if norm_bb.ndim != 2 or norm_bb.shape[1] < 4:
            raise _BadInput(f"norm_bb has shape {norm_bb.shape}, expected (K, >=4)")
        boxes = norm_bb[:, :4] * np.array([image_w, image_h, image_w, image_h], dtype=np.float32)
    record: dict[str, Any] = {"image_h": image_h, "image_w": image_w, "boxes": boxes, "features": features}
    probs = _first_key(data, ("object_probs",))
    if probs is None and "soft_labels" in data:
        soft = np.asarray(data["soft_labels"], dtype=np.float32)
        if soft.ndim != 2 or soft.shape[1] != num_classes + 1:
            raise _BadInput(f"soft_labels has shape {soft.shape}, expected (K, {num_classes + 1}) with background")
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
        raise _BadInput(f"image_id has shape {value.shape} dtype {value.dtype}; expected one int or string")
    return _import_id(stem, keep_ids)


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
    if num_classes is None and class_names is None and _existing_header(store_root) is None:
        num_classes = _peek_num_classes(paths)
    num_classes, num_attributes, meta = _resolve_counts(
        store_root, num_classes, num_attributes, class_names, attribute_names, VG_NUM_CLASSES
    )
    meta["source"] = f"npz-dir:{npz_dir.name}"
    stats = ConvertStats()
    writer = _LazyWriter(store_root, num_classes, num_attributes, meta, shard_bytes=shard_bytes)
    seen: set = set()
    try:
        for path in progress_bar(paths, desc="import", unit="file"):
            try:
                with np.load(path, allow_pickle=False) as data:
                    image_id = _npz_image_id(data, path.stem, keep_ids)
                    record, has_size = record_from_npz(data, num_classes)
                if not has_size:
                    problems.warn(NO_IMAGE_SIZE, path, "no image_h/image_w: boxes stored normalised, image size 1x1")
                message = _add_or_count(writer, image_id, record, stats, seen)
            except (_BadInput, UserError, ValueError, OSError, KeyError, zipfile.BadZipFile, EOFError) as err:
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
