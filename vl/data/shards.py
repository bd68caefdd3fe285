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

Per-sample faults (a missing caption, unreadable JSON, a truncated tar, and whatever ``check_record`` rejects, e.g.
an image without features in the store) are warned, counted and skipped; the counts travel with every batch as
``_faults`` so that the main process can summarise them. ``max_consecutive_faults`` consecutive failures stop the
stream with an error.

A "shard" may also be a COCO captions JSON file (``{"annotations": [{"image_id", "caption"}, ...]}``): it is read
as one shard whose records are its annotations in file order.

Each batch also carries ``_ordinal``: its position in the rank's round-robin batch order (the DataLoader takes
worker 0's first batch, then worker 1's, ...), i.e. ``yielded * num_workers + worker``. It is the same on every
rank for the same training step, so a ``make_batch`` that accepts an ``ordinal`` keyword can derive per-step
choices from it (e.g. which pretraining task a batch serves) that all ranks agree on without communicating.

With ``bucket_pool`` > 0, records are gathered into pools of that many, sorted by ``length_of(record)`` (token
count) and cut into batches of similar lengths (of ``batch_size`` records, or as many as fit ``max_tokens`` padded
tokens), whose order is then shuffled: UNITER's length bucketing, on a stream.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from region_features.ids import image_id_of
from vl.data.seeds import stable_seed
from vl.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class CaptionRecord:
    """One (image, caption) pair read from a shard, or an image question with its answers (``answers``)."""

    image_id: int | str
    caption: str
    key: str
    shard: str
    answers: tuple[tuple[int, float], ...] | None = None  # a question's (answer index, soft score); None: a caption


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


def _answer_targets(value: Any) -> tuple[tuple[int, float], ...] | None:
    """``[[answer index, score], ...]`` as a tuple of (int, float); None when malformed."""
    if not isinstance(value, list):
        return None
    pairs = []
    for pair in value:
        if (not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], int) or pair[0] < 0
                or not isinstance(pair[1], (int, float)) or not 0.0 <= pair[1] <= 1.0):
            return None
        pairs.append((int(pair[0]), float(pair[1])))
    return tuple(pairs)


