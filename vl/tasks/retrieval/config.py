"""Retrieval fine-tuning settings: the ``retrieval:`` section (``RetrievalConfig``: first-stage embeddings,
hard negatives, re-ranking, splits) and the config file (``RetrievalFinetuneConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vl.data.formats import KARPATHY_SPLITS
from vl.fusion.base import FusionConfig
from vl.tasks.vl_finetune import VLFinetuneMode
from vl.train.loop import TrainConfig

TASK_NAME = "retrieval"
PairScore = Literal["itm", "itm+similarity", "itm+contrastive"]
PAIR_SCORES = ("itm", "itm+similarity", "itm+contrastive")
# UNITER (the hardest by ITM score), the hardest by first-stage similarity, or ALBEF (drawn by similarity)
NegativeSource = Literal["itm", "contrastive", "sampled"]
NEGATIVE_SOURCES = ("itm", "contrastive", "sampled")
VAL_METRICS_FILE = "val_metrics.json"


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
