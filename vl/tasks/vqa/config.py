"""VQA fine-tuning settings: the ``vqa:`` section (``VqaConfig``) and the config file (``VqaFinetuneConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vl.fusion.base import FusionConfig
from vl.tasks.vl_finetune import VLFinetuneMode
from vl.train.loop import TrainConfig

TASK_NAME = "vqa"
VAL_METRICS_FILE = "val_metrics.json"
AnswerCounting = Literal["multiple_choice", "all"]


@dataclass(frozen=True)
class VqaConfig:
    """The ``vqa:`` section of a VQA fine-tuning config."""

    min_answer_count: int = 9  # k: answers given fewer times in training are not in the vocabulary
    answer_counting: AnswerCounting = "multiple_choice"  # count multiple_choice_answer, or every annotator answer
    max_text_len: int = 24  # word pieces per question, [CLS] and [SEP] included
    max_regions: int = 100  # regions per image (the store's first ones)
    epochs: float = 0.0  # > 0: train.steps = ceil(epochs * training questions / batch); 0: train.steps as given
    eval_batch_size: int = 128
    train_fraction: float = 1.0  # fine-tune on this share of the training questions (data-efficiency studies)
    subset_seed: int = 0  # which questions a train_fraction keeps: the same seed keeps the same ones in every run

    def __post_init__(self):
        if self.min_answer_count < 1:
            raise ValueError(f"min_answer_count must be >= 1, got {self.min_answer_count}")
        if self.answer_counting not in ("multiple_choice", "all"):
            raise ValueError(f"answer_counting must be multiple_choice or all, got {self.answer_counting!r}")
        if self.max_text_len < 3:
            raise ValueError(f"max_text_len must be at least 3, got {self.max_text_len}")
        for name in ("max_regions", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")


@dataclass(frozen=True)
class VqaFinetuneConfig:
    """What ``vl finetune vqa --config`` holds (``configs/finetune-vqa-*.yaml``).

    ``model`` (a ``FusionConfig`` mapping, or the name of a model config file) is used only by ``--init scratch``
    and BERT inits; every other ``--init`` brings its own architecture.
    """

    model: FusionConfig | None = None
    vqa: VqaConfig = field(default_factory=VqaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tokenizer: str | None = None  # a tokenizer directory; default: --init's (scratch: trained on the questions)
    finetune: VLFinetuneMode = field(default_factory=VLFinetuneMode)
