"""Object tags from a feature store (Oscar, VinVL): word ids and weights per region, for ``vl.encoders.tags``.

A region's tag names its ``tags.classes`` most probable detector classes and its ``tags.attributes`` most probable
attributes, each weighted by its probability:

- a class's weight is P(class) with the background included: the store's ``object_probs`` (foreground classes,
  renormalised) times the foreground probability ``object_conf / object_probs[object_id]``. A store without class
  distributions gives its argmax class the weight ``object_conf``.
- an attribute's weight is its probability (the store's ``attr_probs``; without them, ``attr_conf`` for the argmax
  ``attr_ids``) times the foreground probability: the attributes of a box that is no object do not count.
- names less probable than ``tags.min_probability`` are left out. A name of n word pieces gives each piece 1/n of
  its weight, so the tag holds the mean embedding of a multi-piece name.

The vocabulary is the store's ``class_names`` and ``attribute_names`` (``store.json`` meta), whatever detector
wrote them; underscores read as spaces (``traffic_light`` is "traffic light").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vl.errors import UserError

MAX_PIECES = 4  # word pieces kept of one name; longer names are cut (their weight spread over the pieces kept)


def _name_pieces(tokenizer: Any, name: str) -> list[int]:
    """The word-piece ids of a class or attribute name, without [CLS] / [SEP] (at most ``MAX_PIECES``)."""
    encoding = tokenizer.encode(name.replace("_", " ").strip())
    specials = tokenizer.special_ids
    pieces = [int(i) for i in encoding.ids if int(i) not in specials or int(i) == tokenizer.unk_id]
    return pieces[:MAX_PIECES]


class RegionTagger:
    """``tagger(record, count) -> (ids (count, L) int64, weights (count, L) float32)`` for a store record's first
    ``count`` regions (see the module docstring). ``width`` is L.

    class_names / attribute_names: the store's vocabularies; tokenizer: the model's (``vl.text.tokenizer``);
    cfg: the model's ``TagConfig``.
    """

    def __init__(self, class_names: Sequence[str], attribute_names: Sequence[str], tokenizer: Any, cfg: Any):
        self.cfg = cfg
        self.pad_id = int(tokenizer.pad_id)
        self.classes = min(cfg.classes, len(class_names))
        self.attributes = min(cfg.attributes, len(attribute_names))
        if self.classes + self.attributes == 0:
            raise UserError("model.tags needs class or attribute names, and the feature store has neither")
        self.class_ids, self.class_shares = self._table(class_names, tokenizer)  # (C, P), (C, P)
        self.attr_ids, self.attr_shares = self._table(attribute_names, tokenizer)  # (A, P), (A, P)
        self.pieces = max(self.class_ids.shape[1], self.attr_ids.shape[1])
        self.width = (self.classes + self.attributes) * self.pieces

    @classmethod
    def for_store(cls, store: Any, tokenizer: Any, cfg: Any, flag: str = "--features") -> RegionTagger:
        """The tagger of a feature store's class and attribute names; a UserError when the store has none."""
        meta = getattr(store, "meta", None) or {}
        class_names = list(meta.get("class_names") or ())
        attribute_names = list(meta.get("attribute_names") or ())
        if not class_names and not attribute_names:
            raise UserError(f"{flag} {getattr(store, 'root', '')}: model.tags needs the detector's class and "
                            "attribute names (store.json meta class_names / attribute_names); extract the store "
                            "with a detector that has them, or turn model.tags off")
        return cls(class_names, attribute_names, tokenizer, cfg)

    def _table(self, names: Sequence[str], tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
        pieces = [_name_pieces(tokenizer, name) for name in names]
        width = max([len(p) for p in pieces] + [1])
        ids = np.full((len(names), width), self.pad_id, dtype=np.int64)
        shares = np.zeros((len(names), width), dtype=np.float32)
        for row, name_pieces in enumerate(pieces):
            ids[row, :len(name_pieces)] = name_pieces
            shares[row, :len(name_pieces)] = 1.0 / max(1, len(name_pieces))
        return ids, shares

    def __call__(self, record: Mapping[str, Any], count: int) -> tuple[np.ndarray, np.ndarray]:
        class_probs, foreground = class_probabilities(record, count, len(self.class_ids))  # (K, C), (K,)
        attr_probs = attribute_probabilities(record, count, len(self.attr_ids)) * foreground[:, None]  # (K, A)
        parts = [self._top(class_probs, self.classes, self.class_ids, self.class_shares),
                 self._top(attr_probs, self.attributes, self.attr_ids, self.attr_shares)]
        ids = np.concatenate([part[0] for part in parts], axis=1)  # (K, L)
        weights = np.concatenate([part[1] for part in parts], axis=1)  # (K, L)
        return ids, weights

    def _top(self, probs: np.ndarray, k: int, table: np.ndarray, shares: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most probable names of each row of ``probs`` (K, N) as (K, k * P) piece ids and weights."""
        rows = probs.shape[0]
        if k == 0:
            return np.zeros((rows, 0), dtype=np.int64), np.zeros((rows, 0), dtype=np.float32)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (K, k)
        weight = np.take_along_axis(probs, top, axis=1)  # (K, k)
        weight = np.where(weight >= self.cfg.min_probability, weight, 0.0).astype(np.float32)
        ids = np.full((rows, k, self.pieces), self.pad_id, dtype=np.int64)
        piece_weights = np.zeros((rows, k, self.pieces), dtype=np.float32)
        width = table.shape[1]
        ids[:, :, :width] = table[top]  # (K, k, P)
        piece_weights[:, :, :width] = shares[top] * weight[:, :, None]
        return ids.reshape(rows, -1), piece_weights.reshape(rows, -1)


def region_tagger(store: Any, tokenizer: Any, model_cfg: Any, flag: str = "--features") -> RegionTagger | None:
    """The ``RegionTagger`` a model with object tags (``model_cfg.tags``, a ``FusionConfig``'s) needs for
    ``store``'s regions; None for a model without tags."""
    if getattr(model_cfg, "tags", None) is None:
        return None
    return RegionTagger.for_store(store, tokenizer, model_cfg.tags, flag)


def class_probabilities(record: Mapping[str, Any], count: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, C) P(class) with the background included, and the (K,) foreground probability, of a record's first
    ``count`` regions (see the module docstring)."""
    conf = np.asarray(record["object_conf"][:count], dtype=np.float32)
    ids = np.asarray(record["object_ids"][:count], dtype=np.int64)
    known = (ids >= 0) & (ids < num_classes)
    probs = np.zeros((count, num_classes), dtype=np.float32)
    if "object_probs" in record and num_classes:
        stored = np.asarray(record["object_probs"][:count], dtype=np.float32)
        top = stored[np.arange(count), np.where(known, ids, 0)] if count else np.zeros(0, dtype=np.float32)
        foreground = np.where(known & (top > 0), np.clip(conf / np.maximum(top, 1e-6), 0.0, 1.0), 0.0)
        probs = stored * foreground[:, None]
    else:
        foreground = np.where(known, np.clip(conf, 0.0, 1.0), 0.0).astype(np.float32)
        probs[np.flatnonzero(known), ids[known]] = foreground[known]
    return probs, foreground.astype(np.float32)


def attribute_probabilities(record: Mapping[str, Any], count: int, num_attributes: int) -> np.ndarray:
    """(K, A) every attribute's probability of a record's first ``count`` regions: its ``attr_probs``, or else
    ``attr_conf`` at the argmax ``attr_ids`` and 0 elsewhere."""
    if "attr_probs" in record and num_attributes:
        return np.asarray(record["attr_probs"][:count], dtype=np.float32)
    probs = np.zeros((count, num_attributes), dtype=np.float32)
    ids = np.asarray(record["attr_ids"][:count], dtype=np.int64)
    known = (ids >= 0) & (ids < num_attributes)
    probs[np.flatnonzero(known), ids[known]] = np.asarray(record["attr_conf"][:count], dtype=np.float32)[known]
    return probs
