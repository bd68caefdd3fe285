"""The region feature store's on-disk format: file names, header and shard index reading, the record layout, image-id
normalisation and the image-id index. The writer is ``region_features.store_writer``, the reader
``region_features.store``.

A store is a sharded directory of per-image region features. Format (version 2; a version 1 store reads as one
without attribute distributions); the full specification with examples is in ``docs/feature-store.md``::

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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vl.errors import UserError

ImageId = int | str

FORMAT_NAME = "vl-region-store"
SHARD_FORMAT_NAME = "vl-region-store-shard"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 has no attr_probs section and no has_attr_probs column
HEADER_FILE = "store.json"
LOCK_FILE = ".lock"
RECORD_ALIGN = 64
SECTION_ALIGN = 16
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.(bin|idx\.json)$")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_MASK64 = (1 << 64) - 1

RECORD_KEYS = ("boxes", "features", "object_ids", "object_conf", "object_probs", "attr_ids", "attr_conf", "attr_probs")


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
class RecordLayout:
    sections: tuple[_Section, ...]
    data_bytes: int  # bytes holding data (the last section's end)
    record_bytes: int  # data_bytes rounded up to RECORD_ALIGN: the step to the next record


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def record_layout(num_boxes: int, feature_dim: int, num_classes: int, has_object_probs: bool,
                  num_attributes: int = 0, has_attr_probs: bool = False) -> RecordLayout:
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
    return RecordLayout(tuple(sections), end, _align(end, RECORD_ALIGN))


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


def alternate_id(image_id: ImageId) -> ImageId | None:
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


class IdIndex:
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


INDEX_COLUMNS = ("image_ids", "offsets", "num_boxes", "image_h", "image_w", "has_object_probs", "has_attr_probs")


def read_shard_index(path: Path) -> dict:
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
    for column in INDEX_COLUMNS:
        if not isinstance(index.get(column), list):
            raise UserError(f"{path}: {column} must be a list")
        lengths.add(len(index[column]))
    if len(lengths) != 1:
        raise UserError(f"{path}: the columns {', '.join(INDEX_COLUMNS)} differ in length")
    if not isinstance(index.get("data_bytes"), int) or index["data_bytes"] < 0:
        raise UserError(f"{path}: data_bytes must be a non-negative integer")
    return index


def list_shards(root: Path) -> tuple[list[int], list[int]]:
    """Shard numbers that have an index, and those that only have a data file (sorted)."""
    indexed, data_only = set(), set()
    for entry in os.scandir(root):
        match = _SHARD_RE.match(entry.name)
        if match:
            (indexed if match.group(2) == "idx.json" else data_only).add(int(match.group(1)))
    return sorted(indexed), sorted(data_only - indexed)
