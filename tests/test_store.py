"""The region feature store: round trips, resume, crash safety, flat memory, DataLoader workers, conversions."""

from __future__ import annotations

import base64
import csv
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from region_features import store_writer as store_writer_module
from vl.cli.regions import main as vl_regions
from region_features.convert_lxmert import LXMERT_FIELDNAMES, export_lxmert_tsv, import_lxmert_tsv
from region_features.convert_npz import export_npz_dir, import_npz_dir
from region_features.images import ProblemLog
from region_features.store import FeatureStore
from region_features.store_writer import FeatureStoreWriter
from vl.errors import UserError

DIM, CLASSES, ATTRS = 16, 6, 4
REPO = Path(__file__).resolve().parents[1]


def make_record(rng: np.random.Generator, num_boxes: int, with_probs: bool = True, dim: int = DIM) -> dict:
    x1y1 = rng.uniform(0, 50, size=(num_boxes, 2))
    record = {
        "image_h": int(rng.integers(60, 200)),
        "image_w": int(rng.integers(60, 200)),
        "boxes": np.concatenate([x1y1, x1y1 + rng.uniform(1, 10, size=(num_boxes, 2))], axis=1).astype(np.float32),
        "features": rng.standard_normal((num_boxes, dim)).astype(np.float32),
        "object_ids": rng.integers(0, CLASSES, num_boxes),
        "object_conf": rng.uniform(size=num_boxes).astype(np.float32),
        "attr_ids": rng.integers(0, ATTRS, num_boxes),
        "attr_conf": rng.uniform(size=num_boxes).astype(np.float32),
    }
    if with_probs:
        record["object_probs"] = rng.dirichlet(np.ones(CLASSES), size=num_boxes).astype(np.float32)
    return record


def assert_same(got: dict, expected: dict, with_probs: bool | None = None) -> None:
    """``got`` (read from a store) equals ``expected`` (written) up to the fp16 storage of features and probs."""
    np.testing.assert_array_equal(got["boxes"], np.asarray(expected["boxes"], dtype=np.float32))
    np.testing.assert_array_equal(got["features"], np.asarray(expected["features"]).astype(np.float16))
    for key in ("object_ids", "attr_ids"):
        np.testing.assert_array_equal(got[key], np.asarray(expected[key], dtype=np.int64))
    for key in ("object_conf", "attr_conf"):
        np.testing.assert_array_equal(got[key], np.asarray(expected[key], dtype=np.float32))
    assert (got["image_h"], got["image_w"]) == (expected["image_h"], expected["image_w"])
    has_probs = "object_probs" in expected if with_probs is None else with_probs
    assert ("object_probs" in got) == has_probs
    if has_probs:
        np.testing.assert_array_equal(got["object_probs"], np.asarray(expected["object_probs"]).astype(np.float16))


def write_store(root: Path, records: dict, **options) -> None:
    with FeatureStoreWriter(root, DIM, CLASSES, ATTRS, **options) as writer:
        for image_id, record in records.items():
            writer.add(image_id, record)


