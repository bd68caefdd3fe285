"""Image-text retrieval on a Karpathy split: fine-tuning, Recall@K, and a two-stage evaluator.

**Model** (``RetrievalModel``): a fusion model with

- the ITM head (``heads.itm``, Linear(H, 2) on the pooled output; the pretrained one when ``--init`` has it). A
  pair's score is logit(matched) - logit(mismatched) (``vl.objectives.itm.match_scores``);
- unimodal encodings for a cheap first stage (``contrastive``): the SAME fusion model run with one modality only.
  A *text-only pass* feeds the caption with one all-masked dummy region; a *regions-only pass* feeds the image's
  regions with an all-masked ``[CLS] [SEP]``. In a single-stream model the masked part is never attended, so the
  pass is a pure text (or region) encoder through the shared layers; in a dual-stream model the stream attends to
  a constant placeholder, so its output still depends on its own modality only. The per-stream summaries
  (``VLOutput.pooled_text`` / ``pooled_region``: masked means, or ViLBERT's stream poolers) are projected to
  ``embed_dim`` and L2-normalised (``ContrastiveHead``). Embeddings of a caption and of an image can therefore be
  computed once and cached, independently of each other.

**Training** (``vl finetune retrieval``): each batch holds B images, each with one of its captions (drawn anew every
epoch), so in-batch pairs are true negatives. Losses: ``contrastive``: symmetric InfoNCE over the B x B cosine
similarities with a learned temperature (CLIP / ALBEF); ``itm``: UNITER's hard-negative objective. The current model
scores every wrong (caption, image) pair of the batch without gradients; for each caption and for each image its
``hard_negatives`` highest-scoring wrong partners are kept, and the loss is the softmax cross-entropy of the matched
pair's ITM score against theirs (one group per anchor). A binary loss over 1 positive and 2k hard negatives tends to
collapse to "never matched"; the ranking form cannot. ``hard_negative_source: contrastive`` takes the hardest by
first-stage similarity instead, which costs no extra forward passes; ``sampled`` draws them with probability
softmax(similarity / temperature) over the wrong partners, as ALBEF does: near-random while the embeddings are
untrained, harder as they learn, and a near-duplicate caption is not always the one drawn. ``hard_negatives: 0``
ranks each caption's image against one random wrong image.

**Evaluation** (``vl evaluate retrieval``, ``RetrievalIndex``): the split's captions and images are embedded once
(first stage, O(N) passes); for each caption the top ``k`` images by cosine similarity, and for each image the top
``k`` captions, are re-ranked by the pair score of the full model (O(N k) pair passes instead of O(N^2)). The pair
score (``pair_score``) is the ITM score (logit matched - logit mismatched); by default that plus the pair's
first-stage cosine similarity, as BLIP re-ranks, so that a well-trained ITM head dominates it; or
``itm+contrastive``, that plus the contrastive logit (cosine / temperature): two log-odds added, so that the ITM
head moves a pair only as far as it is confident, and a weak one cannot undo a good first stage. ``--full`` gives
every pair the same score instead. Recall@K (``recall_at_k``): text->image counts a caption as found when its image
is in the top K; image->text counts an image as found when any of its captions is in the top K.

A retrieval run directory holds ``config.yaml`` (``RetrievalRun``), ``model.safetensors`` (``fusion.*``,
``heads.itm.*``, ``contrastive.*``), ``vocab.txt`` + ``tokenizer_config.json``, ``val_metrics.json`` and what the
training loop writes.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from vl.progress import progress_bar

from vl.config import ConfigError, atomic_write_text, from_dict, load_config
from vl.data.formats import KARPATHY_SPLITS, read_karpathy
from vl.errors import UserError
from vl.fusion import build_fusion
from vl.fusion.base import FusionConfig, VLOutput
from vl.fusion.pretraining import HeadsConfig, VLHeads
from vl.objectives.itm import hardest_wrong_pairs, pair_batch, sampled_wrong_pairs, score_all_pairs
from vl.tasks.vl_finetune import (
    SCRATCH,
    FinetuneModeMixin,
    VLFinetuneMode,
    apply_mode,
    check_store,
    encode_texts,
    missing_images,
    model_device,
    note,
    open_store,
    prepare_init,
    read_regions,
    read_task_config,
    region_batch,
    steps_for_epochs,
    text_batch,
    prepare_mode,
)
from vl.data.tags import RegionTagger, region_tagger
from vl.text.tokenizer import Tokenizer
from vl.train.loop import TrainConfig, TrainResult, seed_everything, train

TASK_NAME = "retrieval"
PairScore = Literal["itm", "itm+similarity", "itm+contrastive"]
PAIR_SCORES = ("itm", "itm+similarity", "itm+contrastive")
# UNITER (the hardest by ITM score), the hardest by first-stage similarity, or ALBEF (drawn by similarity)
NegativeSource = Literal["itm", "contrastive", "sampled"]
NEGATIVE_SOURCES = ("itm", "contrastive", "sampled")
VAL_METRICS_FILE = "val_metrics.json"
RECALL_KS = (1, 5, 10)
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
REGION_KEYS = ("region_feats", "region_boxes", "region_mask", "region_tag_ids", "region_tag_weights")


@dataclass(frozen=True)
class RetrievalConfig:
    """The ``retrieval:`` section of a retrieval fine-tuning config."""

    max_text_len: int = 40  # word pieces per caption, [CLS] and [SEP] included
    max_regions: int = 100  # regions per image (the store's first ones)
    embed_dim: int = 256  # width of the first-stage (contrastive) embeddings
    temperature: float = 0.07  # initial contrastive temperature (learned)
    itm_weight: float = 1.0
    contrastive_weight: float = 1.0
    hard_negatives: int = 1  # mined mismatched pairs per caption and per image (0: one random negative each)
    hard_negative_source: NegativeSource = "itm"  # see NEGATIVE_SOURCES
    rerank_k: int = 20  # two-stage evaluation: first-stage candidates re-ranked by the pair score
    pair_score: PairScore = "itm+similarity"  # the re-ranking score: ITM, or ITM + first-stage cosine (BLIP)
    train_splits: tuple[str, ...] = ("train", "restval")  # Karpathy splits trained on
    val_split: str = "val"  # evaluated during and after training ("" for none)
    val_max_images: int = 1000  # at most this many val images (and their captions) are evaluated
    epochs: float = 0.0  # > 0: train.steps = ceil(epochs * training images / batch); 0: train.steps as given
    eval_batch_size: int = 256  # pairs (or single-modality inputs) per evaluation forward pass

    def __post_init__(self):
        for name in ("max_text_len", "max_regions", "embed_dim", "rerank_k", "val_max_images", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_text_len < 3:
            raise ValueError(f"max_text_len must be at least 3, got {self.max_text_len}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.itm_weight < 0 or self.contrastive_weight < 0 or self.itm_weight + self.contrastive_weight == 0:
            raise ValueError("itm_weight and contrastive_weight must be >= 0 and not both 0")
        if self.hard_negatives < 0:
            raise ValueError(f"hard_negatives must be >= 0, got {self.hard_negatives}")
        if self.pair_score not in PAIR_SCORES:
            raise ValueError(f"pair_score must be one of {', '.join(PAIR_SCORES)}, got {self.pair_score!r}")
        if self.hard_negative_source not in NEGATIVE_SOURCES:
            raise ValueError(f"hard_negative_source must be one of {', '.join(NEGATIVE_SOURCES)}, got "
                             f"{self.hard_negative_source!r}")
        for split in (*self.train_splits, *([self.val_split] if self.val_split else [])):
            if split not in KARPATHY_SPLITS:
                raise ValueError(f"unknown Karpathy split {split!r} (expected one of {', '.join(KARPATHY_SPLITS)})")
        if not self.train_splits:
            raise ValueError("train_splits must name at least one Karpathy split")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")


@dataclass(frozen=True)
class RetrievalFinetuneConfig:
    """What ``vl finetune retrieval --config`` holds (``configs/finetune-retrieval-*.yaml``); ``model`` is used only
    by ``--init scratch`` and BERT inits."""

    model: FusionConfig | None = None
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tokenizer: str | None = None
    finetune: VLFinetuneMode = field(default_factory=VLFinetuneMode)


@dataclass(frozen=True)
class RetrievalRun:
    """``RUN/config.yaml`` of a retrieval run."""

    task: str
    model: FusionConfig
    heads: HeadsConfig
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: str = SCRATCH
    features: str = ""
    karpathy: str = ""
    finetune: VLFinetuneMode = field(default_factory=VLFinetuneMode)


def load_retrieval_finetune_config(path: str | os.PathLike | None,
                                   overrides: Sequence[str] = ()) -> RetrievalFinetuneConfig:
    data, source = read_task_config(path, overrides)
    return from_dict(RetrievalFinetuneConfig, data, source=source)


# --------------------------------------------------------------------------------------------------------------
# The model


class ContrastiveHead(nn.Module):
    """Projections of the per-stream summaries to ``embed_dim`` (L2-normalised) and a learned temperature.

    ``logit_scale`` = 1 / temperature, kept in [1, 100] (CLIP).
    """

    def __init__(self, text_dim: int, region_dim: int, embed_dim: int, temperature: float = 0.07):
        super().__init__()
        self.text_proj = nn.Linear(text_dim, embed_dim)
        self.region_proj = nn.Linear(region_dim, embed_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.clamp(0.0, math.log(100.0)).exp()

    def embed_text(self, pooled_text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(pooled_text).float(), dim=-1)  # (B, E)

    def embed_regions(self, pooled_region: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.region_proj(pooled_region).float(), dim=-1)  # (B, E)


def contrastive_loss(text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor,
                     image_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over (B, E) x (B, E) normalised embeddings; pair i is (text i, image i).

    Pairs sharing an image id are all positives (the target spreads evenly over them). Returns the loss and the
    text->image top-1 accuracy.
    """
    logits = logit_scale * text_emb @ image_emb.t()  # (B, B)
    if image_ids is None:
        positives = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    else:
        positives = image_ids[:, None] == image_ids[None, :]
    targets = positives.float() / positives.sum(dim=1, keepdim=True)
    loss_t2i = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    loss_i2t = -(targets.t() * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
    accuracy = positives.gather(1, logits.detach().argmax(dim=1, keepdim=True)).float().mean()
    return (loss_t2i + loss_i2t) / 2, accuracy


class RetrievalModel(FinetuneModeMixin, nn.Module):
    """``fusion`` + ``heads.itm`` + ``contrastive`` (see the module docstring).

    ``embed_texts(text batch)`` / ``embed_images(region batch)`` -> (B, E) first-stage embeddings;
    ``pair_scores(pair batch)`` -> (B,) ITM scores; ``forward(batch)`` -> the training losses
    ``{"itm", "contrastive"}`` and logged values ``itm_acc``, ``contrastive_acc``, ``temperature``.
    """

    def __init__(self, fusion: nn.Module, cfg: RetrievalConfig, itm_head: nn.Linear | None = None):
        super().__init__()
        self.fusion = fusion
        self.heads = VLHeads(fusion, self.heads_config())
        if itm_head is not None:
            self.heads.itm.load_state_dict(itm_head.state_dict())
        if fusion.cfg.pooling == "text_cls":  # pooled_text / pooled_region are masked means of each stream
            text_dim, region_dim = fusion.text_hidden_size, fusion.region_hidden_size
        else:  # ViLBERT: the streams' poolers, both of the pooled width
            text_dim = region_dim = fusion.hidden_size
        self.contrastive = ContrastiveHead(text_dim, region_dim, cfg.embed_dim, cfg.temperature)
        self.rcfg = cfg

    @staticmethod
    def heads_config() -> HeadsConfig:
        return HeadsConfig(mlm=False, itm=True, region_outputs={}, num_answers=0)

    @property
    def cfg(self) -> FusionConfig:
        return self.fusion.cfg

    # single-modality passes ------------------------------------------------------------------------------------
    def text_only(self, batch: dict[str, torch.Tensor]) -> VLOutput:
        """The fusion model on the captions of ``batch`` with one all-masked dummy region each."""
        input_ids = batch["input_ids"]
        rows, device = input_ids.shape[0], input_ids.device
        inputs = {key: batch[key] for key in TEXT_KEYS if key in batch}
        inputs["region_feats"] = torch.zeros(rows, 1, self.cfg.region.feature_dim, device=device)
        inputs["region_boxes"] = torch.zeros(rows, 1, 4, device=device)
        inputs["region_mask"] = torch.zeros(rows, 1, dtype=torch.long, device=device)
        if self.cfg.tags is not None:  # the dummy region's empty tag
            inputs["region_tag_ids"] = torch.zeros(rows, 1, 1, dtype=torch.long, device=device)
            inputs["region_tag_weights"] = torch.zeros(rows, 1, 1, device=device)
        return self.fusion(inputs)

    def regions_only(self, batch: dict[str, torch.Tensor]) -> VLOutput:
        """The fusion model on the regions of ``batch`` with an all-masked ``[CLS] [SEP]`` text each (ids 0: the
        text is never attended, so its ids do not matter)."""
        region_feats = batch["region_feats"]
        rows, device = region_feats.shape[0], region_feats.device
        inputs = {key: batch[key] for key in REGION_KEYS if key in batch}
        inputs["input_ids"] = torch.zeros(rows, 2, dtype=torch.long, device=device)
        inputs["attention_mask"] = torch.zeros(rows, 2, dtype=torch.long, device=device)
        inputs["token_type_ids"] = torch.zeros(rows, 2, dtype=torch.long, device=device)
        return self.fusion(inputs)

    def embed_texts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.contrastive.embed_text(self.text_only(batch).pooled_text)  # (B, E)

    def embed_images(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.contrastive.embed_regions(self.regions_only(batch).pooled_region)  # (B, E)

    def pair_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.heads.itm(self.pooled_output(batch))  # (B, 2)
        return (logits[:, 1] - logits[:, 0]).float()  # (B,): as match_scores

    # training -------------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {key: batch[key] for key in (*TEXT_KEYS, *REGION_KEYS) if key in batch}
        image_ids = batch.get("image_ids")
        text_emb, image_emb = self.embed_texts(inputs), self.embed_images(inputs)
        scale = self.contrastive.logit_scale
        contrastive, contrastive_acc = contrastive_loss(text_emb, image_emb, scale, image_ids)
        losses = {"contrastive": contrastive, "contrastive_acc": contrastive_acc, "temperature": (1.0 / scale).detach()}
        losses.update(self._itm_losses(inputs, text_emb, image_emb, image_ids))
        return losses

    def _itm_losses(self, inputs: dict[str, torch.Tensor], text_emb: torch.Tensor, image_emb: torch.Tensor,
                    image_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """UNITER's hard-negative ITM loss: per anchor (caption, and image), softmax cross-entropy of the matched
        pair's score against its mismatched pairs' scores. ``itm_acc``: share of anchors whose matched pair wins."""
        size, device = inputs["input_ids"].shape[0], inputs["input_ids"].device
        positives = torch.arange(size, device=device)
        groups = self._negatives(inputs, text_emb, image_emb, image_ids)  # [(anchor kind, (N, 2) pairs)]
        if not groups:  # a single image: nothing to rank against
            zero = self.heads.itm.weight.sum() * 0.0
            return {"itm": zero, "itm_acc": torch.ones((), device=device)}
        text_index = torch.cat([positives] + [pairs[:, 0] for _, pairs in groups])
        region_index = torch.cat([positives] + [pairs[:, 1] for _, pairs in groups])
        scores = self.pair_scores(pair_batch(inputs, text_index, region_index))  # (B + N,)
        positive_scores, offset = scores[:size], size
        losses, wins = [], []
        for anchor, pairs in groups:
            negative_scores = scores[offset:offset + len(pairs)]
            offset += len(pairs)
            anchors = pairs[:, 0] if anchor == "text" else pairs[:, 1]
            counts = torch.bincount(anchors, minlength=size)
            slot = torch.arange(len(pairs), device=device) - (counts.cumsum(0) - counts)[anchors]
            table = scores.new_full((size, int(counts.max()) + 1), float("-inf"))  # (B, 1 + k)
            table[:, 0] = positive_scores
            table[anchors, slot + 1] = negative_scores
            ranked = table[counts > 0]
            losses.append(F.cross_entropy(ranked, torch.zeros(len(ranked), dtype=torch.long, device=device)))
            wins.append((ranked.detach().argmax(dim=1) == 0).float())
        return {"itm": torch.stack(losses).mean(), "itm_acc": torch.cat(wins).mean()}

    def _negatives(self, inputs: dict[str, torch.Tensor], text_emb: torch.Tensor, image_emb: torch.Tensor,
                   image_ids: torch.Tensor | None) -> list[tuple[str, torch.Tensor]]:
        """Mismatched pairs as (anchor, (N, 2) rows of (caption index, image index)), rows grouped by anchor:
        ``hard_negatives`` per caption ("text") and per image ("regions"), or one random wrong image per caption."""
        size, device = inputs["input_ids"].shape[0], inputs["input_ids"].device
        if size < 2:
            return []
        if self.rcfg.hard_negatives == 0:
            captions = torch.arange(size, device=device)
            pairs = torch.stack([captions, (captions + torch.randint(1, size, (), device=device)) % size], dim=1)
            if image_ids is not None:
                pairs = pairs[image_ids[pairs[:, 0]] != image_ids[pairs[:, 1]]]
            return [("text", pairs)] if len(pairs) else []
        k = min(self.rcfg.hard_negatives, size - 1)
        source = self.rcfg.hard_negative_source
        if source == "itm":
            scores = score_all_pairs(self.fusion, self.heads.itm, inputs)  # (B, B), no gradients
        else:
            scores = (text_emb @ image_emb.t()).detach()
        groups = []
        for anchor in ("text", "regions"):
            if source == "sampled":  # ALBEF: drawn in proportion to softmax(similarity / temperature)
                pairs = sampled_wrong_pairs(scores * self.contrastive.logit_scale.detach(), k, anchor, image_ids)
            else:
                pairs = hardest_wrong_pairs(scores, k, anchor, image_ids)
            if len(pairs):
                groups.append((anchor, pairs))
        return groups


# --------------------------------------------------------------------------------------------------------------
# Data


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


# --------------------------------------------------------------------------------------------------------------
# Metrics and rankings


def recall_at_k(rankings: torch.Tensor, positives: Sequence[Sequence[int]],
                ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@K in percent: the share of queries with a positive among their first K ranked candidates.

    rankings: (Q, L) candidate indices, best first (L >= max(ks) or all candidates); positives: per query, the
    indices of its correct candidates.
    """
    if rankings.shape[0] != len(positives):
        raise ValueError(f"{rankings.shape[0]} rankings for {len(positives)} queries")
    if rankings.shape[0] == 0:
        return {f"R@{k}": 0.0 for k in ks}
    hit_rank = torch.full((rankings.shape[0],), rankings.shape[1], dtype=torch.long)
    for query, correct in enumerate(positives):
        found = torch.isin(rankings[query], torch.tensor(list(correct), dtype=rankings.dtype))
        if bool(found.any()):
            hit_rank[query] = int(found.nonzero()[0, 0])
    return {f"R@{k}": 100.0 * float((hit_rank < k).float().mean()) for k in ks}


def rerank(first_stage: torch.Tensor, k: int, score_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           keep: int, query_chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-stage ranking: each query's top ``k`` candidates by ``first_stage`` (Q, N) re-ranked by
    ``score_pairs(query_index (P,), candidate_index (P,)) -> (P,)``, followed by the rest in first-stage order.

    Returns the first ``keep`` ranked candidate indices (Q, keep) and their scores: the ITM score for re-ranked
    candidates, ``-inf`` for the others (which always rank below every re-ranked one).
    """
    num_queries, num_candidates = first_stage.shape
    k = min(k, num_candidates)
    keep = min(keep, num_candidates)
    depth = max(k, keep)
    order = first_stage.topk(depth, dim=1).indices  # (Q, depth), first-stage order
    rankings = torch.empty(num_queries, keep, dtype=torch.long)
    scores = torch.full((num_queries, keep), float("-inf"))
    for start in range(0, num_queries, query_chunk):
        stop = min(start + query_chunk, num_queries)
        candidates = order[start:stop, :k]  # (q, k)
        queries = torch.arange(start, stop)[:, None].expand_as(candidates)
        itm = score_pairs(queries.reshape(-1), candidates.reshape(-1)).view(stop - start, k)  # (q, k)
        itm_sorted, position = itm.sort(dim=1, descending=True, stable=True)
        ranked = torch.cat([candidates.gather(1, position), order[start:stop, k:]], dim=1)  # (q, depth)
        rankings[start:stop] = ranked[:, :keep]
        width = min(k, keep)
        scores[start:stop, :width] = itm_sorted[:, :width]
    return rankings, scores


def rankings_json(split: RetrievalSplit, text_to_image: torch.Tensor, image_to_text: torch.Tensor
                  ) -> dict[str, list[dict[str, Any]]]:
    """The RANKINGS.json document (docs/cli.md) from (N_t, L) image rankings and (N_i, L) caption rankings."""
    return {
        "text_to_image": [{"sentid": sentid, "ranked_image_ids": [split.image_ids[i] for i in row]}
                          for sentid, row in zip(split.sentids, text_to_image.tolist())],
        "image_to_text": [{"image_id": image_id, "ranked_sentids": [split.sentids[t] for t in row]}
                          for image_id, row in zip(split.image_ids, image_to_text.tolist())],
    }


# --------------------------------------------------------------------------------------------------------------
# The index: cached inputs and first-stage embeddings of a split


class RetrievalIndex:
    """A split's captions (tokenised) and regions (in memory), with their first-stage embeddings, for one model.

    Built once (``time_embed_s`` says how long the embeddings took); ``score_pairs`` runs the full model on
    (caption, image) index pairs and gives their pair score (``pair_score``: the ITM score, or the ITM score plus
    the pair's first-stage cosine similarity, as BLIP re-ranks); ``search`` and ``captions_for_image`` answer single
    queries (``vl serve``).
    """

    def __init__(self, model: RetrievalModel, tokenizer: Tokenizer, split: RetrievalSplit, store: Any,
                 cfg: RetrievalConfig, batch_size: int | None = None, progress: bool | None = None,
                 pair_score: PairScore | None = None):
        self.model = model.eval()
        self.pair_score = pair_score or cfg.pair_score
        if self.pair_score not in PAIR_SCORES:
            raise UserError(f"--score must be one of {', '.join(PAIR_SCORES)}, got {self.pair_score!r}")
        self.tokenizer = tokenizer
        self.split = split
        self.cfg = cfg
        self.logit_scale = float(model.contrastive.logit_scale.detach())  # 1 / the learned temperature
        self.batch_size = batch_size or cfg.eval_batch_size
        self.device = model_device(model)
        self.feature_dim = model.cfg.region.feature_dim
        self.progress = progress
        token_ids = encode_texts(tokenizer, split.texts, cfg.max_text_len)
        text = text_batch(token_ids, tokenizer.pad_id)
        self.text_ids, self.text_mask = text["input_ids"], text["attention_mask"]  # (N_t, T)
        tagger = region_tagger(store, tokenizer, model.cfg)
        bank = region_batch([read_regions(store, image_id, cfg.max_regions, tagger) for image_id in split.image_ids],
                            self.feature_dim)
        bank["region_feats"] = bank["region_feats"].to(torch.float16)  # (N_i, R, D), as the store keeps them
        self.region_bank = bank  # region_feats, region_boxes (N_i, R, 4), region_mask (N_i, R) [, tags (N_i, R, L)]
        self.region_mask = bank["region_mask"]
        start = time.perf_counter()
        self.text_emb = self._embed(len(split.texts), self._texts, model.embed_texts, "embed captions")
        self.image_emb = self._embed(len(split.image_ids), self._images, model.embed_images, "embed images")
        self.time_embed_s = time.perf_counter() - start

    # batches ------------------------------------------------------------------------------------------------------
    def _texts(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = self.text_mask[index]
        length = max(1, int(mask.sum(dim=1).max()))
        ids = self.text_ids[index, :length]
        return {"input_ids": ids, "attention_mask": mask[:, :length], "token_type_ids": torch.zeros_like(ids)}

    def _images(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        count = max(1, int(self.region_mask[index].sum(dim=1).max()))
        batch = {key: value[index, :count] for key, value in self.region_bank.items()}
        batch["region_feats"] = batch["region_feats"].float()
        return batch

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device) for key, value in batch.items()}

    @torch.no_grad()
    def _embed(self, count: int, make: Callable, encode: Callable, desc: str) -> torch.Tensor:
        chunks = []
        show = False if self.progress is False else None
        for start in progress_bar(range(0, count, self.batch_size), desc=desc, show=show, leave=False):
            index = torch.arange(start, min(start + self.batch_size, count))
            chunks.append(encode(self._to_device(make(index))).float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.cfg.embed_dim)

    # scoring ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_pairs(self, text_index: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """(P,) pair scores of the (caption ``text_index[p]``, image ``image_index[p]``) pairs."""
        scores = []
        for start in range(0, len(text_index), self.batch_size):
            texts = text_index[start:start + self.batch_size]
            images = image_index[start:start + self.batch_size]
            batch = {**self._texts(texts), **self._images(images)}
            scores.append(self.model.pair_scores(self._to_device(batch)).cpu())
        itm = torch.cat(scores) if scores else torch.zeros(0)
        return self._with_similarity(itm, (self.text_emb[text_index] * self.image_emb[image_index]).sum(dim=1))

    def _with_similarity(self, itm: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
        """The pair score from the ITM scores and the pairs' first-stage cosine similarities (both (P,))."""
        if self.pair_score == "itm+similarity":
            return itm + similarity
        if self.pair_score == "itm+contrastive":  # two log-odds: ITM's and the contrastive logit (cosine / temp)
            return itm + similarity * self.logit_scale
        return itm

    def first_stage(self) -> torch.Tensor:
        """(N_t, N_i) cosine similarities of the cached caption and image embeddings."""
        return self.text_emb @ self.image_emb.t()

    @torch.no_grad()
    def query_embedding(self, text: str) -> torch.Tensor:
        """(E,) first-stage embedding of a new caption."""
        ids = encode_texts(self.tokenizer, [text], self.cfg.max_text_len)
        return self.model.embed_texts(self._to_device(text_batch(ids, self.tokenizer.pad_id)))[0].float().cpu()

    @torch.no_grad()
    def search(self, text: str, top: int = 10, k: int | None = None) -> list[dict[str, Any]]:
        """The ``top`` images for a caption: first-stage top ``k`` re-ranked by the pair score. Each result:
        ``image_index``, ``image_id``, ``score`` (the pair score; None beyond the re-ranked ones), ``similarity``
        (first stage)."""
        k = min(k or self.cfg.rerank_k, len(self.split.image_ids))
        similarity = self.image_emb @ self.query_embedding(text)  # (N_i,)
        candidates = similarity.topk(max(k, min(top, len(similarity)))).indices
        ids = encode_texts(self.tokenizer, [text], self.cfg.max_text_len)
        text_part = text_batch(ids * len(candidates[:k]), self.tokenizer.pad_id)
        batch = {**text_part, **self._images(candidates[:k])}
        itm = self._with_similarity(self.model.pair_scores(self._to_device(batch)).cpu(), similarity[candidates[:k]])
        order = itm.argsort(descending=True, stable=True)
        ranked = [(int(candidates[i]), float(itm[i])) for i in order.tolist()]
        ranked += [(int(index), None) for index in candidates[k:].tolist()]
        return [{"image_index": index, "image_id": self.split.image_ids[index], "score": score,
                 "similarity": float(similarity[index])} for index, score in ranked[:top]]

    @torch.no_grad()
    def captions_for_image(self, image_index: int, top: int = 10, k: int | None = None) -> list[dict[str, Any]]:
        """The ``top`` captions of the split for one image (first stage, then the top ``k`` re-ranked)."""
        k = min(k or self.cfg.rerank_k, len(self.split.texts))
        similarity = self.text_emb @ self.image_emb[image_index]  # (N_t,)
        candidates = similarity.topk(max(k, min(top, len(similarity)))).indices
        itm = self.score_pairs(candidates[:k], torch.full((len(candidates[:k]),), image_index, dtype=torch.long))
        order = itm.argsort(descending=True, stable=True)
        ranked = [(int(candidates[i]), float(itm[i])) for i in order.tolist()]
        ranked += [(int(index), None) for index in candidates[k:].tolist()]
        return [{"text_index": index, "sentid": self.split.sentids[index], "text": self.split.texts[index],
                 "score": score, "similarity": float(similarity[index]),
                 "matches": self.split.text_image[index] == image_index} for index, score in ranked[:top]]


def evaluate_index(index: RetrievalIndex, k: int, full: bool = False, keep: int = 10) -> tuple[dict[str, Any],
                                                                                               dict[str, torch.Tensor]]:
    """Recall@1/5/10 both ways for the first stage, the two-stage ranking (top ``k`` re-ranked) and, with
    ``full``, ITM on every pair; with wall times. Returns (report, rankings) where rankings holds the ``keep``
    best of the two-stage (or, with ``full``, the full) ranking: ``text_to_image`` (N_t, L), ``image_to_text``."""
    split = index.split
    image_positives = [[image] for image in split.text_image]
    text_positives = index.split.captions_of_image
    keep = max(keep, max(RECALL_KS))
    start = time.perf_counter()
    similarity = index.first_stage()  # (N_t, N_i)
    depth_i = min(max(keep, k), similarity.shape[1])
    depth_t = min(max(keep, k), similarity.shape[0])
    first_t2i = similarity.topk(depth_i, dim=1).indices
    first_i2t = similarity.t().topk(depth_t, dim=1).indices
    first_s = time.perf_counter() - start
    report: dict[str, Any] = {
        "num_images": len(split.image_ids), "num_captions": len(split.texts), "k": k,
        "pair_score": index.pair_score,
        "first_stage": {"text_to_image": recall_at_k(first_t2i, image_positives),
                        "image_to_text": recall_at_k(first_i2t, text_positives),
                        "seconds": round(index.time_embed_s + first_s, 4)},
    }
    start = time.perf_counter()
    two_t2i, _ = rerank(similarity, k, index.score_pairs, keep)
    two_i2t, _ = rerank(similarity.t(), k, lambda images, texts: index.score_pairs(texts, images), keep)
    rerank_s = time.perf_counter() - start
    report["two_stage"] = {"text_to_image": recall_at_k(two_t2i, image_positives),
                           "image_to_text": recall_at_k(two_i2t, text_positives),
                           "seconds": round(index.time_embed_s + first_s + rerank_s, 4),
                           "rerank_seconds": round(rerank_s, 4)}
    rankings = {"text_to_image": two_t2i, "image_to_text": two_i2t}
    if full:
        start = time.perf_counter()
        num_texts, num_images = len(split.texts), len(split.image_ids)
        all_scores = all_pair_scores(index)  # (N_t, N_i): every pair through the fusion model
        full_t2i = all_scores.topk(min(keep, num_images), dim=1).indices
        full_i2t = all_scores.t().topk(min(keep, num_texts), dim=1).indices
        full_s = time.perf_counter() - start
        report["full"] = {"text_to_image": recall_at_k(full_t2i, image_positives),
                          "image_to_text": recall_at_k(full_i2t, text_positives), "seconds": round(full_s, 4)}
        rankings = {"text_to_image": full_t2i, "image_to_text": full_i2t}
    return report, rankings


def all_pair_scores(index: RetrievalIndex, query_chunk: int = 64) -> torch.Tensor:
    """(N_t, N_i) ITM scores of every (caption, image) pair of the index's split."""
    num_texts, num_images = len(index.split.texts), len(index.split.image_ids)
    rows = []
    for start in progress_bar(range(0, num_texts, query_chunk), desc="score all pairs",
                              show=False if index.progress is False else None, leave=False):
        stop = min(start + query_chunk, num_texts)
        texts = torch.arange(start, stop).repeat_interleave(num_images)
        images = torch.arange(num_images).repeat(stop - start)
        rows.append(index.score_pairs(texts, images).view(stop - start, num_images))
    return torch.cat(rows)


def format_report(report: dict[str, Any]) -> str:
    """The lines ``vl evaluate retrieval`` prints: R@1/5/10 both ways and the wall time of each method."""
    lines = [f"{report['num_captions']} captions, {report['num_images']} images; two-stage re-ranks the top "
             f"{report['k']} by {report['pair_score']}"]
    for method in ("first_stage", "two_stage", "full"):
        if method not in report:
            continue
        part = report[method]
        recalls = "  ".join(f"{direction} " + " ".join(f"{name} {value:.2f}" for name, value in part[key].items())
                            for direction, key in (("text->image", "text_to_image"), ("image->text", "image_to_text")))
        lines.append(f"{method.replace('_', '-'):11s} {recalls}  ({part['seconds']:.2f} s)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Commands


def finetune_retrieval(cfg: RetrievalFinetuneConfig, init: str, karpathy: str | os.PathLike,
                       features: str | os.PathLike, out: str | os.PathLike,
                       tokenizer_dir: str | None = None) -> tuple[TrainResult, dict[str, Any]]:
    """Fine-tune ``init`` for retrieval on the Karpathy ``retrieval.train_splits``; evaluate two-stage recall on
    ``retrieval.val_split``; write run directory ``out`` (resumed when it holds a checkpoint). Returns the training
    result and the validation report (also in ``out/val_metrics.json``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    rcfg = cfg.retrieval
    store = open_store(features)
    train_split = load_split(karpathy, rcfg.train_splits, store, require_features=False)
    val_split = None
    if rcfg.val_split:
        images = [image for image in read_karpathy(karpathy, rcfg.val_split) if image.sentences]
        if images:
            val_split = load_split(karpathy, rcfg.val_split, store, rcfg.val_max_images, require_features=False)
    seed_everything(cfg.train.seed)
    resumed_tokenizer = str(out) if (out / "vocab.txt").is_file() else None
    init_model, tokenizer = prepare_init(init, cfg.model, resumed_tokenizer or tokenizer_dir or cfg.tokenizer,
                                         list(train_split.texts))
    fusion = init_model.model.fusion
    check_store(store, fusion.cfg)
    if rcfg.max_text_len > fusion.cfg.text.max_position:
        raise UserError(f"retrieval.max_text_len {rcfg.max_text_len} exceeds the model's max_position "
                        f"{fusion.cfg.text.max_position}")
    model = RetrievalModel(fusion, rcfg, init_model.model.heads.itm)
    if init_model.model.heads.itm is None:
        note(f"--init {init_model.source} has no ITM head; it starts fresh")
    trainable = apply_mode(model, cfg.finetune)
    token_ids = encode_texts(tokenizer, train_split.texts, rcfg.max_text_len)
    train_cfg = steps_for_epochs(cfg.train, rcfg.epochs, len(train_split.image_ids))
    run = RetrievalRun(task=TASK_NAME, model=fusion.cfg, heads=RetrievalModel.heads_config(), retrieval=rcfg,
                       train=train_cfg, init=init_model.source, features=str(Path(features).resolve()),
                       karpathy=str(Path(karpathy).resolve()), finetune=cfg.finetune)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    from vl.data.text_pretrain import TextBatchStream

    collate = RetrievalCollator(train_split, token_ids, store, fusion.cfg.region.feature_dim, rcfg.max_regions,
                                tokenizer.pad_id, region_tagger(store, tokenizer, fusion.cfg))
    stream = TextBatchStream(RetrievalTrainData(train_split, token_ids, train_cfg.seed), train_cfg.batch_size,
                             collate, seed=train_cfg.seed)

    def validate(eval_model: RetrievalModel) -> dict[str, Any]:
        index = RetrievalIndex(eval_model, tokenizer, val_split, store, rcfg, progress=False)
        return evaluate_index(index, rcfg.rerank_k)[0]

    def evaluate(eval_model: nn.Module, step: int) -> dict[str, float]:
        report = validate(eval_model)
        values = {}
        for method in ("first_stage", "two_stage"):
            for direction, short in (("text_to_image", "t2i"), ("image_to_text", "i2t")):
                for name, value in report[method][direction].items():
                    values[f"val_{method}_{short}_r{name[2:]}"] = value
        return values

    note(f"finetune retrieval: {len(train_split.image_ids)} training images ({len(train_split.texts)} captions), "
         f"{len(val_split.image_ids) if val_split else 0} validation images, {train_cfg.steps} steps from "
         f"{init_model.source}, mode {cfg.finetune.mode} "
         f"({sum(p.numel() for n, p in model.named_parameters() if n in trainable):,} trainable parameters)")
    result = train(model, stream, train_cfg, out, run_config=run, evaluate=evaluate if val_split else None,
                   loss_weights={"itm": rcfg.itm_weight, "contrastive": rcfg.contrastive_weight},
                   desc="finetune retrieval")
    report: dict[str, Any] = {}
    if val_split is not None:
        report = validate(model)
        atomic_write_text(out / VAL_METRICS_FILE, json.dumps(report, indent=2) + "\n")
    return result, report


def load_retrieval_run(run_dir: str | os.PathLike) -> tuple[RetrievalModel, RetrievalRun, Tokenizer]:
    """A fine-tuned retrieval run: (model in eval mode, its config, tokenizer)."""
    from vl.checkpoints.io import load_into, load_state_file

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir} is not a directory")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"--run {run_dir} has no config.yaml (not a retrieval run)")
    try:
        run = load_config(RetrievalRun, config_path)
    except ConfigError as err:
        raise UserError(f"--run {run_dir} is not a retrieval run ({str(err).splitlines()[0]})") from None
    if run.task != TASK_NAME:
        raise UserError(f"--run {run_dir} was fine-tuned for '{run.task}', not '{TASK_NAME}'")
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"--run {run_dir} has no model.safetensors (did its training finish?)")
    model = RetrievalModel(build_fusion(run.model), run.retrieval)
    prepare_mode(model, run.finetune)
    load_into(model, load_state_file(weights), weights)
    model.eval()
    return model, run, Tokenizer.from_dir(run_dir)


def evaluate_retrieval(run_dir: str | os.PathLike, karpathy: str | os.PathLike, split: str,
                       features: str | os.PathLike, out: str | os.PathLike, k: int | None = None, full: bool = False,
                       top: int = 10, max_images: int | None = None, batch_size: int | None = None,
                       pair_score: PairScore | None = None) -> dict[str, Any]:
    """Recall@1/5/10 of a retrieval run on a Karpathy split (first stage, two-stage and, with ``full``, ITM on every
    pair); writes RANKINGS.json (the two-stage ranking, or the full one with ``full``; ``top`` >= 10 per query).
    Returns the report (see ``evaluate_index``)."""
    if top < 10:
        raise UserError(f"--top must be at least 10 (RANKINGS.json lists the top 10 or more), got {top}")
    if k is not None and k < 1:
        raise UserError(f"--k must be >= 1, got {k}")
    model, run, tokenizer = load_retrieval_run(run_dir)
    store = open_store(features)
    check_store(store, run.model)
    data = load_split(karpathy, split, store, max_images)
    index = RetrievalIndex(model, tokenizer, data, store, run.retrieval, batch_size, pair_score=pair_score)
    report, rankings = evaluate_index(index, k or run.retrieval.rerank_k, full, top)
    report["split"] = split
    report["rankings_from"] = "full" if full else "two_stage"
    document = rankings_json(data, rankings["text_to_image"], rankings["image_to_text"])
    atomic_write_text(out, json.dumps(document) + "\n")
    return report
