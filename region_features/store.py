"""Reading a region feature store: ``FeatureStore``, the read-only memory-mapped ``Mapping`` from image id to record
that the ``vl`` side reads (the file format is in ``region_features.store_format``, the writer in
``region_features.store_writer``).

The reader (``FeatureStore``) loads all shard indexes at open into numpy arrays and a bucketed hash table over the ids
(no per-id Python objects, so forked DataLoader workers do not copy it page by page), memory-maps each shard lazily,
and copies a record out with one slice. After each read it tells the kernel to drop the record's pages from the
process (``madvise(MADV_DONTNEED)``: the file stays in the page cache, but not in this process's resident set), so
resident memory does not grow with the number of images read. After a ``fork`` the maps are reopened.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from region_features.store_format import (
    INDEX_COLUMNS,
    IdIndex,
    ImageId,
    RecordLayout,
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

# Pages the kernel may map around a faulting page (fault_around_bytes); released together with the record.
_FAULT_AROUND = 64 * 1024


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
        indexed, _ = list_shards(self.root)
        ids: list = []
        columns: dict[str, list[np.ndarray]] = {column: [] for column in INDEX_COLUMNS[1:]}
        shard_of_row: list[np.ndarray] = []
        self._shard_paths: list[Path] = []
        self._shard_bytes: list[int] = []
        for shard_position, number in enumerate(indexed):
            index_path = self.root / shard_index_name(number)
            index = read_shard_index(index_path)
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
        self._ids = IdIndex(ids, f"feature store {self.root}")
        del ids
        self._layouts: dict[tuple[int, bool], RecordLayout] = {}
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
            alternate = alternate_id(key)
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
    def _layout(self, num_boxes: int, has_probs: bool, has_attr_probs: bool) -> RecordLayout:
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