def sample_records(count: int = 24, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    records = {}
    for index in range(count):
        image_id = 1000 + index if index % 3 else f"img_{index}"
        records[image_id] = make_record(rng, [0, 1, 5, 10, 36][index % 5], with_probs=index % 4 != 1)
    return records


# ------------------------------------------------------------------------------------------------------ round trip


def test_round_trip_varying_boxes_int_and_str_ids(tmp_path):
    records = sample_records()
    meta = {"class_names": [f"c{i}" for i in range(CLASSES)], "detector": "tiny"}
    with FeatureStoreWriter(tmp_path / "s", DIM, CLASSES, ATTRS, meta=meta, shard_bytes=4096) as writer:
        for image_id, record in records.items():
            writer.add(image_id, record)
        assert 1001 in writer and "img_0" in writer and 5 not in writer
    store = FeatureStore(tmp_path / "s")
    assert len(list((tmp_path / "s").glob("shard-*.idx.json"))) > 1  # several shards
    assert len(store) == len(records)
    assert store.ids() == list(records)  # storage order, types kept
    assert [type(image_id) for image_id in store.ids()] == [type(image_id) for image_id in records]
    assert store.meta["class_names"] == meta["class_names"] and store.meta["detector"] == "tiny"
    assert (store.meta["feature_dim"], store.meta["num_classes"], store.meta["num_attributes"]) == (DIM, CLASSES, ATTRS)
    for image_id, expected in records.items():
        got = store[image_id]
        assert got["image_id"] == image_id and type(got["image_id"]) is type(image_id)
        assert_same(got, expected)
        k = len(expected["boxes"])
        assert got["num_boxes"] == k == store.num_boxes(image_id)
        assert got["features"].dtype == np.float16 and got["features"].shape == (k, DIM)
        assert got["boxes"].dtype == np.float32 and got["object_ids"].dtype == np.int64
        scale = np.array([expected["image_w"], expected["image_h"]] * 2, dtype=np.float32)
        np.testing.assert_allclose(got["normalized_boxes"], expected["boxes"] / scale, rtol=1e-6)
        assert got["features"].flags.writeable  # a copy, not a view of the read-only map
    # lookups: the other spelling of a numeric id finds it; unknown ids raise a KeyError naming the store
    assert "1001" in store and store["1001"]["image_id"] == 1001
    assert 7 not in store and "img_999" not in store and 3.5 not in store
    with pytest.raises(KeyError, match=r"image id 7 is not in feature store .*s \(24 images\)"):
        store[7]
    assert dict(store.items())[1001]["num_boxes"] == records[1001]["boxes"].shape[0]  # a Mapping


def test_torch_tensors_and_read_records_can_be_added(tmp_path):
    rng = np.random.default_rng(1)
    record = make_record(rng, 3)
    as_tensors = {
        key: torch.as_tensor(value) if isinstance(value, np.ndarray) else value for key, value in record.items()
    }
    as_tensors["features"] = as_tensors["features"].to(torch.bfloat16)
    write_store(tmp_path / "a", {1: as_tensors})
    copied = FeatureStore(tmp_path / "a")[1]  # carries image_id, num_boxes, normalized_boxes
    write_store(tmp_path / "b", {1: copied})
    again = FeatureStore(tmp_path / "b")[1]
    for key in ("boxes", "features", "object_probs", "attr_ids"):
        np.testing.assert_array_equal(again[key], copied[key])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda r: r.update(features=np.zeros((3, DIM + 1))),
            r"image 5: features has shape \(3, 17\), expected \(3, 16\)",
        ),
        (lambda r: r.pop("attr_conf"), r"image 5: record has no 'attr_conf'"),
        (lambda r: r.update(extra=1), r"image 5: unknown record key 'extra'"),
        (lambda r: r.update(object_ids=np.zeros(3)), r"image 5: object_ids must hold ints"),
        (lambda r: r.update(object_ids=np.array([0, 1, CLASSES])), r"image 5: object_ids must lie in -1..5"),
        (lambda r: r.update(boxes=np.zeros((3, 5))), r"image 5: boxes must have shape \(K, 4\)"),
        (lambda r: r.update(object_conf=np.zeros(2)), r"image 5: object_conf has shape \(2,\), expected \(3,\)"),
        (lambda r: r.update(features=np.full((3, DIM), 1e6)), r"image 5: features has non-finite values"),
        (lambda r: r.update(image_h=0), r"image 5: image size"),
        (lambda r: r.update(image_w=1.5), r"image 5: image_w must be an integer"),
        (lambda r: r.update(object_probs=np.zeros((3, CLASSES + 1))), r"image 5: object_probs has shape"),
    ],
)
def test_bad_records_name_the_image_and_key(tmp_path, change, match):
    record = make_record(np.random.default_rng(2), 3)
    change(record)
    with FeatureStoreWriter(tmp_path / "s", DIM, CLASSES, ATTRS) as writer, pytest.raises(UserError, match=match):
        writer.add(5, record)


