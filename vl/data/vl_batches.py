"""VL pretraining batches from image-caption shards (or COCO captions JSON) joined with a region feature store.

The pipeline, per DataLoader worker (``vl.data.shards.ShardStream`` does the reading, splitting and batching):

1. caption records are read from the shards; a record whose image has no features in the store is a
   ``missing_features`` fault (warned, counted, skipped, like a missing caption);
2. ``PretrainBatchMaker`` picks the batch's task (below), tokenises the captions (``max_text_len``), reads the
   regions of each image from the store (at most ``max_regions``), pads them to the batch's largest count (or to
   ``max_regions`` with ``pad_regions: fixed``), turns the normalised boxes into the model's box geometry, and
   applies the task's ITM negatives and masking (``vl.data.vl_masking.prepare_vl_batch``; in a batch that
   serves both, mismatched pairs are masked too, without targets: ``mask_mismatched_inputs``);
3. ``PretrainStream`` (the training loop's data) runs the DataLoader, strips the bookkeeping keys and records,
   per worker, how many batches were consumed; its ``state_dict`` is the data position of a checkpoint.

Batch keys (B captions, T tokens, R regions, D feature width, G geometry width, C detector classes):
``input_ids``, ``attention_mask``, ``token_type_ids`` (B, T); ``region_feats`` (B, R, D) float32;
``region_boxes`` (B, R, G) (G = 4 normalised x1, y1, x2, y2 when the model reads no boxes); ``region_mask`` (B, R);
``image_ids`` (B,) long (string ids hashed); ``task``: the task name (a str); and the targets of the task's
objectives (``itm_labels``, ``mlm_labels``, ``mrm_mask``, ``mrm_feat_targets``, ``mrm_class_targets``,
``mrm_class_probs`` (B, R, C); see ``vl.data.vl_masking``; with image questions ``answer_targets`` (B, A) and
``has_answer`` (B,) for ``qa``).

Tasks. ``mix: sample`` (UNITER's MetaLoader): every batch serves ONE objective, drawn with probability
proportional to its ``mix`` ratio from a generator seeded by (seed, the batch's ordinal). The ordinal is the
batch's position in its rank's round-robin order (``ShardStream``), the same on every rank at the same step,
so all ranks agree on the task without communicating, and a resumed run draws the same tasks. ``mix: sum``
prepares every batch for all objectives at once (negatives, and text or regions masked per sample) and the loop
sums every objective's loss at every step (LXMERT).
"""

from __future__ import annotations

import random
import sys
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from vl.data.seeds import stable_seed
from vl.data.shards import CaptionRecord, ShardStream, StreamConfig, strip_meta
from vl.data.vl_masking import (
    MaskingVocab,
    hide_tags,
    VLBatchPlan,
    VLMaskingConfig,
    grounded_token_ids,
    mask_region_features,
    mask_text_tokens,
    prepare_vl_batch,
)
from vl.errors import UserError

SUM_TASK = "all"  # the task name of a batch prepared for every objective (mix: sum)


