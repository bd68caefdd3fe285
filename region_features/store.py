"""A sharded, memory-mapped on-disk store of per-image region features.

Format (version 2; a version 1 store reads as one without attribute distributions); the full specification with
examples is in ``docs/feature-store.md``::

    STORE/store.json               header: {"format": "vl-region-store", "version": 2, "feature_dim": D,
                                   "num_classes": C, "num_attributes": A, "record_alignment": 64,
                                   "section_alignment": 16, "meta": {"class_names": [...], ...}}
    STORE/shard-00000.bin          raw records, one after another, each starting at a multiple of 64 bytes
    STORE/shard-00000.idx.json     the shard's index: {"format": "vl-region-store-shard", "version": 2,
                                   "data_file": "shard-00000.bin", "data_bytes": N, "image_ids": [...],
                                   "offsets": [...], "num_boxes": [...], "image_h": [...], "image_w": [...],
                                   "has_object_probs": [0/1, ...], "has_attr_probs": [0/1, ...]}
    STORE/.lock                    held (flock) by the one writer

A record of K boxes is these little-endian arrays in this order, each section starting at a multiple of 16 bytes
from the record start (zero padding in between):

    boxes        (K, 4) float32   pixel x1, y1, x2, y2 in the original image
    features     (K, D) float16   pooled RoI features
    object_ids   (K,)   int64     argmax object class (0..C-1; -1 = unknown)
    object_conf  (K,)   float32   its probability
    object_probs (K, C) float16   class distribution without background; only where has_object_probs is 1
    attr_ids     (K,)   int64     argmax attribute (0..A-1; -1 = none)
    attr_conf    (K,)   float32   its probability
    attr_probs   (K, A) float16   every attribute's probability (multi-label); only where has_attr_probs is 1

Only what an index lists exists: bytes of a data file past the index's ``data_bytes`` are ignored (an interrupted
write), and a data file without an index holds nothing. The writer appends records to the data file and commits
them by rewriting the shard's index atomically (fsync the data, write a temporary index, rename it over the old one),
on ``flush()``, every ``flush_every`` records, when a shard reaches ``shard_bytes`` and on ``close()`` (also when the
``with`` block ends in an exception or Ctrl-C). A crash therefore keeps every committed record, and never exposes a
partly written one. Image ids are JSON ints or strings and keep their type.

The reader (``FeatureStore``) loads all shard indexes at open into numpy arrays and a bucketed hash table over the ids
(no per-id Python objects, so forked DataLoader workers do not copy it page by page), memory-maps each shard lazily,
and copies a record out with one slice. After each read it tells the kernel to drop the record's pages from the
process (``madvise(MADV_DONTNEED)``: the file stays in the page cache, but not in this process's resident set), so
resident memory does not grow with the number of images read. After a ``fork`` the maps are reopened.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vl.errors import UserError

try:  # advisory lock so that two writers never append to one store; absent on Windows
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

ImageId = int | str

FORMAT_NAME = "vl-region-store"
SHARD_FORMAT_NAME = "vl-region-store-shard"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 has no attr_probs section and no has_attr_probs column
HEADER_FILE = "store.json"
LOCK_FILE = ".lock"
RECORD_ALIGN = 64
SECTION_ALIGN = 16
DEFAULT_SHARD_BYTES = 1 << 30
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.(bin|idx\.json)$")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_MASK64 = (1 << 64) - 1
# Pages the kernel may map around a faulting page (fault_around_bytes); released together with the record.
_FAULT_AROUND = 64 * 1024

RECORD_KEYS = ("boxes", "features", "object_ids", "object_conf", "object_probs", "attr_ids", "attr_conf", "attr_probs")
_REQUIRED_KEYS = ("image_h", "image_w", "boxes", "features", "object_ids", "object_conf", "attr_ids", "attr_conf")
# Keys a record read from a store carries; a writer accepts and checks them, so a read record can be re-added.
_DERIVED_KEYS = ("image_id", "num_boxes", "normalized_boxes")


def shard_data_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


def shard_index_name(number: int) -> str:
    return f"shard-{number:05d}.idx.json"


# ----------------------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Section:
    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # byte offset from the record start
    nbytes: int


@dataclass(frozen=True)
class _Layout:
    sections: tuple[_Section, ...]
    data_bytes: int  # bytes holding data (the last section's end)
    record_bytes: int  # data_bytes rounded up to RECORD_ALIGN: the step to the next record


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def record_layout(num_boxes: int, feature_dim: int, num_classes: int, has_object_probs: bool,
                  num_attributes: int = 0, has_attr_probs: bool = False) -> _Layout:
    """Byte layout of one record of ``num_boxes`` boxes (see the module docstring)."""
    k = num_boxes
    specs: list[tuple[str, str, tuple[int, ...]]] = [
        ("boxes", "<f4", (k, 4)),
        ("features", "<f2", (k, feature_dim)),
        ("object_ids", "<i8", (k,)),
        ("object_conf", "<f4", (k,)),
    ]
    if has_object_probs:
        specs.append(("object_probs", "<f2", (k, num_classes)))
    specs += [("attr_ids", "<i8", (k,)), ("attr_conf", "<f4", (k,))]
    if has_attr_probs:
        specs.append(("attr_probs", "<f2", (k, num_attributes)))
    sections, cursor, end = [], 0, 0
    for key, dtype_str, shape in specs:
        dtype = np.dtype(dtype_str)
        nbytes = int(math.prod(shape)) * dtype.itemsize
        cursor = _align(cursor, SECTION_ALIGN)
        sections.append(_Section(key, dtype, shape, cursor, nbytes))
        cursor += nbytes
        end = cursor
    return _Layout(tuple(sections), end, _align(end, RECORD_ALIGN))


# ------------------------------------------------------------------------------------------------------- image ids


def normalize_image_id(image_id: Any) -> ImageId:
    """An image id as stored: a Python int (numpy ints accepted) in int64 range, or a non-empty str."""
    if isinstance(image_id, (bool, np.bool_)):
        raise UserError(f"image id {image_id!r} is a bool; image ids are ints or strings")
    if isinstance(image_id, (int, np.integer)):
        value = int(image_id)
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise UserError(f"image id {value} does not fit in 64 bits")
        return value
    if isinstance(image_id, str):
        if not image_id:
            raise UserError("image id is an empty string")
        return image_id
    raise UserError(f"image id {image_id!r} is a {type(image_id).__name__}; image ids are ints or strings")


def _alternate_id(image_id: ImageId) -> ImageId | None:
    """The other spelling of an id: ``42`` for ``"42"`` and ``"42"`` for ``42`` (used as a lookup fallback)."""
    if isinstance(image_id, int):
        return str(image_id)
    if image_id.isascii() and image_id.isdigit():
        value = int(image_id)
        return value if value <= _INT64_MAX else None
    return None


def _mix64(value: int) -> int:
    """splitmix64 finaliser on a Python int (two's complement of an int64)."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix64_array(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on an int64 array; equals ``_mix64`` element-wise."""
    z = values.astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _str_hash(value: str) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class _IdIndex:
    """Image id -> row, O(1): a bucketed hash table held in numpy arrays (no Python object per id).

    Buckets are a CSR layout over rows sorted by ``hash & mask``; a lookup scans one bucket (about one entry) and
    compares the stored id (int64 value, or UTF-8 bytes for string ids).
    """

    def __init__(self, ids: list, source: str) -> None:
        count = len(ids)
        is_str = np.fromiter((isinstance(image_id, str) for image_id in ids), dtype=bool, count=count)
        for image_id in ids:
            if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
                raise UserError(f"{source}: image id {image_id!r} is neither an int nor a string")
        self.kinds = is_str.astype(np.int8)  # 0: int id, 1: str id
        self.ints = np.zeros(count, dtype=np.int64)
        hashes = np.zeros(count, dtype=np.uint64)
        int_rows = np.flatnonzero(~is_str)
        if len(int_rows):
            try:
                self.ints[int_rows] = np.array([ids[row] for row in int_rows], dtype=np.int64)
            except OverflowError as err:
                raise UserError(f"{source}: an image id does not fit in 64 bits") from err
            hashes[int_rows] = _mix64_array(self.ints[int_rows])
            ordered = np.sort(self.ints[int_rows])
            duplicate = np.flatnonzero(ordered[1:] == ordered[:-1])
            if len(duplicate):
                raise UserError(f"{source}: image id {int(ordered[duplicate[0]])} is stored twice")
        self.str_offsets: np.ndarray | None = None
        self.str_bytes: np.ndarray | None = None
        str_rows = np.flatnonzero(is_str)
        if len(str_rows):
            if len({ids[row] for row in str_rows}) != len(str_rows):
                seen: set[str] = set()
                for row in str_rows:
                    if ids[row] in seen:
                        raise UserError(f"{source}: image id {ids[row]!r} is stored twice")
                    seen.add(ids[row])
            encoded = [ids[row].encode("utf-8", "surrogatepass") if is_str[row] else b"" for row in range(count)]
            lengths = np.fromiter((len(item) for item in encoded), dtype=np.int64, count=count)
            self.str_offsets = np.zeros(count + 1, dtype=np.int64)
            np.cumsum(lengths, out=self.str_offsets[1:])
            self.str_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
            for row in str_rows:
                hashes[row] = _str_hash(ids[row])
        num_buckets = 1 << max(0, (count - 1).bit_length())
        self.mask = num_buckets - 1
        buckets = (hashes & np.uint64(self.mask)).astype(np.int64)
        small = count < (1 << 31) - 1
        self.rows = np.argsort(buckets, kind="stable").astype(np.int32 if small else np.int64)
        self.starts = np.zeros(num_buckets + 1, dtype=np.int32 if small else np.int64)
        np.cumsum(np.bincount(buckets, minlength=num_buckets), out=self.starts[1:])

    def __len__(self) -> int:
        return len(self.kinds)

    def _str_at(self, row: int) -> str:
        assert self.str_offsets is not None and self.str_bytes is not None
        start, end = int(self.str_offsets[row]), int(self.str_offsets[row + 1])
        return self.str_bytes[start:end].tobytes().decode("utf-8", "surrogatepass")

    def id_at(self, row: int) -> ImageId:
        return self._str_at(row) if self.kinds[row] else int(self.ints[row])

    def find(self, image_id: ImageId) -> int:
        """The row of ``image_id`` (exact type and value), or -1."""
        if isinstance(image_id, str):
            kind, key_hash = 1, _str_hash(image_id)
        else:
            kind, key_hash = 0, _mix64(image_id & _MASK64)
        bucket = key_hash & self.mask
        for position in range(int(self.starts[bucket]), int(self.starts[bucket + 1])):
            row = int(self.rows[position])
            if self.kinds[row] != kind:
                continue
            if kind == 0 and int(self.ints[row]) == image_id:
                return row
            if kind == 1 and self._str_at(row) == image_id:
                return row
        return -1

    def all_ids(self) -> list[ImageId]:
        if self.str_offsets is None:
            return self.ints.tolist()
        return [self.id_at(row) for row in range(len(self.kinds))]


# ------------------------------------------------------------------------------------------------ header and index


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


def read_header(root: str | os.PathLike) -> dict:
    """The parsed ``store.json`` of a feature store; UserError naming the store when it is not one."""
    root = Path(root)
    path = root / HEADER_FILE
    if not root.exists():
        raise UserError(f"feature store {root} does not exist")
    if not root.is_dir():
        raise UserError(f"feature store {root} is not a directory")
    if not path.is_file():
        raise UserError(f"{root} is not a feature store (no {HEADER_FILE})")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"feature store {root}: cannot read {HEADER_FILE}: {err}") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not a {FORMAT_NAME} header")
    if header.get("version") not in READABLE_VERSIONS:
        raise UserError(f"feature store {root} has format version {header.get('version')!r}; this reader knows "
                        f"{', '.join(map(str, READABLE_VERSIONS))}")
    for key in ("feature_dim", "num_classes", "num_attributes"):
        if not isinstance(header.get(key), int) or isinstance(header.get(key), bool) or header[key] < 0:
            raise UserError(f"{path}: {key} must be a non-negative integer")
    if not isinstance(header.get("meta", {}), dict):
        raise UserError(f"{path}: meta must be an object")
    return header


