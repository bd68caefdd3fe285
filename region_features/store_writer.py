"""Writing a region feature store: record validation and ``FeatureStoreWriter``, which appends records and commits
them atomically (the file format and its commit rule are in ``region_features.store_format``)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from region_features.store_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_FILE,
    INDEX_COLUMNS,
    LOCK_FILE,
    RECORD_ALIGN,
    RECORD_KEYS,
    SECTION_ALIGN,
    SHARD_FORMAT_NAME,
    ImageId,
    alternate_id,
    list_shards,
    normalize_image_id,
    read_header,
    read_shard_index,
    record_layout,
    shard_data_name,
    shard_index_name,
)
from vl.errors import UserError

try:  # advisory lock so that two writers never append to one store; absent on Windows
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

DEFAULT_SHARD_BYTES = 1 << 30
_REQUIRED_KEYS = ("image_h", "image_w", "boxes", "features", "object_ids", "object_conf", "attr_ids", "attr_conf")
# Keys a record read from a store carries; a writer accepts and checks them, so a read record can be re-added.
_DERIVED_KEYS = ("image_id", "num_boxes", "normalized_boxes")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write_json(path: Path, payload: dict, fsync: bool) -> None:
    """Write JSON through ``.NAME.tmp`` and a rename (fsynced when asked), so readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, separators=(",", ":"), ensure_ascii=False)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------------------ validation


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _as_int(value: Any, image_id: ImageId, key: str) -> int:
    array = _as_array(value)
    if array.ndim != 0 or array.dtype.kind not in "iu":
        raise UserError(f"image {image_id!r}: {key} must be an integer, got {value!r}")
    return int(array)


def validate_record(
    image_id: ImageId, record: Mapping[str, Any], feature_dim: int, num_classes: int, num_attributes: int
) -> tuple[dict[str, np.ndarray], int, int]:
    """Check a record's keys, shapes, dtypes and values; return (arrays cast to the stored dtypes, image_h, image_w).

    Errors are UserErrors naming the image id and the key.
    """
    if not isinstance(record, Mapping):
        raise UserError(f"image {image_id!r}: a record must be a dict, got {type(record).__name__}")
    unknown = set(record) - set(RECORD_KEYS) - set(_REQUIRED_KEYS) - set(_DERIVED_KEYS)
    if unknown:
        raise UserError(f"image {image_id!r}: unknown record key {sorted(unknown)[0]!r}")
    missing = [key for key in _REQUIRED_KEYS if key not in record]
    if missing:
        raise UserError(f"image {image_id!r}: record has no {missing[0]!r}")
    if "image_id" in record and normalize_image_id(record["image_id"]) != image_id:
        raise UserError(f"image {image_id!r}: record's image_id is {record['image_id']!r}")
    image_h = _as_int(record["image_h"], image_id, "image_h")
    image_w = _as_int(record["image_w"], image_id, "image_w")
    if image_h < 1 or image_w < 1:
        raise UserError(f"image {image_id!r}: image size {image_w}x{image_h} is not positive")
    boxes = _as_array(record["boxes"])
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise UserError(f"image {image_id!r}: boxes must have shape (K, 4), got {tuple(boxes.shape)}")
    num_boxes = boxes.shape[0]
    expected: dict[str, tuple[tuple[int, ...], str, str]] = {
        "boxes": ((num_boxes, 4), "<f4", "float"),
        "features": ((num_boxes, feature_dim), "<f2", "float"),
        "object_ids": ((num_boxes,), "<i8", "int"),
        "object_conf": ((num_boxes,), "<f4", "float"),
        "object_probs": ((num_boxes, num_classes), "<f2", "float"),
        "attr_ids": ((num_boxes,), "<i8", "int"),
        "attr_conf": ((num_boxes,), "<f4", "float"),
        "attr_probs": ((num_boxes, num_attributes), "<f2", "float"),
    }
    arrays: dict[str, np.ndarray] = {}
    for key, (shape, dtype, kind) in expected.items():
        if key not in record:
            continue
        value = _as_array(record[key])
        allowed_kinds = "iu" if kind == "int" else "fiu"
        if value.dtype.kind not in allowed_kinds:
            raise UserError(f"image {image_id!r}: {key} must hold {kind}s, got dtype {value.dtype}")
        if tuple(value.shape) != shape:
            raise UserError(f"image {image_id!r}: {key} has shape {tuple(value.shape)}, expected {shape}")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported just below
            cast = np.ascontiguousarray(value, dtype=dtype)
        if kind == "float" and not np.isfinite(cast).all():
            raise UserError(f"image {image_id!r}: {key} has non-finite values (after casting to {cast.dtype.name})")
        arrays[key] = cast
    for key, bound in (("object_ids", num_classes), ("attr_ids", num_attributes)):
        ids = arrays[key]
        if len(ids) and (ids.min() < -1 or ids.max() >= bound):
            raise UserError(
                f"image {image_id!r}: {key} must lie in -1..{bound - 1}, got {int(ids.min())}..{int(ids.max())}"
            )
    if "num_boxes" in record and _as_int(record["num_boxes"], image_id, "num_boxes") != num_boxes:
        raise UserError(f"image {image_id!r}: num_boxes is {record['num_boxes']!r} but boxes has {num_boxes} rows")
    return arrays, image_h, image_w