@dataclass(frozen=True)
class PretrainDataConfig:
    """The ``data:`` section of a pretraining run config (the batch size is ``train.batch_size``)."""

    num_workers: int = 2  # DataLoader worker processes per rank; resuming needs the same number
    prefetch_factor: int = 4  # batches each worker prepares ahead
    shuffle_buffer: int = 2000  # caption records in each worker's shuffle buffer; 0 or 1: no shuffling
    shuffle_shards: bool = True  # reshuffle the shard order every epoch
    epochs: int = 0  # passes over the data; 0: endless (the run ends at train.steps)
    caption_source: Literal["json", "txt"] = "json"  # every caption of KEY.json's list, or KEY.txt only
    max_consecutive_faults: int = 100  # stop (after saving a checkpoint) after this many bad samples in a row
    max_text_len: int = 40  # tokens per caption, [CLS] and [SEP] included
    max_regions: int = 100  # regions kept per image (the store's first ones)
    pad_regions: Literal["batch", "fixed"] = "batch"  # pad regions to the batch's largest count, or to max_regions
    bucket_pool: int = 0  # UNITER-style length bucketing: sort pools of this many captions by length; 0: off
    max_tokens: int = 0  # with bucketing: at most this many padded text tokens per batch; 0: train.batch_size only
    mix: Literal["sample", "sum"] = "sample"  # one task per batch drawn by mix ratio, or every objective every step
    masking: VLMaskingConfig = field(default_factory=VLMaskingConfig)

    def __post_init__(self):
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.max_text_len < 3:
            raise ValueError(f"max_text_len must be at least 3 ([CLS] word [SEP]), got {self.max_text_len}")
        if self.max_regions < 1:
            raise ValueError(f"max_regions must be positive, got {self.max_regions}")
        if self.max_consecutive_faults < 0:
            raise ValueError(f"max_consecutive_faults must be >= 0, got {self.max_consecutive_faults}")

    def stream_config(self, batch_size: int) -> StreamConfig:
        return StreamConfig(batch_size=batch_size, shuffle_buffer=self.shuffle_buffer,
                            shuffle_shards=self.shuffle_shards, epochs=self.epochs, caption_source=self.caption_source,
                            max_consecutive_faults=self.max_consecutive_faults, drop_last=True,
                            bucket_pool=self.bucket_pool, max_tokens=self.max_tokens)


class TaskMixer:
    """Which task a batch serves: a pure function of (seed, ordinal), so every rank and every resume agree.

    ``mix`` maps task name -> ratio (> 0). ``sum_all``: every batch is the one task ``"all"``.
    """

    def __init__(self, mix: Mapping[str, float], seed: int, sum_all: bool = False):
        ratios = {name: float(ratio) for name, ratio in mix.items() if float(ratio) > 0}
        if not ratios:
            raise UserError("no objective has a positive mix ratio (objectives.<name>.mix)")
        self.names = list(ratios)
        total = sum(ratios.values())
        self.cumulative = np.cumsum([ratios[name] / total for name in self.names]).tolist()
        self.seed = seed
        self.sum_all = sum_all

    def task_for(self, ordinal: int) -> str:
        if self.sum_all:
            return SUM_TASK
        draw = random.Random(stable_seed(self.seed, 0x7A5C, ordinal)).random()
        for name, edge in zip(self.names, self.cumulative):
            if draw < edge:
                return name
        return self.names[-1]


def _grounded_ids(tokenizer: Any, store: Any) -> tuple[int, ...]:
    """The token ids ``data.masking.grounded_probability`` applies to: the store's class and attribute names."""
    meta = getattr(store, "meta", None) or {}
    names = [*(meta.get("class_names") or ()), *(meta.get("attribute_names") or ())]
    where = f"data.masking.grounded_probability: the feature store {getattr(store, 'root', '')}".rstrip()
    if not names:
        raise UserError(f"{where} names no detector classes or attributes (store.json meta class_names / "
                        "attribute_names); extract it with a detector that has them, or leave the option unset")
    ids = grounded_token_ids(tokenizer, names)
    if not ids:
        raise UserError(f"{where}: none of its {len(names)} class and attribute names ({', '.join(names[:5])}...) "
                        "is a single token of the tokenizer")
    return ids


def numeric_image_id(image_id: int | str) -> int:
    """An int for ``image_ids``: the id itself, or a stable 62-bit hash of a string id."""
    if isinstance(image_id, int):
        return image_id
    data = str(image_id).encode("utf-8")
    return (zlib.crc32(data) << 30) ^ zlib.adler32(data)


