"""Referring expressions for the generated world, in the RefCOCO layout.

Each object that some phrase picks out alone gets one ref: ``ref_id``, ``ann_id`` (its COCO instance),
``image_id``, ``category_id``, ``split``, ``file_name``, ``sent_ids`` and ``sentences`` (``sent_id``, ``raw``,
``sent``, ``tokens``), as the REFER toolkit reads ``refs(unc).p``. An expression names the object by its attributes
("the small red circle") or by where it lies from an object that is named alone ("the square to the left of the
blue star"), and every one fits that object and no other in the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vl.data.formats import karpathy_tokens
from vl.world.language import RELATION_TEXT, clear_relations, describe, unique_descriptions
from vl.world.scene import Scene, SceneObject

_ATTRIBUTE_SETS = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))
MAX_SENTENCES = 3  # expressions per ref, at most


def _relational(obj: SceneObject, objects: Sequence[SceneObject], named: dict[int, str], side: int) -> list[str]:
    """"the <shape> <relation> the <other>": the object is the only one of its shape in that relation to an object
    that is named alone."""
    same_shape = [other for other in objects if other.shape == obj.shape]
    out = []
    for anchor in objects:
        if anchor is obj or id(anchor) not in named:
            continue
        for relation in clear_relations(obj, anchor, side):
            holders = [other for other in same_shape if other is not anchor
                       and relation in clear_relations(other, anchor, side)]
            if holders == [obj]:
                out.append(f"the {obj.shape} {RELATION_TEXT[relation]} the {named[id(anchor)]}")
    return out


def expressions(scene: Scene, rng: np.random.Generator) -> list[list[str]]:
    """Per object of ``scene``, up to ``MAX_SENTENCES`` expressions that fit it alone (empty: none does)."""
    named: dict[int, str] = {}
    by_attributes: dict[int, list[str]] = {}
    for obj in scene.objects:
        fitting = unique_descriptions(obj, scene.objects, _ATTRIBUTE_SETS)
        by_attributes[id(obj)] = [f"the {describe(obj, attrs)}" for attrs in fitting]
        if fitting:
            named[id(obj)] = describe(obj, fitting[0])
    out = []
    for obj in scene.objects:
        candidates = by_attributes[id(obj)] + _relational(obj, scene.objects, named, scene.width)
        if len(candidates) > MAX_SENTENCES:
            picked = rng.choice(len(candidates), size=MAX_SENTENCES, replace=False)
            candidates = [candidates[i] for i in sorted(picked)]
        out.append(candidates)
    return out


def scene_refs(scene: Scene, ann_ids: Sequence[int], category_ids: dict[str, int], split: str,
               rng: np.random.Generator, ref_id: int, sent_id: int) -> tuple[list[dict[str, Any]], int, int]:
    """The refs of one scene (its objects' COCO annotation ids ``ann_ids``, in order), numbered from ``ref_id`` and
    ``sent_id``; returns (refs, next ref_id, next sent_id)."""
    refs = []
    for obj, ann_id, texts in zip(scene.objects, ann_ids, expressions(scene, rng)):
        if not texts:
            continue
        tokens = [karpathy_tokens(text) for text in texts]
        sentences = [{"sent_id": sent_id + k, "raw": text, "sent": " ".join(words), "tokens": words}
                     for k, (text, words) in enumerate(zip(texts, tokens))]
        refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": scene.image_id,
                     "category_id": category_ids[obj.shape], "split": split,
                     "file_name": f"{scene.file_name.rsplit('.', 1)[0]}_{ann_id}.jpg",
                     "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences})
        ref_id += 1
        sent_id += len(sentences)
    return refs, ref_id, sent_id
