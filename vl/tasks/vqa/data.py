"""VQA examples and batches: questions (with their soft targets) joined with their image's regions from a feature
store by image id; the training subset (``question_subset``) and the image-blind control (``shuffled_images``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vl.data.formats import VqaAnnotation, VqaQuestion
from vl.data.tags import RegionTagger
from vl.errors import UserError
from vl.tasks.vl_finetune import encode_texts, missing_images, note, read_regions, region_batch, text_batch
from vl.tasks.vqa.answers import soft_targets
from vl.text.tokenizer import Tokenizer


def question_subset(questions: Sequence[VqaQuestion], annotations: Sequence[VqaAnnotation], fraction: float,
                    seed: int) -> tuple[list[VqaQuestion], list[VqaAnnotation]]:
    """``fraction`` of the questions (at least one), drawn with ``seed`` and kept in file order, with their
    annotations. The draw depends only on the question ids and the seed, so runs that share them fine-tune on
    the same questions."""
    if fraction >= 1.0:
        return list(questions), list(annotations)
    ids = sorted(question.question_id for question in questions)
    keep_count = max(1, round(fraction * len(ids)))
    kept = {ids[i] for i in np.random.default_rng(seed).permutation(len(ids))[:keep_count].tolist()}
    return ([question for question in questions if question.question_id in kept],
            [annotation for annotation in annotations if annotation.question_id in kept])


@dataclass(frozen=True)
class VqaExample:
    """One question, tokenised, with its soft targets (empty when unannotated or no answer is in the vocabulary)."""

    question_id: int
    image_id: int
    token_ids: tuple[int, ...]
    target_ids: tuple[int, ...] = ()
    target_scores: tuple[float, ...] = ()


def vqa_examples(questions: Sequence[VqaQuestion], tokenizer: Tokenizer, max_text_len: int,
                 annotations: Sequence[VqaAnnotation] | None = None,
                 answer_index: dict[str, int] | None = None) -> list[VqaExample]:
    """Questions as examples (file order); with ``annotations`` and ``answer_index``, with soft targets."""
    by_question = {annotation.question_id: annotation for annotation in annotations or ()}
    token_ids = encode_texts(tokenizer, [question.question for question in questions], max_text_len)
    examples = []
    for question, ids in zip(questions, token_ids):
        annotation = by_question.get(question.question_id)
        targets = soft_targets(annotation.answer_strings, answer_index) \
            if annotation is not None and answer_index is not None else {}
        examples.append(VqaExample(question.question_id, question.image_id, tuple(ids), tuple(targets),
                                   tuple(targets.values())))
    return examples


def with_features(examples: Sequence[VqaExample], store: Any, flag: str, questions_flag: str) -> list[VqaExample]:
    """The examples whose image has features in ``store``; the others are counted and reported on stderr."""
    missing = set(missing_images(store, [example.image_id for example in examples]))
    if not missing:
        return list(examples)
    kept = [example for example in examples if example.image_id not in missing]
    note(f"warning: {len(examples) - len(kept)} of {len(examples)} questions of {questions_flag} skipped: "
         f"{len(missing)} images have no features in {flag} {store.root} (first: image {sorted(missing)[0]})")
    return kept


class VqaCollator:
    """Examples -> a batch: text keys, region keys (read from ``store``, with object tags when a ``tagger`` is
    given) and ``answer_targets`` (B, A) float."""

    def __init__(self, store: Any, feature_dim: int, max_regions: int, num_answers: int, pad_id: int,
                 tagger: RegionTagger | None = None):
        self.store = store
        self.feature_dim = feature_dim
        self.max_regions = max_regions
        self.num_answers = num_answers
        self.pad_id = pad_id
        self.tagger = tagger

    def __call__(self, examples: Sequence[VqaExample], generator: torch.Generator | None = None
                 ) -> dict[str, torch.Tensor]:
        batch = text_batch([example.token_ids for example in examples], self.pad_id)
        batch.update(region_batch([read_regions(self.store, example.image_id, self.max_regions, self.tagger)
                                   for example in examples], self.feature_dim))
        targets = torch.zeros(len(examples), self.num_answers)
        for row, example in enumerate(examples):
            if example.target_ids:
                targets[row, list(example.target_ids)] = torch.tensor(example.target_scores)
        batch["answer_targets"] = targets
        return batch


def shuffled_images(examples: Sequence[VqaExample], seed: int) -> list[VqaExample]:
    """The examples with every image replaced by another image of the same file (a seeded derangement of the
    distinct image ids): the image-blind control. What a model still answers right then, it answers from the
    question alone (language priors), so the gap to the real images is what it reads from the image."""
    image_ids = sorted({example.image_id for example in examples})
    if len(image_ids) < 2:
        raise UserError("--shuffle-images needs questions on at least two images")
    order = np.random.default_rng(seed).permutation(len(image_ids))
    # a cyclic shift along a random order is a derangement: no image keeps its own regions
    other = {image_ids[order[i]]: image_ids[order[(i + 1) % len(order)]] for i in range(len(order))}
    return [dataclasses.replace(example, image_id=other[example.image_id]) for example in examples]