class PretrainBatchMaker:
    """``make_batch`` for ``ShardStream``: records -> a pretraining batch for the task of its ordinal.

    tokenizer: ``vl.text.tokenizer.Tokenizer``; store: a ``region_features.store.FeatureStore``; plans: task name ->
    ``VLBatchPlan`` (what the task's objectives need); geometry: the model's ``region.geometry`` ("none" keeps the 4
    normalised corners); with_class_probs: put the detector's class distributions in the batch (MRC / MRC-kl);
    tagger: a ``vl.data.tags.RegionTagger`` for a model with object tags (``region_tag_ids`` / ``_weights``);
    num_answers: > 0 puts ``answer_targets`` (B, num_answers) and ``has_answer`` (B,) in every batch, from the
    records that are image questions (``CaptionRecord.answers``).
    """

    def __init__(self, tokenizer: Any, store: Any, cfg: PretrainDataConfig, mixer: TaskMixer,
                 plans: Mapping[str, VLBatchPlan], geometry: str = "none", with_class_probs: bool = False,
                 tagger: Any = None, num_answers: int = 0):
        self.num_answers = num_answers
        self.tokenizer = tokenizer
        self.store = store
        self.tagger = tagger
        self.cfg = cfg
        self.mixer = mixer
        self.plans = dict(plans)
        self.geometry = geometry
        self.with_class_probs = with_class_probs and getattr(store, "num_classes", 0) > 0
        self.vocab = MaskingVocab.from_tokenizer(tokenizer)
        if cfg.masking.grounded_probability is not None:
            self.vocab = replace(self.vocab, grounded_token_ids=_grounded_ids(tokenizer, store))
        self.feature_dim = int(store.feature_dim)
        self.num_classes = int(getattr(store, "num_classes", 0))

    # ShardStream hooks ------------------------------------------------------------------------------------------
    def check_record(self, record: CaptionRecord) -> tuple[str, str] | None:
        """A record whose image has no features is a ``missing_features`` fault (an index lookup, no read); a
        question whose answer index is outside the run's vocabulary is a ``bad_answers`` fault."""
        largest = max((index for index, _ in record.answers or ()), default=-1)
        if largest >= self.num_answers:
            return ("bad_answers", f"{record.shard}:{record.key}: answer index {largest} is outside the run's "
                                   f"{self.num_answers}-answer vocabulary")
        if record.image_id in self.store:
            return None
        return ("missing_features", f"{record.shard}:{record.key}: image {record.image_id!r} has no features in "
                                    f"{getattr(self.store, 'root', 'the feature store')}")

    def length_of(self, record: CaptionRecord) -> int:
        """The caption's token count, [CLS] and [SEP] included, capped at ``max_text_len`` (length bucketing)."""
        return len(self.tokenizer.encode(record.caption, max_len=self.cfg.max_text_len).ids)

    # the batch ---------------------------------------------------------------------------------------------------
    def _regions(self, records: Sequence[CaptionRecord]) -> tuple[list[int], list[dict[str, np.ndarray]]]:
        kept, regions = [], []
        for position, record in enumerate(records):
            try:
                item = self.store[record.image_id]
            except (KeyError, UserError, ValueError, OSError) as err:  # the store changed or a record is damaged
                print(f"warning: {record.shard}:{record.key}: cannot read features of image {record.image_id!r}: "
                      f"{str(err).splitlines()[0]} (skipped)", file=sys.stderr)
                continue
            kept.append(position)
            regions.append(item)
        return kept, regions

    def collate(self, records: Sequence[CaptionRecord]) -> dict[str, torch.Tensor] | None:
        """Tokenised captions and padded regions of ``records`` (no task, no masking); None when none is readable."""
        kept, regions = self._regions(records)
        if not kept:
            return None
        records = [records[i] for i in kept]
        batch_size = len(records)
        encodings = self.tokenizer.encode_batch([r.caption for r in records], max_len=self.cfg.max_text_len)
        text_len = max(len(e.ids) for e in encodings)
        input_ids = np.full((batch_size, text_len), self.tokenizer.pad_id, dtype=np.int64)
        attention_mask = np.zeros((batch_size, text_len), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            input_ids[row, : len(encoding.ids)] = encoding.ids
            attention_mask[row, : len(encoding.ids)] = 1

        counts = [min(int(item["features"].shape[0]), self.cfg.max_regions) for item in regions]
        num_regions = self.cfg.max_regions if self.cfg.pad_regions == "fixed" else max(1, max(counts))
        feats = np.zeros((batch_size, num_regions, self.feature_dim), dtype=np.float32)
        boxes = np.zeros((batch_size, num_regions, 4), dtype=np.float32)
        region_mask = np.zeros((batch_size, num_regions), dtype=np.int64)
        probs = np.zeros((batch_size, num_regions, self.num_classes), dtype=np.float32) \
            if self.with_class_probs else None
        if self.tagger is not None:
            tag_ids = np.full((batch_size, num_regions, self.tagger.width), self.tokenizer.pad_id, dtype=np.int64)
            tag_weights = np.zeros((batch_size, num_regions, self.tagger.width), dtype=np.float32)
        for row, (item, count) in enumerate(zip(regions, counts)):
            feats[row, :count] = item["features"][:count]
            boxes[row, :count] = np.clip(item["normalized_boxes"][:count], 0.0, 1.0)
            region_mask[row, :count] = 1
            if self.tagger is not None:
                tag_ids[row, :count], tag_weights[row, :count] = self.tagger(item, count)
            if probs is not None:
                if "object_probs" in item:
                    probs[row, :count] = item["object_probs"][:count]
                else:  # no stored distribution: one-hot of the argmax class (unknown: uniform)
                    ids = item["object_ids"][:count]
                    probs[row, :count] = 1.0 / self.num_classes
                    known = ids >= 0
                    probs[row, :count][known] = 0.0
                    probs[row, np.flatnonzero(known), ids[known]] = 1.0

        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "token_type_ids": torch.zeros(batch_size, text_len, dtype=torch.long),
            "region_feats": torch.from_numpy(feats),
            "region_boxes": torch.from_numpy(boxes),
            "region_mask": torch.from_numpy(region_mask),
            "image_ids": torch.tensor([numeric_image_id(r.image_id) for r in records], dtype=torch.long),
        }
        if probs is not None:
            batch["region_class_probs"] = torch.from_numpy(probs)
        if self.tagger is not None:
            batch["region_tag_ids"] = torch.from_numpy(tag_ids)
            batch["region_tag_weights"] = torch.from_numpy(tag_weights)
        if self.num_answers:
            targets = torch.zeros(batch_size, self.num_answers)
            for row, record in enumerate(records):
                for index, score in record.answers or ():
                    targets[row, index] = score
            batch["answer_targets"] = targets
            batch["has_answer"] = torch.tensor([record.answers is not None for record in records])
        return batch

    def __call__(self, records: Sequence[CaptionRecord], batch_index: int, generator: torch.Generator,
                 ordinal: int = 0) -> dict[str, Any] | None:
        batch = self.collate(records)
        if batch is None:
            return None
        task = self.mixer.task_for(ordinal)
        plan = self.plans[task]
        batch = prepare_vl_batch(batch, self.cfg.masking, self.vocab, generator, plan)
        batch = mask_mismatched_inputs(batch, self.cfg.masking, self.vocab, generator, plan)
        batch.pop("region_class_probs", None)  # the targets (mrm_class_*) carry what the objectives need
        if self.geometry != "none":
            from vl.encoders.regions import box_geometry

            batch["region_boxes"] = box_geometry(batch["region_boxes"], self.geometry)
        batch["task"] = task
        return batch


