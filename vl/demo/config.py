"""The demo's sizes and budgets (``DemoConfig``), and the names of its VQA runs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vl.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and budgets of the demo; ``quick()`` shrinks it to a smoke test of every stage."""

    seed: int = 0
    size: int = 128  # image side in pixels
    train_images: int = 3000  # 30,000 training questions: fewer are memorised within the fine-tuning budget
    val_images: int = 100
    test_images: int = 500  # 5,000 test questions: the VQA comparison's noise is well under a point
    questions_per_image: int = 10
    detector_config: str = "detector-tiny.yaml"
    detector_steps: int = 2000  # the classifier loss still falls at 1,500
    single_stream_config: str = "pretrain-uniter-small.yaml"
    dual_stream_config: str = "pretrain-lxmert-small.yaml"
    pretrain_steps: int | None = None  # None: each pretraining config's own train.steps
    vqa_config: str = "finetune-vqa-tiny.yaml"
    vqa_steps: int = 1000
    # data efficiency: each VQA model is also fine-tuned on these shares of the training questions, with these steps
    data_fractions: tuple[float, ...] = (0.01, 0.1)
    fraction_steps: tuple[int, ...] = (300, 1000)  # 10% of the questions needs as many steps as all of them
    retrieval_config: str = "finetune-retrieval-tiny.yaml"
    retrieval_steps: int = 1000  # text→image R@1 still rose between 600 and 1,000 steps
    num_boxes: int = 10  # regions per image in the feature store
    vocab_size: int = 400  # WordPiece vocabulary shared by every model
    example_questions: int = 3  # `vl vqa` calls on held-out images
    # stages after feature extraction that run at a time, each on cores // parallel threads (1: one after another)
    parallel: int = 2
    extra_sets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # stage -> extra --set overrides

    @staticmethod
    def quick(seed: int = 0) -> DemoConfig:
        return DemoConfig(seed=seed, size=64, train_images=24, val_images=8, test_images=8, detector_steps=6,
                          pretrain_steps=4, vqa_steps=4, data_fractions=(0.5,), fraction_steps=(2,),
                          retrieval_steps=4, example_questions=1,
                          # its 24 training images hold fewer captions than one pretraining batch of 128
                          extra_sets={"pretrain": ("train.batch_size=16",)})

    def __post_init__(self) -> None:
        if len(self.data_fractions) != len(self.fraction_steps):
            raise UserError("demo: data_fractions and fraction_steps need one entry each per fraction")
        if not all(0.0 < fraction < 1.0 for fraction in self.data_fractions):
            raise UserError(f"demo: data_fractions must lie in (0, 1), got {list(self.data_fractions)}")


VQA_MODELS = ("vqa-single", "vqa-scratch", "vqa-dual", "vqa-scratch-dual")  # the four VQA models of the demo


def fraction_stage(name: str, fraction: float) -> str:
    """The stage (and run) name of VQA model ``name`` fine-tuned on ``fraction`` of the questions
    (``vqa-single-10pct``)."""
    return f"{name}-{fraction * 100:g}pct"


def demo_config(quick: bool, seed: int, overrides: dict[str, Any] | None = None) -> DemoConfig:
    cfg = DemoConfig.quick(seed) if quick else DemoConfig(seed=seed)
    return replace(cfg, **(overrides or {}))
