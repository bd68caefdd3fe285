"""Retrieval data: the images and captions of Karpathy split(s) (``RetrievalSplit``, ``load_split``), the training
examples of an epoch (``RetrievalTrainData``) and their batches (``RetrievalCollator``)."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vl.data.formats import read_karpathy
from vl.data.tags import RegionTagger
from vl.errors import UserError
from vl.tasks.vl_finetune import missing_images, note, read_regions, region_batch, text_batch


@dataclass(frozen=True)
class RetrievalSplit:
    """The images and captions of Karpathy split(s): ``text_image[t]`` is the index (into ``image_ids``) of
    caption ``t``'s image."""

    image_ids: tuple[Any, ...]
    sentids: tuple[int, ...]
    texts: tuple[str, ...]
    text_image: tuple[int, ...]

    @property
    def captions_of_image(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.image_ids]
        for text, image in enumerate(self.text_image):
            out[image].append(text)
        return out


def load_split(karpathy: str | os.PathLike, splits: str | Sequence[str], store: Any | None = None,
               max_images: int | None = None, require_features: bool = True) -> RetrievalSplit:
    """The images (and their captions) of ``splits`` in file order, at most ``max_images``.

    With ``store``: images without features are an error (``require_features``) or skipped with a warning.
    """
    names = (splits,) if isinstance(splits, str) else tuple(splits)
    images = [image for image in read_karpathy(karpathy, names) if image.sentences]
    if not images:
        raise UserError(f"--karpathy {karpathy} has no images with captions in split {', '.join(names)}")
    if store is not None:
        missing = set(missing_images(store, [image.image_id for image in images]))
        if missing:
            first = next(image.image_id for image in images if image.image_id in missing)
            if require_features:
                raise UserError(f"--features {store.root} has no features for {len(missing)} images of split "
                                f"{', '.join(names)} (first: image {first}); extract them with vl-regions extract")
            note(f"warning: {len(missing)} images of split {', '.join(names)} have no features in {store.root} "
                 f"and are skipped (first: image {first})")
            images = [image for image in images if image.image_id not in missing]
    if max_images is not None:
        images = images[:max_images]
    sentids, texts, text_image = [], [], []
    for index, image in enumerate(images):
        for sentence in image.sentences:
            sentids.append(sentence.sentid)
            texts.append(sentence.raw)
            text_image.append(index)
    return RetrievalSplit(tuple(image.image_id for image in images), tuple(sentids), tuple(texts),
                          tuple(text_image))


class RetrievalTrainData:
    """Training examples of one epoch: every image once, with one of its captions drawn by (seed, epoch)."""

    def __init__(self, split: RetrievalSplit, token_ids: Sequence[Sequence[int]], seed: int):
        self.split = split
        self.token_ids = token_ids
        self.captions = split.captions_of_image
        self.seed = seed

    def __call__(self, epoch: int) -> list[tuple[int, int]]:
        from vl.data.seeds import stable_seed

        rng = random.Random(stable_seed(self.seed, 0xC4, epoch))
        return [(image, rng.choice(texts)) for image, texts in enumerate(self.captions) if texts]


class RetrievalCollator:
    """(image index, caption index) examples -> a batch of matched pairs with ``image_ids`` (B,) long."""

    def __init__(self, split: RetrievalSplit, token_ids: Sequence[Sequence[int]], store: Any, feature_dim: int,
                 max_regions: int, pad_id: int, tagger: RegionTagger | None = None):
        self.tagger = tagger
        self.split = split
        self.token_ids = token_ids
        self.store = store
        self.feature_dim = feature_dim
        self.max_regions = max_regions
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[tuple[int, int]], generator: torch.Generator | None = None
                 ) -> dict[str, torch.Tensor]:
        batch = text_batch([self.token_ids[text] for _, text in examples], self.pad_id)
        batch.update(region_batch([read_regions(self.store, self.split.image_ids[image], self.max_regions,
                                                self.tagger) for image, _ in examples], self.feature_dim))
        batch["image_ids"] = torch.tensor([image for image, _ in examples], dtype=torch.long)
        return batch