def mask_mismatched_inputs(batch: dict[str, Any], cfg: VLMaskingConfig, vocab: MaskingVocab,
                           generator: torch.Generator, plan: VLBatchPlan) -> dict[str, Any]:
    """Mask the inputs of mismatched pairs as matched ones are masked, without targets (LXMERT's recipe).

    ``prepare_vl_batch`` masks matched pairs only, so in a batch that serves ITM and masked modelling at once a
    pair without any [MASK] or zeroed region would be a mismatched one: the model could read the ITM label off
    the masking. Here mismatched pairs get the same input masking (text or regions, by the same rule), and their
    ``mlm_labels`` / ``mrm_mask`` stay empty, so no masked-modelling loss is computed on them.
    """
    if not (plan.itm_negatives and (plan.mask_text or plan.mask_regions)) or "itm_labels" not in batch:
        return batch
    mismatched = batch["itm_labels"] == 0
    if not bool(mismatched.any()):
        return batch
    out = dict(batch)
    size = mismatched.shape[0]
    text_rows = mismatched if plan.mask_text else torch.zeros(size, dtype=torch.bool)
    region_rows = mismatched if plan.mask_regions else torch.zeros(size, dtype=torch.bool)
    if plan.mask_text and plan.mask_regions and cfg.conditional_masking:
        choose_text = torch.rand(size, generator=generator) < cfg.text_masking_fraction
        text_rows, region_rows = mismatched & choose_text, mismatched & ~choose_text
    if bool(text_rows.any()):
        masked_ids, _ = mask_text_tokens(out["input_ids"], out["attention_mask"], vocab, generator,
                                         cfg.mlm_probability, cfg.mask_token_fraction, cfg.random_token_fraction,
                                         text_rows, cfg.ensure_one_masked, cfg.grounded_probability)
        out["input_ids"] = masked_ids
    if bool(region_rows.any()):
        masked_feats, masked = mask_region_features(out["region_feats"], out["region_mask"], generator,
                                                    cfg.mrm_probability, region_rows, cfg.ensure_one_masked)
        out["region_feats"] = masked_feats
        out = hide_tags(out, masked)
    return out