def test_bad_ids_and_duplicates(tmp_path):
    record = make_record(np.random.default_rng(3), 2)
    with FeatureStoreWriter(tmp_path / "s", DIM, CLASSES, ATTRS) as writer:
        writer.add(np.int64(9), record)
        with pytest.raises(UserError, match="image id 9 is already in feature store"):
            writer.add(9, record)
        with pytest.raises(UserError, match="already in feature store"):
            writer.add("9", record)  # the same image, spelled as a string
        for bad in (True, 1.5, b"x", "", 1 << 70):
            with pytest.raises(UserError, match="image id"):
                writer.add(bad, record)
    assert FeatureStore(tmp_path / "s").ids() == [9]


def test_attribute_distributions_round_trip_where_given(tmp_path):
    rng = np.random.default_rng(4)
    with_attrs = make_record(rng, 5)
    with_attrs["attr_probs"] = rng.uniform(size=(5, ATTRS)).astype(np.float32)
    without = make_record(rng, 3)
    write_store(tmp_path / "s", {1: with_attrs, 2: without})
    store = FeatureStore(tmp_path / "s")
    np.testing.assert_array_equal(store[1]["attr_probs"], with_attrs["attr_probs"].astype(np.float16))
    assert "attr_probs" not in store[2]
    assert_same(store[1], with_attrs)
    assert_same(store[2], without)
    index = json.loads((tmp_path / "s" / "shard-00000.idx.json").read_text())
    assert index["version"] == 2 and index["has_attr_probs"] == [1, 0]
    bad = dict(with_attrs, attr_probs=np.zeros((5, ATTRS + 1)))
    with FeatureStoreWriter(tmp_path / "s", DIM, CLASSES, ATTRS) as writer, \
            pytest.raises(UserError, match=r"image 3: attr_probs has shape \(5, 5\), expected \(5, 4\)"):
        writer.add(3, bad)


def _as_version_1(root: Path) -> None:
    """Rewrite a store written without attribute distributions as format version 1 wrote it."""
    header = json.loads((root / "store.json").read_text())
    (root / "store.json").write_text(json.dumps({**header, "version": 1}))
    for path in root.glob("shard-*.idx.json"):
        index = json.loads(path.read_text())
        assert not any(index.pop("has_attr_probs"))
        path.write_text(json.dumps({**index, "version": 1}))


def test_version_1_stores_are_read_and_continued(tmp_path):
    records = sample_records(8)
    ids = list(records)
    root = tmp_path / "s"
    write_store(root, {image_id: records[image_id] for image_id in ids[:4]})
    _as_version_1(root)
    store = FeatureStore(root)
    for image_id in ids[:4]:
        assert_same(store[image_id], records[image_id])
        assert "attr_probs" not in store[image_id]
    extra = dict(records[ids[4]], attr_probs=np.full((len(records[ids[4]]["boxes"]), ATTRS), 0.5, np.float32))
    with FeatureStoreWriter(root, DIM, CLASSES, ATTRS) as writer:  # continues the version 1 shard
        writer.add(ids[4], extra)
    assert json.loads((root / "store.json").read_text())["version"] == 2
    store = FeatureStore(root)
    assert store.ids() == ids[:5]
    for image_id in ids[:4]:
        assert_same(store[image_id], records[image_id])
    assert (store[ids[4]]["attr_probs"] == 0.5).all()
    (root / "store.json").write_text(json.dumps({**json.loads((root / "store.json").read_text()), "version": 3}))
    with pytest.raises(UserError, match="has format version 3; this reader knows 1, 2"):
        FeatureStore(root)


# ---------------------------------------------------------------------------------------------- resume and errors


def test_reopen_continues_and_checks_dimensions(tmp_path):
    records = sample_records(12)
    ids = list(records)
    root = tmp_path / "s"
    write_store(root, {image_id: records[image_id] for image_id in ids[:5]}, meta={"class_names": list("abcdef")})
    with FeatureStoreWriter(root, DIM, CLASSES, ATTRS, meta={"run": "second"}) as writer:
        assert len(writer) == 5 and all(image_id in writer for image_id in ids[:5]) and ids[5] not in writer
        for image_id in ids[5:]:
            writer.add(image_id, records[image_id])
    store = FeatureStore(root)
    assert store.ids() == ids
    assert store.meta["class_names"] == list("abcdef") and store.meta["run"] == "second"
    for image_id in ids:
        assert_same(store[image_id], records[image_id])
    with pytest.raises(UserError, match=f"feature store {root} has feature_dim=16, but 32 was asked for"):
        FeatureStoreWriter(root, 32, CLASSES, ATTRS)
    with pytest.raises(UserError, match="num_attributes=4, but 5"):
        FeatureStoreWriter(root, DIM, CLASSES, ATTRS + 1)
    with pytest.raises(UserError, match="different class_names"):
        FeatureStoreWriter(root, DIM, CLASSES, ATTRS, meta={"class_names": list("uvwxyz")})
    with pytest.raises(UserError, match="meta class_names has 2 names, the store has 6"):
        FeatureStoreWriter(tmp_path / "new", DIM, CLASSES, ATTRS, meta={"class_names": ["a", "b"]})


