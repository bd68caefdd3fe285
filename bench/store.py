"""Feature-store benchmark: write a synthetic store, then time random reads and measure resident-memory growth.

    .venv/bin/python bench/store.py [--images 2000 --boxes 36 --dim 2048 --reads 10000]

Prints one JSON line: write MB/s, random-read records/s and MB/s, and the reader's RSS growth over the reads, both
with page release (the default reader) and without it (plain memory-mapped reads, whose touched pages stay resident).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


from region_features.store import FeatureStore
from region_features.store_writer import FeatureStoreWriter


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def synthetic_record(index: int, num_boxes: int, feature_dim: int, num_classes: int, base: np.ndarray) -> dict:
    """A cheap, image-specific record: a shared random block shifted by the image index."""
    boxes = np.tile(np.array([[1.0, 2.0, 30.0, 40.0]], dtype=np.float32), (num_boxes, 1)) + index % 7
    return {
        "image_h": 480,
        "image_w": 640,
        "boxes": boxes,
        "features": base + np.float16(index % 100),
        "object_ids": np.arange(num_boxes) % num_classes,
        "object_conf": np.full(num_boxes, 0.5, dtype=np.float32),
        "attr_ids": np.arange(num_boxes) % 4,
        "attr_conf": np.full(num_boxes, 0.25, dtype=np.float32),
    }


def write_store(root: Path, images: int, num_boxes: int, feature_dim: int) -> float:
    base = np.random.default_rng(0).standard_normal((num_boxes, feature_dim)).astype(np.float16)
    start = time.perf_counter()
    with FeatureStoreWriter(root, feature_dim, 1600, 400, fsync=False) as writer:
        for index in range(images):
            writer.add(index, synthetic_record(index, num_boxes, feature_dim, 1600, base))
    return time.perf_counter() - start


def random_reads(root: Path, reads: int, release_pages: bool, seed: int = 0) -> tuple[float, int, int]:
    """(seconds, bytes read, RSS growth) for ``reads`` random lookups."""
    store = FeatureStore(root, release_pages=release_pages)
    ids = store.ids()
    order = np.random.default_rng(seed).integers(0, len(ids), size=reads)
    store[ids[0]]  # open the map and warm the allocator before the baseline
    before = rss_bytes()
    start = time.perf_counter()
    nbytes = 0
    for position in order:
        record = store[ids[position]]
        nbytes += record["features"].nbytes
    elapsed = time.perf_counter() - start
    growth = rss_bytes() - before
    store.close()
    return elapsed, nbytes, growth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--boxes", type=int, default=36)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--reads", type=int, default=10_000)
    parser.add_argument("--dir", help="where to build the store (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "store"
        write_s = write_store(root, args.images, args.boxes, args.dim)
        store_bytes = sum(path.stat().st_size for path in root.iterdir())
        read_s, read_bytes, growth = random_reads(root, args.reads, release_pages=True)
        plain_s, _, plain_growth = random_reads(root, args.reads, release_pages=False, seed=1)
    print(
        json.dumps(
            {
                "bench": "feature_store",
                "images": args.images,
                "boxes": args.boxes,
                "feature_dim": args.dim,
                "store_mb": round(store_bytes / 2**20, 1),
                "write_mb_per_s": round(store_bytes / 2**20 / write_s, 1),
                "reads": args.reads,
                "records_per_s": round(args.reads / read_s, 1),
                "read_mb_per_s": round(read_bytes / 2**20 / read_s, 1),
                "rss_growth_mb": round(growth / 2**20, 2),
                "records_per_s_without_release": round(args.reads / plain_s, 1),
                "rss_growth_mb_without_release": round(plain_growth / 2**20, 2),
                "release_speed_ratio": round(plain_s / read_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