def _check_meta(meta: Mapping, num_classes: int, num_attributes: int, where: str) -> dict:
    meta = dict(meta)
    for key, count in (("class_names", num_classes), ("attribute_names", num_attributes)):
        names = meta.get(key)
        if names is None:
            continue
        if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
            raise UserError(f"{where}: meta {key} must be a list of strings")
        if len(names) != count:
            raise UserError(f"{where}: meta {key} has {len(names)} names, the store has {count}")
        meta[key] = list(names)
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: meta is not JSON-serialisable: {err}") from err
    return meta


# ----------------------------------------------------------------------------------------------------------- writer


class FeatureStoreWriter:
    """Appends records to a feature store at ``root``, creating it or continuing an existing one.

    Use as a context manager. ``add(image_id, record)`` stores one image (record keys: ``image_h``, ``image_w`` ints;
    ``boxes`` (K, 4) pixel x1y1x2y2; ``features`` (K, D); ``object_ids`` (K,); ``object_conf`` (K,); optional
    ``object_probs`` (K, C) without background; ``attr_ids`` (K,); ``attr_conf`` (K,); optional ``attr_probs``
    (K, A) (kept when the store has attributes); K may vary, K = 0 allowed;
    numpy arrays or torch tensors, cast to the stored dtypes). ``image_id in writer`` tells whether an image is
    stored already (resume). Opening an existing store checks that ``feature_dim``, ``num_classes`` and
    ``num_attributes`` match and that class/attribute names agree, merges the other ``meta`` keys, and continues
    its last shard.

    Durability: records are committed on ``flush()``, every ``flush_every`` records or ``flush_seconds`` seconds,
    when a shard reaches ``shard_bytes``, and on ``close()`` / leaving the ``with`` block (also on an exception or
    Ctrl-C). A hard crash loses only records added since the last commit; nothing half-written is ever visible.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        feature_dim: int,
        num_classes: int,
        num_attributes: int,
        meta: dict | None = None,
        *,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        flush_every: int = 256,
        flush_seconds: float = 30.0,
        fsync: bool = True,
    ) -> None:
        for name, value, minimum in (
            ("feature_dim", feature_dim, 1),
            ("num_classes", num_classes, 0),
            ("num_attributes", num_attributes, 0),
            ("shard_bytes", shard_bytes, 1),
            ("flush_every", flush_every, 1),
        ):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
                raise UserError(f"feature store {root}: {name} must be an integer >= {minimum}, got {value!r}")
        self.root = Path(root)
        self.feature_dim, self.num_classes, self.num_attributes = (
            int(feature_dim),
            int(num_classes),
            int(num_attributes),
        )
        self.shard_bytes, self.flush_every, self.flush_seconds, self.fsync = (
            int(shard_bytes),
            flush_every,
            flush_seconds,
            fsync,
        )
        self._lock_fd: int | None = None
        self._data_fd: int | None = None
        self._closed = False
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"feature store {self.root} exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            self._open(meta or {})
        except BaseException:
            self._release_lock()
            raise

    # -- opening
    def _acquire_lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            raise UserError(f"feature store {self.root} is being written by another process") from err
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def _open(self, meta: dict) -> None:
        where = f"feature store {self.root}"
        meta = _check_meta(meta, self.num_classes, self.num_attributes, where)
        header_path = self.root / HEADER_FILE
        if header_path.exists():
            header = read_header(self.root)
            for key in ("feature_dim", "num_classes", "num_attributes"):
                if header[key] != getattr(self, key):
                    raise UserError(f"{where} has {key}={header[key]}, but {getattr(self, key)} was asked for")
            stored_meta = header.get("meta", {})
            for key in ("class_names", "attribute_names"):
                if key in meta and key in stored_meta and meta[key] != stored_meta[key]:
                    raise UserError(f"{where} has different {key} from the ones given")
            merged = {**stored_meta, **meta}
            # a version 1 store continues as version 2: its records are version 2 records without attr_probs
            if merged != stored_meta or header["version"] != FORMAT_VERSION:
                header["meta"] = merged
                header["version"] = FORMAT_VERSION
                _atomic_write_json(header_path, header, self.fsync)
            self.meta = merged
        else:
            leftovers = [entry.name for entry in os.scandir(self.root) if entry.name != LOCK_FILE]
            if leftovers:
                raise UserError(f"{self.root} is not empty and is not a feature store (no {HEADER_FILE})")
            header = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "feature_dim": self.feature_dim,
                "num_classes": self.num_classes,
                "num_attributes": self.num_attributes,
                "record_alignment": RECORD_ALIGN,
                "section_alignment": SECTION_ALIGN,
                "meta": meta,
            }
            _atomic_write_json(header_path, header, self.fsync)
            self.meta = meta
        for entry in os.scandir(self.root):  # temporaries of interrupted index writes
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                Path(entry.path).unlink(missing_ok=True)
        indexed, data_only = list_shards(self.root)
        self._ids: set[ImageId] = set()
        last_index: dict | None = None
        for number in indexed:
            index = read_shard_index(self.root / shard_index_name(number))
            for image_id in index["image_ids"]:
                self._ids.add(normalize_image_id(image_id))
            last_index = index
        for number in data_only:  # data without an index holds nothing committed
            if not indexed or number > indexed[-1]:
                (self.root / shard_data_name(number)).unlink(missing_ok=True)
        self._reset_shard_state()
        if last_index is not None and last_index["data_bytes"] < self.shard_bytes:
            self._shard_number = indexed[-1]
            for column in INDEX_COLUMNS:
                self._entries[column] = list(last_index[column])
            self._committed = len(last_index["image_ids"])
            self._data_bytes = last_index["data_bytes"]
            data_path = self.root / shard_data_name(self._shard_number)
            if not data_path.exists() and self._data_bytes:
                raise UserError(f"{where}: {data_path.name} is missing but its index lists records")
            self._data_fd = os.open(data_path, os.O_RDWR | os.O_CREAT, 0o644)
            if os.fstat(self._data_fd).st_size < self._data_bytes:
                raise UserError(f"{where}: {data_path.name} is shorter than its index says")
            os.ftruncate(self._data_fd, self._data_bytes)  # drop an uncommitted tail
        else:
            self._shard_number = indexed[-1] + 1 if indexed else 0
        self._last_flush = time.monotonic()

    def _reset_shard_state(self) -> None:
        self._entries: dict[str, list] = {column: [] for column in INDEX_COLUMNS}
        self._committed = 0
        self._data_bytes = 0

    # -- writing
    def __contains__(self, image_id: object) -> bool:
        try:
            image_id = normalize_image_id(image_id)
        except UserError:
            return False
        if image_id in self._ids:
            return True
        alternate = alternate_id(image_id)
        return alternate is not None and alternate in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, image_id: ImageId, record: Mapping[str, Any]) -> None:
        """Store one image's record (validated; UserError naming the image id and key on bad input)."""
        if self._closed:
            raise ValueError(f"feature store writer for {self.root} is closed")
        image_id = normalize_image_id(image_id)
        if image_id in self:
            raise UserError(f"image id {image_id!r} is already in feature store {self.root}")
        arrays, image_h, image_w = validate_record(
            image_id, record, self.feature_dim, self.num_classes, self.num_attributes
        )
        num_boxes = arrays["boxes"].shape[0]
        has_probs = "object_probs" in arrays
        has_attr_probs = "attr_probs" in arrays and self.num_attributes > 0
        layout = record_layout(num_boxes, self.feature_dim, self.num_classes, has_probs, self.num_attributes,
                               has_attr_probs)
        blob = bytearray(layout.record_bytes)
        for section in layout.sections:
            blob[section.start : section.start + section.nbytes] = arrays[section.key].tobytes()
        if self._data_fd is None:
            path = self.root / shard_data_name(self._shard_number)
            self._data_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        offset = self._data_bytes
        view = memoryview(blob)
        written = 0
        while written < len(view):  # a partial write past the committed end is invisible and overwritten later
            written += os.pwrite(self._data_fd, view[written:], offset + written)
        for column, value in zip(INDEX_COLUMNS, (image_id, offset, num_boxes, image_h, image_w, int(has_probs),
                                                  int(has_attr_probs))):
            self._entries[column].append(value)
        self._data_bytes = offset + layout.record_bytes
        self._ids.add(image_id)
        if self._data_bytes >= self.shard_bytes:
            self._finish_shard()
        elif (
            len(self._entries["image_ids"]) - self._committed >= self.flush_every
            or time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        """Commit every record added so far: fsync the data, then atomically replace the shard's index."""
        self._last_flush = time.monotonic()
        if self._data_fd is None or len(self._entries["image_ids"]) == self._committed:
            return
        if self.fsync:
            os.fsync(self._data_fd)
        index = {
            "format": SHARD_FORMAT_NAME,
            "version": FORMAT_VERSION,
            "data_file": shard_data_name(self._shard_number),
            "data_bytes": self._data_bytes,
            **self._entries,
        }
        _atomic_write_json(self.root / shard_index_name(self._shard_number), index, self.fsync)
        self._committed = len(self._entries["image_ids"])

    def _finish_shard(self) -> None:
        self.flush()
        if self._data_fd is not None:
            os.ftruncate(self._data_fd, self._data_bytes)
            os.close(self._data_fd)
            self._data_fd = None
        self._shard_number += 1
        self._reset_shard_state()

    def close(self) -> None:
        """Commit what was added and release the store. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
            if self._data_fd is not None:
                os.ftruncate(self._data_fd, self._data_bytes)
        finally:
            if self._data_fd is not None:
                os.close(self._data_fd)
                self._data_fd = None
            self._closed = True
            self._release_lock()

    def __enter__(self) -> FeatureStoreWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()  # also on an exception: every completed add is kept

    def __del__(self) -> None:  # pragma: no cover - best effort when a writer is dropped unclosed
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass
