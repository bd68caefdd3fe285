"""The run config of ``vl pretrain`` (``configs/pretrain-*.yaml``): model, heads, data, objectives, train, qa.

See ``vl.train.pretrain_vl`` for what each section means and what a run directory holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from vl.data.vl_batches import PretrainDataConfig
from vl.fusion.base import FusionConfig
from vl.fusion.pretraining import HeadsConfig
from vl.train.loop import TrainConfig

CAPTION_OBJECTIVES = ("mlm", "mrc", "mrc_kl", "mrfr", "itm", "wra")  # what image-caption data can train
PRETRAIN_OBJECTIVES = (*CAPTION_OBJECTIVES, "qa")  # qa: image questions given with --questions / --annotations
FAULTS_FILE = "faults.json"
QUESTIONS_DIR = "qa"


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective of a pretraining run (``objectives.<name>`` in YAML)."""

    weight: float = 1.0  # weight of its loss in the summed loss
    mix: float = 1.0  # data.mix "sample": relative frequency of batches serving this objective
    options: dict[str, Any] = field(default_factory=dict)  # constructor options, e.g. mrfr {loss: smooth_l1}

    def __post_init__(self):
        if self.weight < 0 or self.mix < 0:
            raise ValueError(f"weight and mix must be >= 0, got weight={self.weight}, mix={self.mix}")


def _default_objectives() -> dict[str, ObjectiveSpec]:
    return {"mlm": ObjectiveSpec(), "itm": ObjectiveSpec()}


@dataclass(frozen=True)
class QAConfig:
    """The ``qa:`` section: the answer vocabulary built from ``--annotations`` (as ``vl finetune vqa`` builds it)."""

    min_answer_count: int = 9  # answers given fewer times are left out (9 gives VQA v2's 3,129)
    answer_counting: Literal["multiple_choice", "all"] = "multiple_choice"  # per question, or every annotator

    def __post_init__(self):
        if self.min_answer_count < 1:
            raise ValueError(f"min_answer_count must be >= 1, got {self.min_answer_count}")


@dataclass(frozen=True)
class VLPretrainConfig:
    """A vision-language pretraining run (see the module docstring)."""

    model: FusionConfig = field(default_factory=FusionConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    objectives: dict[str, ObjectiveSpec] = field(default_factory=_default_objectives)
    train: TrainConfig = field(default_factory=TrainConfig)
    tokenizer: str | None = None  # a tokenizer directory (vocab.txt); None: --init's, else trained on the captions
    tokenizer_min_frequency: int = 2  # a tokenizer trained on the captions: least count of a merged piece
    tokenizer_max_captions: int = 200_000  # ... trained on at most this many captions
    qa: QAConfig = field(default_factory=QAConfig)
    # Recorded by the command, for reproducibility:
    init: str | None = None
    shards: str | None = None
    features: str | None = None
    questions: str | None = None
    annotations: str | None = None

    def __post_init__(self):
        if not self.objectives:
            raise ValueError("objectives: list at least one objective")
        for name in self.objectives:
            if name not in PRETRAIN_OBJECTIVES:
                raise ValueError(f"objective '{name}' cannot be pretrained (known: {', '.join(PRETRAIN_OBJECTIVES)})")
        if self.data.mix == "sample" and not any(spec.mix > 0 for spec in self.objectives.values()):
            raise ValueError("data.mix 'sample' needs an objective with mix > 0")
