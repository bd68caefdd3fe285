"""Image-caption shards (img2dataset layout) streamed with exact, resumable positions.

A shard is a webdataset tar: ``KEY.jpg`` (or png/webp), ``KEY.txt`` (caption), ``KEY.json`` (metadata that may
hold ``image_id`` and a ``captions`` list). Shard lists are brace patterns (``train-{000000..000009}.tar``), globs,
or a directory.

``ShardStream`` is an ``IterableDataset`` that forms whole batches inside each DataLoader worker:

1. the shard list is shuffled per epoch with a seed, then split across ranks and workers by webdataset's rule
   (``split_by_node`` then ``split_by_worker``: every world-th shard, then every n-th of those), applied to the
   logical worker id so that a resumed run can rotate workers; when there are fewer shards than consumers, every
   consumer reads every shard and keeps every n-th sample instead, so no worker idles;
2. samples are read without decoding images (region features come from the store), expanded to one record per
   caption, shuffled through a seeded buffer, and grouped into batches of ``batch_size`` records;
3. ``make_batch(records, batch_index, generator)`` turns a list of records into a batch dict of tensors; its
   generator is seeded by (seed, rank, worker, batch index), so a batch's masking does not depend on what ran
   before it.

Each batch carries ``_worker`` and ``_index``; the training loop records, per worker, how many batches it consumed,
and ``ShardStream.resume_from(state)`` makes every worker replay its stream cheaply (reading metadata only, no
store reads and no masking) up to that point, and rotates the workers so that the batch order continues where it
stopped. The replay is exact — the same shuffles, batches and masks in the same order — as long as the number of
workers is the same as in the run that saved the state.

Per-sample faults (a missing caption, unreadable JSON, a truncated tar) are warned, counted and skipped; the counts
travel with every batch as ``_faults`` so that the main process can summarise them. ``max_consecutive_faults``
consecutive failures stop the stream with an error.
"""

from __future__ import annotations

import glob
import json
import os
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

from vl.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_shards(pattern: str) -> list[str]:
    """A shard list from a brace pattern, a glob, a directory (its ``*.tar``) or one file; errors name the pattern."""
    path = Path(pattern)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise UserError(f"shard directory {pattern} holds no .tar files")
        return shards
    if any(ch in pattern for ch in "{}"):
        shards = list(braceexpand(pattern))
    elif any(ch in pattern for ch in "*?["):
        shards = sorted(glob.glob(pattern))
        if not shards:
            raise UserError(f"shard pattern {pattern} matches no files")
    else:
        shards = [pattern]
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"shard {missing[0]} from {pattern} does not exist{more}")
    return shards


@dataclass(frozen=True)
class CaptionRecord:
    """One (image, caption) pair read from a shard."""

    image_id: int | str
    caption: str
    key: str
    shard: str


def image_id_of(key: str, meta: dict[str, Any]) -> int | str:
    """The sample's JSON ``image_id`` when present, else its key (CLI.md); numeric keys become ints."""
    value = meta.get("image_id", key)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


class FaultCounter:
    """Counts skipped samples by kind and stops after too many consecutive failures."""

    def __init__(self, max_consecutive: int, where: str):
        self.counts: dict[str, int] = {}
        self.consecutive = 0
        self.max_consecutive = max_consecutive
        self.where = where

    def ok(self) -> None:
        self.consecutive = 0

    def fault(self, kind: str, message: str, warn: bool = True) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.consecutive += 1
        if warn:
            print(f"warning: {message} (skipped)", file=sys.stderr)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise UserError(f"{self.consecutive} consecutive bad samples in {self.where}; last: {message}")


def read_shard_records(shard: str, caption_source: str, faults: FaultCounter, warn: bool = True
                       ) -> Iterator[CaptionRecord]:
    """Caption records of one shard in file order; image bytes are skipped, not decoded.

    caption_source: "txt" (the ``.txt`` member) or "json" (every caption in the JSON ``captions`` list, falling
    back to ``.txt`` when the list is absent).
    """

    def handler(err: Exception) -> bool:
        faults.fault("unreadable_shard", f"{shard}: {err}", warn)
        return False  # stop reading this shard; the rest of the stream goes on

    def keep(name: str) -> bool:
        return name.rsplit(".", 1)[-1].lower() in ("txt", "json")

    try:
        stream = open(shard, "rb")  # noqa: SIM115 (closed by the with block below)
    except OSError as err:
        faults.fault("unreadable_shard", f"{shard}: {err}", warn)
        return
    with stream:
        members = wds.tariterators.tar_file_expander([{"url": shard, "stream": stream}], handler=handler,
                                                     select_files=keep)
        for sample in wds.tariterators.group_by_keys(members, handler=handler):
            key = sample["__key__"]
            try:
                meta = json.loads(sample["json"]) if "json" in sample else {}
                if not isinstance(meta, dict):
                    raise ValueError("metadata is not a JSON object")
            except (ValueError, UnicodeDecodeError) as err:
                faults.fault("bad_json", f"{shard}:{key}.json: {err}", warn)
                continue
            captions: list[str] = []
            if caption_source == "json" and isinstance(meta.get("captions"), list):
                captions = [c for c in meta["captions"] if isinstance(c, str) and c.strip()]
            if not captions and "txt" in sample:
                text = sample["txt"].decode("utf-8", errors="replace").strip()
                captions = [text] if text else []
            if not captions:
                faults.fault("missing_caption", f"{shard}:{key} has no caption", warn)
                continue
            image_id = image_id_of(key, meta)
            for caption in captions:
                yield CaptionRecord(image_id, caption, key, shard)