_INDEX_COLUMNS = ("image_ids", "offsets", "num_boxes", "image_h", "image_w", "has_object_probs", "has_attr_probs")


def _read_shard_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read shard index {path}: {err}") from err
    if not isinstance(index, dict) or index.get("format") != SHARD_FORMAT_NAME:
        raise UserError(f"{path} is not a {SHARD_FORMAT_NAME} index")
    if index.get("version") not in READABLE_VERSIONS:
        raise UserError(f"{path} has format version {index.get('version')!r}; this reader knows "
                        f"{', '.join(map(str, READABLE_VERSIONS))}")
    if index["version"] == 1 and isinstance(index.get("image_ids"), list):
        index["has_attr_probs"] = [0] * len(index["image_ids"])  # version 1 stores no attribute distributions
    lengths = set()
    for column in _INDEX_COLUMNS:
        if not isinstance(index.get(column), list):
            raise UserError(f"{path}: {column} must be a list")
        lengths.add(len(index[column]))
    if len(lengths) != 1:
        raise UserError(f"{path}: the columns {', '.join(_INDEX_COLUMNS)} differ in length")
    if not isinstance(index.get("data_bytes"), int) or index["data_bytes"] < 0:
        raise UserError(f"{path}: data_bytes must be a non-negative integer")
    return index