def test_store_and_writer_refuse_bad_directories(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="is not empty and is not a feature store"):
        FeatureStoreWriter(tmp_path / "junk", DIM, CLASSES, ATTRS)
    with pytest.raises(UserError, match="is not a feature store"):
        FeatureStore(tmp_path / "junk")
    with pytest.raises(UserError, match="does not exist"):
        FeatureStore(tmp_path / "missing")
    write_store(tmp_path / "s", sample_records(3))
    busy = pytest.raises(UserError, match="is being written by another process")
    with FeatureStoreWriter(tmp_path / "s", DIM, CLASSES, ATTRS), busy:
        FeatureStoreWriter(tmp_path / "s", DIM, CLASSES, ATTRS)
    index = tmp_path / "s" / "shard-00000.idx.json"
    index.write_text(index.read_text()[:-20])
    with pytest.raises(UserError, match="shard-00000.idx.json"):
        FeatureStore(tmp_path / "s")


# --------------------------------------------------------------------------------------------------- crash safety


def visible_state_is_consistent(root: Path) -> None:
    """No temporary file is left, and every index covers only bytes its data file has."""
    assert not [path.name for path in root.iterdir() if path.name.endswith(".tmp")]
    for index_path in root.glob("shard-*.idx.json"):
        index = json.loads(index_path.read_text())
        assert (root / index["data_file"]).stat().st_size >= index["data_bytes"]