def read_caption_json_records(path: str, faults: FaultCounter, warn: bool = True) -> Iterator[CaptionRecord]:
    """Caption records of a COCO captions JSON file (``annotations`` with ``image_id`` and ``caption``), in order.

    An annotation that also has ``answer_targets`` (``[[answer index, score in [0, 1]], ...]``) is an image
    question for the ``qa`` objective (``vl.train.pretrain_vl.write_question_sources`` writes such files). An
    unreadable or malformed file is a UserError naming it; an annotation without a usable caption or image id is
    a ``missing_caption`` fault, one with malformed ``answer_targets`` a ``bad_answers`` fault.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as err:
        raise UserError(f"captions file {path} is not readable JSON: {str(err).splitlines()[0]}") from None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise UserError(f"captions file {path} has no 'annotations' list (expected COCO captions JSON)")
    for position, annotation in enumerate(annotations):
        caption = annotation.get("caption") if isinstance(annotation, dict) else None
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        if not isinstance(caption, str) or not caption.strip() or not isinstance(image_id, (int, str)):
            faults.fault("missing_caption", f"{path}: annotation {position} has no caption or image_id", warn)
            continue
        key = str(annotation.get("id", position))
        answers = None
        if "answer_targets" in annotation:
            answers = _answer_targets(annotation["answer_targets"])
            if answers is None:
                faults.fault("bad_answers", f"{path}: annotation {position} has malformed answer_targets "
                                            "(expected [[answer index, score in [0, 1]], ...])", warn)
                continue
        yield CaptionRecord(image_id_of(key, {"image_id": image_id}), caption.strip(), key, path, answers)


def read_records(shard: str, caption_source: str, faults: FaultCounter, warn: bool = True) -> Iterator[CaptionRecord]:
    """Caption records of a tar shard (``read_shard_records``) or a COCO captions ``.json`` file."""
    if shard.lower().endswith(".json"):
        return read_caption_json_records(shard, faults, warn)
    return read_shard_records(shard, caption_source, faults, warn)


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
    bucket_pool: int = 0  # length bucketing: records sorted by length in pools of this many; 0: off
    max_tokens: int = 0  # with bucketing: at most this many padded tokens per batch (and batch_size records); 0: off
    # read a consumer's shards side by side, a record from each in turn (every shard open at once), instead of one
    # after another: sources of different kinds (captions, questions) then mix from the first batch
    interleave: bool = False

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.caption_source not in ("json", "txt"):
            raise ValueError(f"caption_source must be 'json' or 'txt', got {self.caption_source!r}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.bucket_pool < 0 or self.max_tokens < 0:
            raise ValueError(f"bucket_pool and max_tokens must be >= 0, got {self.bucket_pool}, {self.max_tokens}")
        if self.max_tokens and not self.bucket_pool:
            raise ValueError("max_tokens needs length bucketing (bucket_pool > 0)")
        if self.bucket_pool and self.bucket_pool < self.batch_size:
            raise ValueError(f"bucket_pool {self.bucket_pool} must hold at least one batch ({self.batch_size})")


class ShardStream(IterableDataset):
    """Batches from image-caption shards, split by rank and worker, with an exact resumable position.

    make_batch(records, batch_index, generator[, ordinal=...]) -> dict of tensors, or None to skip the batch (e.g.
    every record unreadable). It runs in the worker, after the replay point, so expensive work (store reads,
    tokenisation, masking) is never done for batches that a resumed run has already consumed. It receives the
    batch's ``ordinal`` (see the module docstring) when its signature has that parameter.
    check_record(record) -> None, or (kind, message) to skip the record as a fault of that kind (e.g. no features
    in the store). It also runs while replaying, so it should be cheap (an index lookup, not a read).
    length_of(record) -> int: the record's token count, for length bucketing (``cfg.bucket_pool``).
    """

    def __init__(self, shards: list[str], cfg: StreamConfig, make_batch: Callable[..., dict | None], seed: int = 0,
                 rank: int = 0, world_size: int = 1,
                 check_record: Callable[[CaptionRecord], tuple[str, str] | None] | None = None,
                 length_of: Callable[[CaptionRecord], int] | None = None):
        super().__init__()
        if not shards:
            raise UserError("no shards to read")
        self.shards = list(shards)
        self.cfg = cfg
        self.make_batch = make_batch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.check_record = check_record
        self.length_of = length_of
        if cfg.bucket_pool and length_of is None:
            raise UserError("length bucketing (bucket_pool > 0) needs a length_of function")
        self.start: dict[int, int] = {}  # worker id -> batches already consumed (by batch index)
        self.yielded: dict[int, int] | None = None  # worker id -> batches it yielded that were consumed
        try:
            self._takes_ordinal = "ordinal" in inspect.signature(make_batch).parameters
        except (TypeError, ValueError):
            self._takes_ordinal = False

    def resume_from(self, consumed: dict[int, int] | dict[str, int],
                    yielded: dict[int, int] | dict[str, int] | None = None) -> None:
        """Skip, per worker, the batches a previous run consumed.

        consumed: ``{worker: _index + 1}`` of the last batch consumed from each worker.
        yielded: ``{worker: batches consumed from it}``; differs from ``consumed`` only when ``make_batch`` skipped
        batches (returned None). It sets where the round-robin order continues and the ordinals; without it,
        ``consumed`` is used.
        """
        self.start = {int(k): int(v) for k, v in consumed.items()}
        self.yielded = {int(k): int(v) for k, v in yielded.items()} if yielded is not None else None

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
            per_shard = [enumerate(read_records(shard, self.cfg.caption_source, faults, warn=not replaying()))
                         for shard in shards]  # generators: a shard is opened when first read
            for position, record in _round_robin(per_shard) if self.cfg.interleave else itertools.chain(*per_shard):
                if keep_every > 1 and position % keep_every != keep_offset:
                    continue
                if self.check_record is not None:
                    problem = self.check_record(record)
                    if problem is not None:
                        faults.fault(problem[0], problem[1], warn=not replaying())
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

    def _bucketed(self, pool: list[CaptionRecord], rng: random.Random, final: bool
                  ) -> tuple[list[list[CaptionRecord]], list[CaptionRecord]]:
        """Cut a pool into batches of similar length, in shuffled order; returns (batches, records carried over).

        Unless ``final`` (the epoch's end), the last batch is carried over into the next pool, so that every batch
        but an epoch's last is full.
        """
        lengths = [self.length_of(record) for record in pool]
        order = sorted(range(len(pool)), key=lambda i: lengths[i])  # stable: ties keep stream order
        batches: list[list[CaptionRecord]] = []
        current: list[CaptionRecord] = []
        longest = 0
        for i in order:
            grown = max(longest, lengths[i])
            too_many_tokens = self.cfg.max_tokens and current and grown * (len(current) + 1) > self.cfg.max_tokens
            if len(current) >= self.cfg.batch_size or too_many_tokens:
                batches.append(current)
                current, grown = [], lengths[i]
            current.append(pool[i])
            longest = grown
        carry: list[CaptionRecord] = []
        if final:
            if current and not self.cfg.drop_last:
                batches.append(current)
        else:
            carry = current
        rng.shuffle(batches)
        return batches, carry

    def _record_batches(self, worker: int, num_workers: int, faults: FaultCounter, replaying: Callable[[], bool]
                        ) -> Iterator[list[CaptionRecord]]:
        """This consumer's batches of records, in order (before ``make_batch``)."""
        pending: list[CaptionRecord] = []
        pool_size = self.cfg.bucket_pool
        epoch, pool_number = 0, 0
        samples = batches_made = 0  # this epoch's
        for next_epoch, record in self._records(worker, num_workers, faults, replaying):
            if record is not None:
                pending.append(record)
                samples += 1
                faults.ok()
                if pool_size:
                    if len(pending) >= pool_size:
                        rng = random.Random(f"{self.seed}-buckets-{epoch}-{self.rank}-{worker}-{pool_number}")
                        pool_number += 1
                        batches, pending = self._bucketed(pending, rng, final=False)
                        batches_made += len(batches)
                        yield from batches
                elif len(pending) >= self.cfg.batch_size:
                    batches_made += 1
                    yield pending
                    pending = []
                continue
            if pool_size:  # the epoch's end: flush the pool
                rng = random.Random(f"{self.seed}-buckets-{epoch}-{self.rank}-{worker}-end")
                batches, _ = self._bucketed(pending, rng, final=True)
                batches_made += len(batches)
                yield from batches
            elif pending and not self.cfg.drop_last:
                batches_made += 1
                yield pending
            if batches_made == 0:  # every later epoch would be as empty: the stream would wait forever
                raise UserError(f"rank {self.rank} worker {worker}: an epoch of the shards holds {samples} samples, "
                                f"fewer than one full batch of {self.cfg.batch_size}; lower the batch size "
                                f"(train.batch_size) or add data")
            pending = []
            epoch, pool_number = next_epoch, 0
            samples = batches_made = 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from its workers in turn, starting at worker 0. A fresh run's batch g comes
        # from worker g % n; a resumed run that consumed C batches must start at worker C % n, so rotate.
        yielded_before = self.yielded if self.yielded is not None else self.start
        worker = (loader_worker + sum(yielded_before.values())) % num_workers
        skip = self.start.get(worker, 0)
        yielded = yielded_before.get(worker, 0)
        faults = FaultCounter(self.cfg.max_consecutive_faults, f"rank {self.rank} worker {worker}")
        batch_index = 0

        def replaying() -> bool:
            return batch_index < skip

        for records in self._record_batches(worker, num_workers, faults, replaying):
            index = batch_index
            batch_index += 1
            if index < skip:
                continue  # replaying a consumed batch: no store reads, no masking
            generator = torch.Generator().manual_seed(stable_seed(self.seed, self.rank, worker, index))
            ordinal = yielded * num_workers + worker
            if self._takes_ordinal:
                batch = self.make_batch(records, index, generator, ordinal=ordinal)
            else:
                batch = self.make_batch(records, index, generator)
            if batch is None:
                continue
            yielded += 1
            batch["_worker"] = worker
            batch["_index"] = index
            batch["_ordinal"] = ordinal
            batch["_faults"] = dict(faults.counts)
            yield batch


def _round_robin(iterators: list[Iterator[Any]]) -> Iterator[Any]:
    """One item from each iterator in turn, dropping each when it runs out."""
    active = list(iterators)
    while active:
        still = []
        for iterator in active:
            item = next(iterator, _DONE)
            if item is not _DONE:
                still.append(iterator)
                yield item
        active = still


_DONE = object()


def strip_meta(batch: dict) -> tuple[dict, dict[str, Any]]:
    """Split a stream batch into its tensors and its ``_``-prefixed bookkeeping (worker, index, faults)."""
    meta = {k: batch[k] for k in list(batch) if k.startswith("_")}
    return {k: v for k, v in batch.items() if not k.startswith("_")}, meta


def env_rank() -> tuple[int, int]:
    """(rank, world size) from torch.distributed or the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