def _list_shards(root: Path) -> tuple[list[int], list[int]]:
    """Shard numbers that have an index, and those that only have a data file (sorted)."""
    indexed, data_only = set(), set()
    for entry in os.scandir(root):
        match = _SHARD_RE.match(entry.name)
        if match:
            (indexed if match.group(2) == "idx.json" else data_only).add(int(match.group(1)))
    return sorted(indexed), sorted(data_only - indexed)


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
        indexed, data_only = _list_shards(self.root)
        self._ids: set[ImageId] = set()
        last_index: dict | None = None
        for number in indexed:
            index = _read_shard_index(self.root / shard_index_name(number))
            for image_id in index["image_ids"]:
                self._ids.add(normalize_image_id(image_id))
            last_index = index
        for number in data_only:  # data without an index holds nothing committed
            if not indexed or number > indexed[-1]:
                (self.root / shard_data_name(number)).unlink(missing_ok=True)
        self._reset_shard_state()
        if last_index is not None and last_index["data_bytes"] < self.shard_bytes:
            self._shard_number = indexed[-1]
            for column in _INDEX_COLUMNS:
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
        self._entries: dict[str, list] = {column: [] for column in _INDEX_COLUMNS}
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
        alternate = _alternate_id(image_id)
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
        for column, value in zip(_INDEX_COLUMNS, (image_id, offset, num_boxes, image_h, image_w, int(has_probs),
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


# ----------------------------------------------------------------------------------------------------------- reader


class FeatureStore(Mapping):
    """Read-only, memory-mapped access to a feature store; a ``Mapping`` from image id to record.

    ``store[image_id]`` returns a dict of fresh numpy arrays (never views of the map): ``image_id`` (as stored),
    ``image_h``, ``image_w``, ``num_boxes`` (ints), ``boxes`` (K, 4) float32 pixels, ``normalized_boxes`` (K, 4)
    float32 = boxes / [w, h, w, h], ``features`` (K, D) float16, ``object_ids`` (K,) int64, ``object_conf`` (K,)
    float32, ``object_probs`` (K, C) float16 (only when stored), ``attr_ids`` (K,) int64, ``attr_conf`` (K,) float32,
    ``attr_probs`` (K, A) float16 (only when stored).
    Lookup is exact first, then the other spelling of the id (``"42"`` finds ``42`` and vice versa). A missing id
    raises KeyError naming the id and the store.

    Safe in DataLoader workers: maps are opened lazily per shard and reopened after a fork; pickling drops them.
    With ``release_pages`` (default) each record's pages are released from this process after copying, so the
    resident set stays flat however many images are read. The store reflects the indexes as of opening.
    """

    def __init__(self, root: str | os.PathLike, *, release_pages: bool = True, max_open_shards: int = 64) -> None:
        self.root = Path(root)
        header = read_header(self.root)
        self.header = header
        self.feature_dim: int = header["feature_dim"]
        self.num_classes: int = header["num_classes"]
        self.num_attributes: int = header["num_attributes"]
        self.release_pages = release_pages and hasattr(mmap, "MADV_DONTNEED")
        self.max_open_shards = max(1, max_open_shards)
        indexed, _ = _list_shards(self.root)
        ids: list = []
        columns: dict[str, list[np.ndarray]] = {column: [] for column in _INDEX_COLUMNS[1:]}
        shard_of_row: list[np.ndarray] = []
        self._shard_paths: list[Path] = []
        self._shard_bytes: list[int] = []
        for shard_position, number in enumerate(indexed):
            index_path = self.root / shard_index_name(number)
            index = _read_shard_index(index_path)
            data_path = self.root / str(index.get("data_file", shard_data_name(number)))
            self._shard_paths.append(data_path)
            self._shard_bytes.append(index["data_bytes"])
            ids.extend(index["image_ids"])
            count = len(index["image_ids"])
            try:
                for column in columns:
                    columns[column].append(np.asarray(index[column], dtype=np.int64).reshape(count))
            except (TypeError, ValueError, OverflowError) as err:
                raise UserError(f"{index_path}: non-integer entries in the index ({err})") from err
            shard_of_row.append(np.full(count, shard_position, dtype=np.int32))

        def concat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

        self._row_shard = concat(shard_of_row, np.int32)
        self._row_offset = concat(columns["offsets"], np.int64)
        self._row_boxes = concat(columns["num_boxes"], np.int32)
        self._row_h = concat(columns["image_h"], np.int32)
        self._row_w = concat(columns["image_w"], np.int32)
        self._row_probs = concat(columns["has_object_probs"], np.bool_)
        self._row_attr_probs = concat(columns["has_attr_probs"], np.bool_)
        self._ids = _IdIndex(ids, f"feature store {self.root}")
        del ids
        self._layouts: dict[tuple[int, bool], _Layout] = {}
        self._check_extents()
        self._maps: OrderedDict[int, mmap.mmap] = OrderedDict()
        self._pid = os.getpid()
        self._lock = threading.Lock()  # threads of one process share the maps

    def _check_extents(self) -> None:
        """Every indexed record must end within its shard's committed bytes."""
        if not len(self._row_offset):
            return
        keys = self._row_boxes.astype(np.int64) * 4 + self._row_probs * 2 + self._row_attr_probs
        unique_keys, inverse = np.unique(keys, return_inverse=True)
        sizes = np.array([self._layout(int(key) // 4, bool(key & 2), bool(key & 1)).data_bytes
                          for key in unique_keys], dtype=np.int64)
        ends = self._row_offset + sizes[inverse.reshape(-1)]
        limits = np.asarray(self._shard_bytes, dtype=np.int64)[self._row_shard]
        bad = np.flatnonzero((ends > limits) | (self._row_offset < 0) | (self._row_boxes < 0))
        if len(bad):
            shard = self._shard_paths[int(self._row_shard[bad[0]])]
            raise UserError(f"feature store {self.root}: the index of {shard.name} points past its data_bytes")

    # -- metadata
    @property
    def meta(self) -> dict:
        """``feature_dim``, ``num_classes``, ``num_attributes`` and the header's meta (class/attribute names, ...)."""
        return {
            **self.header.get("meta", {}),
            "feature_dim": self.feature_dim,
            "num_classes": self.num_classes,
            "num_attributes": self.num_attributes,
        }

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[ImageId]:
        for row in range(len(self._ids)):
            yield self._ids.id_at(row)

    def ids(self) -> list[ImageId]:
        """All image ids in storage order, with their stored types."""
        return self._ids.all_ids()

    def _row(self, image_id: object) -> int:
        try:
            key = normalize_image_id(image_id)
        except UserError:
            return -1
        row = self._ids.find(key)
        if row < 0:
            alternate = _alternate_id(key)
            if alternate is not None:
                row = self._ids.find(alternate)
        return row

    def __contains__(self, image_id: object) -> bool:
        return self._row(image_id) >= 0

    def num_boxes(self, image_id: ImageId) -> int:
        """K of one image, without reading its record."""
        return int(self._row_boxes[self._require_row(image_id)])

    def _require_row(self, image_id: object) -> int:
        row = self._row(image_id)
        if row < 0:
            raise KeyError(f"image id {image_id!r} is not in feature store {self.root} ({len(self)} images)")
        return row

    # -- reading
    def _layout(self, num_boxes: int, has_probs: bool, has_attr_probs: bool) -> _Layout:
        key = (num_boxes, has_probs, has_attr_probs)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = record_layout(num_boxes, self.feature_dim, self.num_classes, has_probs,
                                                        self.num_attributes, has_attr_probs)
        return layout

    def _map(self, shard: int) -> mmap.mmap:
        mapped = self._maps.get(shard)
        if mapped is not None:
            self._maps.move_to_end(shard)
            return mapped
        path, size = self._shard_paths[shard], self._shard_bytes[shard]
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise UserError(f"feature store {self.root}: cannot open {path.name}: {err}") from err
        try:
            if os.fstat(fd).st_size < size:
                raise UserError(f"feature store {self.root}: {path.name} is shorter than its index says")
            mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        if hasattr(mmap, "MADV_RANDOM"):
            mapped.madvise(mmap.MADV_RANDOM)
        self._maps[shard] = mapped
        while len(self._maps) > self.max_open_shards:
            _, oldest = self._maps.popitem(last=False)
            oldest.close()
        return mapped

    def _close_maps(self) -> None:
        maps, self._maps = self._maps, OrderedDict()
        for mapped in maps.values():
            mapped.close()

    def __getitem__(self, image_id: ImageId) -> dict[str, Any]:
        row = self._require_row(image_id)
        num_boxes, has_probs = int(self._row_boxes[row]), bool(self._row_probs[row])
        image_h, image_w = int(self._row_h[row]), int(self._row_w[row])
        layout = self._layout(num_boxes, has_probs, bool(self._row_attr_probs[row]))
        if layout.data_bytes:
            if os.getpid() != self._pid:  # forked (a DataLoader worker): reopen maps, with a lock of our own
                self._lock = threading.Lock()
                self._close_maps()
                self._pid = os.getpid()
            offset = int(self._row_offset[row])
            with self._lock:
                mapped = self._map(int(self._row_shard[row]))
                raw = np.frombuffer(mapped, dtype=np.uint8, count=layout.data_bytes, offset=offset).copy()
                if self.release_pages:
                    start = max(0, offset - _FAULT_AROUND) // mmap.PAGESIZE * mmap.PAGESIZE
                    end = min(len(mapped), offset + layout.data_bytes + _FAULT_AROUND)
                    mapped.madvise(mmap.MADV_DONTNEED, start, end - start)
        else:
            raw = np.zeros(0, dtype=np.uint8)
        record: dict[str, Any] = {
            "image_id": self._ids.id_at(row),
            "image_h": image_h,
            "image_w": image_w,
            "num_boxes": num_boxes,
        }
        for section in layout.sections:
            chunk = raw[section.start : section.start + section.nbytes]
            record[section.key] = chunk.view(section.dtype).reshape(section.shape)
        scale = np.array([image_w, image_h, image_w, image_h], dtype=np.float32)
        record["normalized_boxes"] = record["boxes"] / scale
        return record

    def close(self) -> None:
        with self._lock:
            self._close_maps()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r}, images={len(self)}, feature_dim={self.feature_dim})"