class PretrainStream:
    """The training loop's data: a DataLoader over a ``ShardStream``, with a resumable position.

    Iterating yields batches without their bookkeeping keys. ``state_dict()`` is the position (per worker: batches
    consumed by index and by count) plus the fault counts; ``load_state_dict`` makes the next iteration continue
    from there, exactly (same batches, masks and tasks), given the same ``num_workers``.
    """

    def __init__(self, stream: ShardStream, num_workers: int, prefetch_factor: int = 2):
        self.stream = stream
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.consumed: dict[int, int] = {}
        self.yielded: dict[int, int] = {}
        self.faults: dict[int, dict[str, int]] = {}
        self.batches = 0
        self._exhausted = False

    def state_dict(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "consumed": dict(self.consumed), "yielded": dict(self.yielded),
                "faults": {worker: dict(counts) for worker, counts in self.faults.items()}, "batches": self.batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state.get("num_workers", -1)) != self.num_workers:
            raise UserError(f"the checkpoint's data position was saved with data.num_workers="
                            f"{state.get('num_workers')}; resume with the same value (now {self.num_workers})")
        self.consumed = {int(k): int(v) for k, v in state["consumed"].items()}
        self.yielded = {int(k): int(v) for k, v in state["yielded"].items()}
        self.faults = {int(k): {str(kind): int(n) for kind, n in v.items()} for k, v in state["faults"].items()}
        self.batches = int(state.get("batches", sum(self.yielded.values())))

    def fault_counts(self) -> dict[str, int]:
        """Samples skipped so far, by kind, summed over workers."""
        total: dict[str, int] = {}
        for counts in self.faults.values():
            for kind, count in counts.items():
                total[kind] = total.get(kind, 0) + count
        return total

    def _loader(self) -> DataLoader:
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs["prefetch_factor"] = self.prefetch_factor
        # Its own generator: making the iterator then draws no number from the global RNG, whose state a
        # checkpoint restores (the batches' randomness comes from ShardStream's per-batch generators).
        generator = torch.Generator().manual_seed(self.stream.seed)
        return DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, generator=generator, **kwargs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._exhausted:
            raise UserError(f"the data ran out after data.epochs={self.stream.cfg.epochs} epoch(s) "
                            f"({self.batches} batches); use data.epochs: 0 (endless) or fewer train.steps")
        self.stream.resume_from(self.consumed, self.yielded)
        workers = max(1, self.num_workers)
        iterator = iter(self._loader())
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                self._exhausted = True
                return
            except Exception as err:  # a worker's error arrives wrapped, with its traceback in the message
                raise data_error(err) from None
            tensors, meta = strip_meta(batch)
            worker = int(meta["_worker"])
            self.consumed[worker] = int(meta["_index"]) + 1
            self.yielded[worker] = int(meta["_ordinal"]) // workers + 1
            self.faults[worker] = dict(meta["_faults"])
            self.batches += 1
            yield tensors


def data_error(err: BaseException) -> UserError:
    """A one-line UserError from an exception raised in a DataLoader worker (whose message holds a traceback)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = lines[-1] if lines else type(err).__name__
    for prefix in ("vl.errors.UserError: ", "UserError: "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    return UserError(f"data pipeline stopped: {message}")
