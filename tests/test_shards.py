"""Shard streaming: pattern expansion, caption sources, faults, worker splitting, exact resume."""

import io
import json
import tarfile

import pytest
import torch
from torch.utils.data import DataLoader

from region_features.ids import expand_shards
from vl.data.shards import ShardStream, StreamConfig, read_shard_records, strip_meta, FaultCounter
from vl.errors import UserError


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, payload in members.items():
                data = payload if isinstance(payload, bytes) else payload.encode()
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shards(tmp_path):
    paths = []
    image_id = 0
    for shard in range(4):
        samples = []
        for _ in range(10):
            meta = {"image_id": image_id, "captions": [f"caption {image_id} a", f"caption {image_id} b"]}
            samples.append((f"{shard:04d}{image_id:04d}", {"jpg": b"\xff\xd8notreallyajpeg",
                                                           "txt": f"caption {image_id} a", "json": json.dumps(meta)}))
            image_id += 1
        path = tmp_path / f"train-{shard:06d}.tar"
        write_shard(path, samples)
        paths.append(str(path))
    return paths


def ids_batch(records, index, generator):
    return {"image_ids": torch.tensor([r.image_id for r in records]),
            "noise": torch.rand(len(records), generator=generator)}


def test_expand_shard_patterns(shards, tmp_path):
    assert expand_shards(str(tmp_path / "train-{000000..000003}.tar")) == shards
    assert expand_shards(str(tmp_path / "train-*.tar")) == shards
    assert expand_shards(str(tmp_path)) == shards
    with pytest.raises(UserError, match="000009"):
        expand_shards(str(tmp_path / "train-{000000..000009}.tar"))
    with pytest.raises(UserError, match="matches no files"):
        expand_shards(str(tmp_path / "val-*.tar"))


def test_caption_sources_and_image_ids(shards):
    faults = FaultCounter(0, "test")
    from_json = list(read_shard_records(shards[0], "json", faults))
    from_txt = list(read_shard_records(shards[0], "txt", faults))
    assert len(from_json) == 20 and len(from_txt) == 10
    assert from_json[0].image_id == 0 and from_json[1].caption == "caption 0 b"


def test_faults_are_counted_and_skipped(tmp_path):
    write_shard(tmp_path / "bad.tar", [
        ("a", {"json": "{not json", "txt": "x"}),
        ("b", {"json": json.dumps({"image_id": 7})}),  # no caption anywhere
        ("c", {"txt": "a fine caption"}),
    ])
    faults = FaultCounter(0, "test")
    records = list(read_shard_records(str(tmp_path / "bad.tar"), "json", faults, warn=False))
    assert [r.key for r in records] == ["c"] and records[0].image_id == "c"
    assert faults.counts == {"bad_json": 1, "missing_caption": 1}
    strict = FaultCounter(2, "test")
    with pytest.raises(UserError, match="consecutive"):
        list(read_shard_records(str(tmp_path / "bad.tar"), "json", strict, warn=False))


def collect(stream, num_workers, steps):
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == steps:
            break
    return batches


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_sample_once_per_epoch(shards, num_workers):
    cfg = StreamConfig(batch_size=5, shuffle_buffer=8, epochs=1, drop_last=False)
    batches = collect(ShardStream(shards, cfg, ids_batch, seed=3), num_workers, steps=10_000)
    seen = torch.cat([b["image_ids"] for b in batches]).tolist()
    assert sorted(seen) == sorted([i for i in range(40) for _ in range(2)])


@pytest.mark.parametrize("bucket_pool", [0, 200])
def test_shards_smaller_than_a_batch_fail_instead_of_waiting_forever(shards, bucket_pool):
    cfg = StreamConfig(batch_size=100, shuffle_buffer=8, epochs=0, bucket_pool=bucket_pool)  # 80 samples
    with pytest.raises(UserError, match="80 samples, fewer than one full batch of 100"):
        collect(ShardStream(shards, cfg, ids_batch, seed=0, length_of=lambda record: 1), num_workers=0, steps=1)


def test_resume_replays_exactly_with_workers(shards):
    cfg = StreamConfig(batch_size=4, shuffle_buffer=16, epochs=0)
    full = collect(ShardStream(shards, cfg, ids_batch, seed=1), num_workers=2, steps=30)
    first = full[:11]
    consumed = {}
    for batch in first:
        consumed[batch["_worker"]] = batch["_index"] + 1
    resumed_stream = ShardStream(shards, cfg, ids_batch, seed=1)
    resumed_stream.resume_from(consumed)
    rest = collect(resumed_stream, num_workers=2, steps=19)
    assert [(b["_worker"], b["_index"]) for b in rest] == [(b["_worker"], b["_index"]) for b in full[11:]]
    for a, b in zip(full[11:], rest):
        assert torch.equal(a["image_ids"], b["image_ids"]) and torch.equal(a["noise"], b["noise"])


def test_fewer_shards_than_workers_splits_samples(shards):
    cfg = StreamConfig(batch_size=5, shuffle_buffer=0, epochs=1, drop_last=False, shuffle_shards=False)
    batches = collect(ShardStream(shards[:1], cfg, ids_batch, seed=0), num_workers=2, steps=10_000)
    per_worker = {w: torch.cat([b["image_ids"] for b in batches if b["_worker"] == w]).tolist() for w in (0, 1)}
    assert per_worker[0] and per_worker[1]
    assert sorted(per_worker[0] + per_worker[1]) == sorted([i for i in range(10) for _ in range(2)])


def test_strip_meta_separates_bookkeeping(shards):
    batch = next(iter(ShardStream(shards, StreamConfig(batch_size=2), ids_batch)))
    tensors, meta = strip_meta(batch)
    assert set(tensors) == {"image_ids", "noise"} and set(meta) == {"_worker", "_index", "_ordinal", "_faults"}