def test_exception_mid_shard_keeps_completed_records(tmp_path, monkeypatch):
    records = sample_records(10, seed=4)
    ids = list(records)
    root = tmp_path / "s"
    real_pwrite = os.pwrite
    armed = {"now": False}

    def pwrite_then_interrupt(fd, data, offset):
        if armed["now"]:  # half of the record reaches the file, then Ctrl-C
            real_pwrite(fd, bytes(data[: len(data) // 2]), offset)
            raise KeyboardInterrupt
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(store_writer_module.os, "pwrite", pwrite_then_interrupt)
    interrupted = pytest.raises(KeyboardInterrupt)
    with interrupted, FeatureStoreWriter(root, DIM, CLASSES, ATTRS, shard_bytes=8192, flush_every=1000) as writer:
        for number, image_id in enumerate(ids):
            armed["now"] = number == 7
            writer.add(image_id, records[image_id])
    monkeypatch.setattr(store_writer_module.os, "pwrite", real_pwrite)
    visible_state_is_consistent(root)
    store = FeatureStore(root)
    assert store.ids() == ids[:7]  # every completed record, none of the interrupted one
    for image_id in ids[:7]:
        assert_same(store[image_id], records[image_id])
    with FeatureStoreWriter(root, DIM, CLASSES, ATTRS) as writer:  # resume
        for image_id in ids:
            if image_id not in writer:
                writer.add(image_id, records[image_id])
    store = FeatureStore(root)
    assert store.ids() == ids
    for image_id in ids:
        assert_same(store[image_id], records[image_id])


def test_hard_crash_loses_only_unflushed_records(tmp_path):
    root = tmp_path / "s"
    records = sample_records(8, seed=5)
    ids = list(records)
    (tmp_path / "records.pkl").write_bytes(pickle.dumps(records))  # test data made here, read by the child
    script = textwrap.dedent(
        f"""
        import os, pickle, sys
        sys.path.insert(0, {str(REPO)!r})
        from region_features.store_writer import FeatureStoreWriter
        records = pickle.loads(open({str(tmp_path / "records.pkl")!r}, "rb").read())
        writer = FeatureStoreWriter({str(root)!r}, {DIM}, {CLASSES}, {ATTRS}, flush_every=1000, flush_seconds=1e9)
        for number, (image_id, record) in enumerate(records.items()):
            writer.add(image_id, record)
            if number == 4:
                writer.flush()
        os._exit(3)  # killed: no close, no flush
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    index = json.loads((root / "shard-00000.idx.json").read_text())
    assert (root / "shard-00000.bin").stat().st_size > index["data_bytes"]  # the unflushed tail is there, unlisted
    visible_state_is_consistent(root)
    store = FeatureStore(root)
    assert store.ids() == ids[:5]
    for image_id in ids[:5]:
        assert_same(store[image_id], records[image_id])
    with FeatureStoreWriter(root, DIM, CLASSES, ATTRS) as writer:
        assert [image_id in writer for image_id in ids] == [True] * 5 + [False] * 3
        for image_id in ids[5:]:
            writer.add(image_id, records[image_id])
    assert (root / "shard-00000.bin").stat().st_size == json.loads((root / "shard-00000.idx.json").read_text())[
        "data_bytes"
    ]
    store = FeatureStore(root)
    assert store.ids() == ids
    for image_id in ids:
        assert_same(store[image_id], records[image_id])


# --------------------------------------------------------------------------------------------- memory and workers


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_memory_flat_across_10k_random_reads(tmp_path):
    images, boxes, dim = 2000, 36, 2048  # about 285 MB of fp16 features
    base = np.random.default_rng(6).standard_normal((boxes, dim)).astype(np.float16)
    ones = np.ones(boxes)
    with FeatureStoreWriter(tmp_path / "big", dim, 2, 2, fsync=False) as writer:
        for index in range(images):
            writer.add(
                index,
                {
                    "image_h": 100,
                    "image_w": 100,
                    "boxes": np.tile([0.0, 0.0, 10.0, 10.0], (boxes, 1)),
                    "features": base + np.float16(index % 64),
                    "object_ids": np.full(boxes, index % 2),
                    "object_conf": ones,
                    "attr_ids": np.zeros(boxes, dtype=np.int64),
                    "attr_conf": ones,
                },
            )
    store_bytes = sum(path.stat().st_size for path in (tmp_path / "big").iterdir())
    assert store_bytes > 250 * 2**20
    store = FeatureStore(tmp_path / "big")
    order = np.random.default_rng(7).integers(0, images, size=10_000)
    store[0]
    before = rss_bytes()
    for position in order:
        record = store[int(position)]
        assert record["object_ids"][0] == position % 2
    growth = rss_bytes() - before
    np.testing.assert_array_equal(store[1234]["features"], base + np.float16(1234 % 64))
    assert growth < 16 * 2**20, f"RSS grew by {growth / 2**20:.1f} MB over 10k reads of a {store_bytes >> 20} MB store"


class StoreDataset(torch.utils.data.Dataset):
    def __init__(self, store: FeatureStore, ids: list) -> None:
        self.store, self.ids = store, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple:
        record = self.store[self.ids[index]]
        return self.ids[index], os.getpid(), torch.from_numpy(record["features"].astype(np.float32))


def test_dataloader_workers_read_correct_records(tmp_path):
    records = sample_records(20, seed=8)
    write_store(tmp_path / "s", records)
    store = FeatureStore(tmp_path / "s")
    store[next(iter(records))]  # the parent has a map open before the workers fork
    ids = list(records)
    loader = torch.utils.data.DataLoader(
        StoreDataset(store, ids), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    seen_pids = set()
    for image_id, pid, features in loader:
        seen_pids.add(pid)
        np.testing.assert_array_equal(features.numpy(), records[image_id]["features"].astype(np.float16))
    assert len(seen_pids) == 2 and os.getpid() not in seen_pids
    clone = pickle.loads(pickle.dumps(store))  # spawn-style workers pickle the store: maps are reopened lazily
    assert_same(clone[ids[3]], records[ids[3]])


# ---------------------------------------------------------------------------------------------------- conversions


def lxmert_load_obj_tsv(path: Path) -> list[dict]:
    """LXMERT's own reader (src/utils.py load_obj_tsv), to check that our export is what LXMERT expects."""
    csv.field_size_limit(sys.maxsize)
    rows = []
    with open(path) as handle:
        for item in csv.DictReader(handle, LXMERT_FIELDNAMES, delimiter="\t"):
            for key in ("img_h", "img_w", "num_boxes"):
                item[key] = int(item[key])
            boxes = item["num_boxes"]
            for key, shape, dtype in (
                ("objects_id", (boxes,), np.int64),
                ("objects_conf", (boxes,), np.float32),
                ("attrs_id", (boxes,), np.int64),
                ("attrs_conf", (boxes,), np.float32),
                ("boxes", (boxes, 4), np.float32),
                ("features", (boxes, -1), np.float32),
            ):
                item[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dtype).reshape(shape)
            rows.append(item)
    return rows


def test_lxmert_tsv_round_trip(tmp_path):
    records = {key: value for key, value in sample_records(15, seed=9).items() if len(value["boxes"])}
    write_store(tmp_path / "s", records)
    assert export_lxmert_tsv(tmp_path / "s", tmp_path / "out" / "feats.tsv") == len(records)
    lxmert_rows = lxmert_load_obj_tsv(tmp_path / "out" / "feats.tsv")
    assert [row["img_id"] for row in lxmert_rows] == [str(image_id) for image_id in records]
    first = lxmert_rows[0]
    assert first["features"].dtype == np.float32 and first["features"].shape == (first["num_boxes"], DIM)
    stats = import_lxmert_tsv(
        tmp_path / "out" / "feats.tsv", tmp_path / "back", num_classes=CLASSES, num_attributes=ATTRS, keep_ids=True
    )
    assert (stats.converted, stats.skipped, stats.bad) == (len(records), 0, 0)
    back = FeatureStore(tmp_path / "back")
    assert back.ids() == [str(image_id) for image_id in records]
    for image_id, expected in records.items():
        assert_same(back[str(image_id)], expected, with_probs=False)  # LXMERT TSV carries no class distribution
    # default id rule: the trailing number (COCO-style), so "img_3" -> 3 and "1001" -> 1001
    import_lxmert_tsv(tmp_path / "out" / "feats.tsv", tmp_path / "numeric", num_classes=CLASSES, num_attributes=ATTRS)
    numeric = FeatureStore(tmp_path / "numeric")
    assert all(isinstance(image_id, int) for image_id in numeric.ids()) and 3 in numeric and 1001 in numeric
    # rerunning an import resumes: everything is already there
    stats = import_lxmert_tsv(tmp_path / "out" / "feats.tsv", tmp_path / "back", keep_ids=True)
    assert (stats.converted, stats.skipped) == (0, len(records))


def write_lxmert_row(handle, image_id: str, record: dict) -> None:
    """One row as LXMERT / bottom-up-attention's generate_tsv.py writes it (csv.DictWriter, FIELDNAMES order)."""
    writer = csv.DictWriter(handle, LXMERT_FIELDNAMES, delimiter="\t")
    k = len(record["boxes"])
    writer.writerow(
        {
            "img_id": image_id,
            "img_h": record["image_h"],
            "img_w": record["image_w"],
            "objects_id": base64.b64encode(np.asarray(record["object_ids"], np.int64).tobytes()).decode(),
            "objects_conf": base64.b64encode(np.asarray(record["object_conf"], np.float32).tobytes()).decode(),
            "attrs_id": base64.b64encode(np.asarray(record["attr_ids"], np.int64).tobytes()).decode(),
            "attrs_conf": base64.b64encode(np.asarray(record["attr_conf"], np.float32).tobytes()).decode(),
            "num_boxes": k,
            "boxes": base64.b64encode(np.asarray(record["boxes"], np.float32).tobytes()).decode(),
            "features": base64.b64encode(np.asarray(record["features"], np.float32).tobytes()).decode(),
        }
    )


def test_bad_tsv_rows_are_warned_with_line_numbers_and_skipped(tmp_path, capsys):
    rng = np.random.default_rng(10)
    good = {f"COCO_val2014_{n:012d}": make_record(rng, 4) for n in (42, 43, 44)}
    path = tmp_path / "feats.tsv"
    with open(path, "w", newline="") as handle:
        names = list(good)
        write_lxmert_row(handle, names[0], good[names[0]])  # line 1
        handle.write("just\ttwo\n")  # line 2: wrong field count
        write_lxmert_row(handle, names[1], good[names[1]])  # line 3
        broken = dict(good[names[2]], features=np.zeros((3, DIM + 1)))  # line 4: 51 feature values for 4 boxes
        write_lxmert_row(handle, "COCO_val2014_000000000099", broken)
        handle.write("x\t1\t1\t!!!\tAAAA\tAAAA\tAAAA\t1\tAAAA\tAAAA\n")  # line 5: not base64
        write_lxmert_row(handle, names[1], good[names[1]])  # line 6: duplicate id
        write_lxmert_row(handle, names[2], good[names[2]])  # line 7
        handle.write("y\t1\t1\tAAAA\tAAAA\tAAAA\tAAAA\tmany\tAAAA\tAAAA\n")  # line 8: num_boxes not a number
    problems = ProblemLog()
    stats = import_lxmert_tsv(path, tmp_path / "s", num_classes=CLASSES, num_attributes=ATTRS, problems=problems)
    assert (stats.converted, stats.bad) == (3, 5)
    assert problems.counts["bad row"] == 5
    err = capsys.readouterr().err
    for line_number, reason in (
        (2, "has 2 fields, expected 10"),
        (4, "features holds 51 values, not a multiple of num_boxes 4"),
        (5, "objects_id is not valid base64"),
        (6, "image id 43 occurs again; skipped"),
        (8, "num_boxes 'many' is not an integer"),
    ):
        assert f"feats.tsv: line {line_number}: {reason}" in err
    store = FeatureStore(tmp_path / "s")
    assert store.ids() == [42, 43, 44]
    for name, expected in good.items():
        assert_same(store[int(name[-12:])], expected, with_probs=False)


def test_npz_dir_round_trip_and_other_producers(tmp_path):
    records = sample_records(10, seed=11)
    records[1002]["attr_probs"] = np.random.default_rng(13).uniform(size=(5, ATTRS)).astype(np.float32)
    write_store(tmp_path / "s", records)
    assert export_npz_dir(tmp_path / "s", tmp_path / "npz") == len(records)
    exported = np.load(tmp_path / "npz" / "img_0.npz")
    assert exported["norm_bb"].shape == (0, 6) and str(exported["image_id"]) == "img_0"
    exported = np.load(tmp_path / "npz" / "1002.npz")
    assert exported["soft_labels"].shape[1] == CLASSES + 1 and exported["norm_bb"].shape[1] == 6
    stats = import_npz_dir(tmp_path / "npz", tmp_path / "back", num_attributes=ATTRS)
    assert (stats.converted, stats.bad) == (len(records), 0)
    back = FeatureStore(tmp_path / "back")
    assert back.num_classes == CLASSES  # taken from soft_labels
    assert sorted(back.ids(), key=str) == sorted(records, key=str)
    for image_id, expected in records.items():
        assert_same(back[image_id], expected)
    np.testing.assert_array_equal(back[1002]["attr_probs"], records[1002]["attr_probs"].astype(np.float16))
    assert "attr_probs" not in back[1004]

    # UNITER-style (norm_bb, soft_labels with background, conf, fp16 features, no image size) and
    # bottom-up-attention.pytorch-style (x, bbox, image_h/w, a pickled info dict that must not be unpickled)
    rng = np.random.default_rng(12)
    other = tmp_path / "other"
    other.mkdir()
    soft = rng.dirichlet(np.ones(CLASSES + 1), size=3).astype(np.float32)
    np.savez(
        other / "COCO_train2014_000000000009.npz",
        features=rng.standard_normal((3, DIM)).astype(np.float16),
        norm_bb=np.array([[0.1, 0.2, 0.5, 0.6, 0.4, 0.4]] * 3, dtype=np.float32),
        soft_labels=soft,
        conf=soft[:, 1:].max(axis=1),
    )
    np.savez(
        other / "COCO_train2014_000000000010.npz",
        x=rng.standard_normal((2, DIM)).astype(np.float32),
        bbox=np.array([[1, 2, 30, 40], [5, 5, 9, 9]], dtype=np.float32),
        num_bbox=2,
        image_h=100,
        image_w=80,
        info=np.array({"objects_id": [1, 2]}, dtype=object),
    )
    (other / "broken.npz").write_bytes(b"not a zip file")
    problems = ProblemLog()
    stats = import_npz_dir(other, tmp_path / "imported", num_classes=CLASSES, num_attributes=ATTRS, problems=problems)
    assert (stats.converted, stats.bad) == (2, 1)
    assert problems.counts == {"bad file": 1, "no image size": 1}
    imported = FeatureStore(tmp_path / "imported")
    uniter = imported[9]
    assert (uniter["image_h"], uniter["image_w"]) == (1, 1)
    np.testing.assert_allclose(uniter["normalized_boxes"][0], [0.1, 0.2, 0.5, 0.6], rtol=1e-6)
    expected_probs = soft[:, 1:] / soft[:, 1:].sum(axis=1, keepdims=True)
    np.testing.assert_allclose(uniter["object_probs"], expected_probs, atol=1e-3)
    np.testing.assert_array_equal(uniter["object_ids"], expected_probs.argmax(axis=1))
    np.testing.assert_array_equal(uniter["attr_ids"], [-1, -1, -1])
    butd = imported[10]
    np.testing.assert_array_equal(butd["boxes"][0], [1, 2, 30, 40])
    assert (butd["image_h"], butd["image_w"]) == (100, 80) and "object_probs" not in butd
    np.testing.assert_array_equal(butd["object_ids"], [-1, -1])


def test_convert_cli(tmp_path, capsys):
    records = {key: value for key, value in sample_records(6, seed=13).items() if isinstance(key, int)}
    write_store(tmp_path / "s", records)
    tsv = tmp_path / "feats.tsv"
    assert vl_regions(["convert", str(tmp_path / "s"), "--to", "lxmert-tsv", str(tsv)]) == 0
    assert f"exported {len(records)} images" in capsys.readouterr().out
    names = tmp_path / "objects_vocab.txt"
    names.write_text("\n".join(f"thing {i}" for i in range(CLASSES)) + "\n")
    code = vl_regions(
        [
            "convert",
            "--from",
            "lxmert-tsv",
            str(tsv),
            "--out",
            str(tmp_path / "back"),
            "--class-names",
            str(names),
            "--num-attributes",
            str(ATTRS),
        ]
    )
    assert code == 0 and f"imported {len(records)} images" in capsys.readouterr().out
    back = FeatureStore(tmp_path / "back")
    assert back.meta["class_names"][1] == "thing 1" and back.ids() == list(records)
    for image_id, expected in records.items():
        assert_same(back[image_id], expected, with_probs=False)
    assert vl_regions(["convert", str(tmp_path / "back"), "--to", "npz-dir", "--out", str(tmp_path / "npz")]) == 0
    assert len(list((tmp_path / "npz").glob("*.npz"))) == len(records)
    for argv, message in (
        (["convert", str(tsv), "--out", str(tmp_path / "x")], "give exactly one of --from"),
        (["convert", "--from", "lxmert-tsv", str(tsv)], "needs --out STORE"),
        (["convert", "--from", "lxmert-tsv", str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "x")], "nope.tsv"),
        (["convert", str(tmp_path / "s"), "--to", "lxmert-tsv"], "takes STORE and one OUT"),
        (["convert", str(tmp_path / "s"), "--to", "parquet", str(tsv)], "--to parquet: unknown format"),
        (["convert", str(tmp_path / "missing"), "--to", "lxmert-tsv", str(tsv)], "missing does not exist"),
        (
            ["convert", "--from", "lxmert-tsv", str(tsv), "--out", str(tmp_path / "s"), "--num-classes", "7"],
            "has num_classes=6, but 7",
        ),
    ):
        assert vl_regions(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("vl-regions convert: error:") and message in err, err