@dataclass(frozen=True)
class StreamConfig:
    batch_size: int = 32  # records per batch, per rank
    shuffle_buffer: int = 1000  # records in the shuffle buffer; 0 or 1: no shuffling
    shuffle_shards: bool = True  # reshuffle the shard order every epoch
    epochs: int = 0  # passes over the data; 0: endless
    caption_source: str = "json"  # "json": every caption in KEY.json's list; "txt": KEY.txt only
    max_consecutive_faults: int = 100  # stop after this many bad samples in a row; 0: never
    drop_last: bool = True  # drop an epoch's incomplete last batch (keeps every batch the same size)

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.caption_source not in ("json", "txt"):
            raise ValueError(f"caption_source must be 'json' or 'txt', got {self.caption_source!r}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")


class ShardStream(IterableDataset):
    """Batches from image-caption shards, split by rank and worker, with an exact resumable position.

    make_batch(records, batch_index, generator) -> dict of tensors, or None to skip the batch (e.g. every
    record's features missing). It runs in the worker, after the replay point, so expensive work (store reads,
    tokenisation, masking) is never done for batches that a resumed run has already consumed.
    """

    def __init__(self, shards: list[str], cfg: StreamConfig, make_batch: Callable[..., dict | None], seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        if not shards:
            raise UserError("no shards to read")
        self.shards = list(shards)
        self.cfg = cfg
        self.make_batch = make_batch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start: dict[int, int] = {}  # worker id -> batches already consumed

    def resume_from(self, consumed: dict[int, int] | dict[str, int]) -> None:
        """Skip, per worker, the batches a previous run consumed (``{worker: count}`` from the loop's state)."""
        self.start = {int(k): int(v) for k, v in consumed.items()}

    def _my_shards(self, epoch: int, worker: int, num_workers: int) -> tuple[list[str], int, int]:
        """This consumer's shards for an epoch, and (keep_every, keep_offset) for sample-level splitting."""
        order = list(self.shards)
        if self.cfg.shuffle_shards:
            random.Random(f"{self.seed}-shards-{epoch}").shuffle(order)
        consumers = self.world_size * num_workers
        if len(order) >= consumers:
            # webdataset's rule (split_by_node, then split_by_worker): islice(rank, world) then islice(worker, n).
            # Applied here with the *logical* worker id, which a resumed run rotates (see __iter__).
            return order[self.rank::self.world_size][worker::num_workers], 1, 0
        return order, consumers, self.rank * num_workers + worker

    def _records(self, worker: int, num_workers: int, faults: FaultCounter, replaying: Callable[[], bool]
                 ) -> Iterator[tuple[int, CaptionRecord]]:
        epoch = 0
        while self.cfg.epochs == 0 or epoch < self.cfg.epochs:
            shards, keep_every, keep_offset = self._my_shards(epoch, worker, num_workers)
            rng = random.Random(f"{self.seed}-buffer-{epoch}-{self.rank}-{worker}")
            buffer: list[CaptionRecord] = []
            produced = 0
            for shard in shards:
                for position, record in enumerate(read_shard_records(shard, self.cfg.caption_source, faults,
                                                                     warn=not replaying())):
                    if keep_every > 1 and position % keep_every != keep_offset:
                        continue
                    produced += 1
                    if self.cfg.shuffle_buffer > 1:
                        buffer.append(record)
                        if len(buffer) >= self.cfg.shuffle_buffer:
                            index = rng.randrange(len(buffer))
                            buffer[index], buffer[-1] = buffer[-1], buffer[index]
                            yield epoch, buffer.pop()
                    else:
                        yield epoch, record
            rng.shuffle(buffer)
            for record in buffer:
                yield epoch, record
            if produced == 0:
                if epoch == 0:
                    raise UserError(f"worker {worker} of rank {self.rank} found no readable samples in "
                                    f"{len(shards)} shard(s), e.g. {shards[0] if shards else '(none)'}")
                return
            epoch += 1
            yield epoch, None  # epoch boundary marker

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from its workers in turn, starting at worker 0. A fresh run's batch g comes
        # from worker g % n; a resumed run that consumed C batches must start at worker C % n, so rotate.
        worker = (loader_worker + sum(self.start.values())) % num_workers
        skip = self.start.get(worker, 0)
        faults = FaultCounter(self.cfg.max_consecutive_faults, f"rank {self.rank} worker {worker}")
        batch_index = 0
        pending: list[CaptionRecord] = []

        def replaying() -> bool:
            return batch_index < skip

        for _, record in self._records(worker, num_workers, faults, replaying):
            if record is not None:
                pending.append(record)
                faults.ok()
                if len(pending) < self.cfg.batch_size:
                    continue
            elif not pending or self.cfg.drop_last:
                pending = []
                continue
            records, pending = pending, []
            index = batch_index
            batch_index += 1
            if index < skip:
                continue  # replaying a consumed batch: no store reads, no masking
            generator = torch.Generator().manual_seed(hash_seed(self.seed, self.rank, worker, index))
            batch = self.make_batch(records, index, generator)
            if batch is None:
                continue
            batch["_worker"] = worker
            batch["_index"] = index
            batch["_faults"] = dict(faults.counts)
            yield batch


def hash_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() is salted per process for strings)."""
    value = 1469598103934665603
    for part in parts:
        value = ((value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return value


def strip_meta(batch: dict) -> tuple[dict, dict[str, Any]]:
    """Split a stream batch into its tensors and its ``_``-prefixed bookkeeping (worker, index, faults)."""
    meta = {k: batch[k] for k in list(batch) if k.startswith("_")}
    return {k: v for k, v in batch.items() if not k.startswith("_")}, meta


def env_rank() -> tuple[int, int]:
    """(rank, world size) from torch.distributed or the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
