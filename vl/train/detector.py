"""Training the region detector on COCO instances through ``vl.train``: ``vl-regions train``.

The detector's forward returns a dict of named losses, which is what ``vl.train.loop.train`` consumes, so the
detector gets the loop's exact resume, SIGTERM saving, skipping of non-finite steps and run layout::

    RUN/config.yaml                the resolved ``DetectorRunConfig`` (detector.num_classes/num_attributes filled)
    RUN/labels.json                {"categories": [{"id", "name"}], "attributes": [...], "flip_attributes": [...]}
    RUN/checkpoints/step-N/        model.safetensors + train_state.pt (optimizer, step, data position, RNG)
    RUN/metrics.jsonl              one row per logged step (loss and each named loss) and per evaluation
    RUN/metrics.json               COCO mAP, mAP@0.5 and attribute accuracy on the validation set, at the last step
    RUN/model.safetensors          the final weights
    RUN/loss.png                   the logged curves

Rerunning the same command resumes from the newest checkpoint: the same sample order, flips and scales follow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from region_features.coco import CocoInstances, flip_permutation, read_instances
from region_features.detector import DetectorConfig, RegionDetector
from region_features.evaluate import evaluate_detector
from region_features.images import ProblemLog
from region_features.pipeline import DetectorLabels
from region_features.runs import read_detector_config
from region_features.train_data import DetectionTrainData, EpochSampler, attribute_pos_weights
from vl.config import atomic_write_text, load_config
from vl.errors import UserError
from vl.precision import resolve_precision
from vl.train.checkpoint import latest_checkpoint
from vl.train.loop import TrainConfig, make_accelerator, train

METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class DetectorDataConfig:
    flip: bool = True  # random horizontal flips (left/right attribute words are swapped with the boxes)
    num_workers: int = 0  # DataLoader worker processes decoding images
    eval_batch_size: int = 8
    channels_last: bool = True  # channels-last convolutions (faster on CPU)

    def __post_init__(self) -> None:
        if self.num_workers < 0 or self.eval_batch_size < 1:
            raise ValueError("data.num_workers must be >= 0 and data.eval_batch_size >= 1")


@dataclass(frozen=True)
class DetectorLossConfig:
    attribute_weight: float = 1.0  # weight of loss_attributes; the box and RPN losses weigh 1
    attribute_pos_weight: float = 0.0  # > 0: weight rare attributes' positives by negatives/positives, capped here


@dataclass(frozen=True)
class DetectorRunConfig:
    """Everything a detector run is made from: the model, its data, its losses and the shared training loop."""

    detector: DetectorConfig = field(default_factory=DetectorConfig)
    data: DetectorDataConfig = field(default_factory=DetectorDataConfig)
    loss: DetectorLossConfig = field(default_factory=DetectorLossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class DetectorBatches:
    """Batches of decoded training images for the loop: ``{"images": [(3, H, W) float in [0, 1]], "targets":
    [{"boxes", "labels", "attributes"?}]}``, ``batch_size`` readable images at most (unreadable ones are dropped
    with one warning per file; the last partial batch of an epoch is dropped).

    One pass is one epoch, in a seeded order that depends on the epoch; ``state_dict`` is the position in it.
    """

    def __init__(self, dataset: DetectionTrainData, batch_size: int, seed: int, flip: bool, num_workers: int,
                 with_attributes: bool, problems: ProblemLog) -> None:
        self.with_attributes, self.problems = with_attributes, problems
        self.sampler = EpochSampler(len(dataset), seed, flip)
        # Its own generator, so that creating an epoch's iterator draws nothing from the global RNG (exact resume).
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                                 collate_fn=list, drop_last=True, generator=torch.Generator().manual_seed(seed))
        self.epoch, self.position = 0, 0
        self.warned: set[str] = set()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.sampler.epoch, self.sampler.start = self.epoch, self.position
        for samples in self.loader:
            self.position += len(samples)
            images, targets = [], []
            for sample in samples:
                if sample["warning"] and sample["path"] not in self.warned:  # once per file, not per epoch
                    self.warned.add(sample["path"])
                    self.problems.warn_image(sample["path"], sample["warning"])
                if sample["image"] is None:
                    continue
                images.append(sample["image"].float().div_(255.0))
                target = {"boxes": sample["boxes"], "labels": sample["labels"]}
                if self.with_attributes:
                    target["attributes"] = sample["attributes"]
                targets.append(target)
            if images:
                yield {"images": images, "targets": targets}
        self.epoch, self.position = self.epoch + 1, 0


def _detector_losses(model: RegionDetector, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return model(batch["images"], batch["targets"])


def resolve_run_config(
    config_path: str | os.PathLike | None, overrides: list[str], instances: CocoInstances
) -> tuple[DetectorRunConfig, DetectorLabels]:
    """Load the config and fill in what the training data decides: class and attribute counts and names."""
    cfg = load_config(DetectorRunConfig, config_path, overrides)
    categories = sorted(({"id": c["id"], "name": str(c["name"])} for c in instances.categories), key=lambda c: c["id"])
    attributes = instances.attribute_names() if cfg.detector.attribute_head else []
    labels = DetectorLabels(categories, attributes, flip_permutation(attributes))
    detector = dataclasses.replace(cfg.detector, num_classes=len(categories), num_attributes=len(attributes))
    return dataclasses.replace(cfg, detector=detector), labels


def _check_resume_compatible(run: Path, cfg: DetectorRunConfig, labels: DetectorLabels) -> None:
    saved_cfg_path, saved_labels_path = run / "config.yaml", run / "labels.json"
    if saved_cfg_path.is_file():
        saved = dataclasses.replace(read_detector_config(saved_cfg_path), weights_path=None)
        if saved != dataclasses.replace(cfg.detector, weights_path=None):
            raise UserError(f"{run} holds a checkpoint of a different detector config; use another --out to start anew")
    if saved_labels_path.is_file() and DetectorLabels.read(saved_labels_path) != labels:
        raise UserError(f"{run} was trained on other categories/attributes; use another --out to start anew")


def train_detector(
    instances_path: str | os.PathLike,
    images_dir: str | os.PathLike,
    out: str | os.PathLike,
    val_instances_path: str | os.PathLike | None = None,
    val_images_dir: str | os.PathLike | None = None,
    config_path: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict:
    """Train (or resume) a detector run in ``out``; returns the final validation metrics ({} without a val set)."""
    run = Path(out)
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} exists and is not a directory")
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise UserError(f"--images {images_dir} is not a directory")
    if (val_instances_path is None) != (val_images_dir is None):
        raise UserError("--val-instances and --val-images go together")
    instances = read_instances(instances_path)
    val_instances = read_instances(val_instances_path, "--val-instances file") if val_instances_path else None
    cfg, labels = resolve_run_config(config_path, list(overrides), instances)
    resuming = latest_checkpoint(run) is not None
    if resuming:
        _check_resume_compatible(run, cfg, labels)
    run.mkdir(parents=True, exist_ok=True)
    labels.write(run / "labels.json")

    # The extraction stack (image decoding, NMS, box selection) runs on the CPU, and so does its training.
    accelerator = make_accelerator(cfg.train.precision, cpu=True)
    torch.manual_seed(cfg.train.seed)  # the loop seeds again before its first step; this seeds the initial weights
    model = RegionDetector(dataclasses.replace(cfg.detector, weights_path=None) if resuming else cfg.detector)
    if cfg.data.channels_last:
        model.use_channels_last()
    problems = ProblemLog()
    dataset = DetectionTrainData(instances, images_dir, labels)
    if len(dataset) < cfg.train.batch_size:
        raise UserError(f"{instances_path} has {len(dataset)} images, fewer than train.batch_size="
                        f"{cfg.train.batch_size}")
    if model.num_attributes and cfg.loss.attribute_pos_weight > 0:  # a buffer: a resumed run loads its own
        model.roi_heads.attr_head.pos_weight.copy_(attribute_pos_weights(dataset, cfg.loss.attribute_pos_weight))
    batches = DetectorBatches(dataset, cfg.train.batch_size, cfg.train.seed, cfg.data.flip, cfg.data.num_workers,
                              bool(model.num_attributes), problems)
    loss_weights = {"loss_classifier": 1.0, "loss_box_reg": 1.0, "loss_objectness": 1.0, "loss_rpn_box_reg": 1.0}
    if model.num_attributes:
        loss_weights["loss_attributes"] = cfg.loss.attribute_weight
    precision = resolve_precision(cfg.train.precision, "cpu", quiet=True)
    metrics: dict = {}

    def evaluate(trained: RegionDetector, step: int) -> dict[str, float]:
        nonlocal metrics
        metrics = {"step": step, **evaluate_detector(trained, val_instances, val_images_dir, labels,
                                                     cfg.data.eval_batch_size, cfg.data.num_workers, problems,
                                                     precision)}
        atomic_write_text(run / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
        return {name: value for name, value in metrics.items() if name != "step"}

    started = time.time()
    result = train(model, batches, cfg.train, run, compute_losses=_detector_losses, loss_weights=loss_weights,
                   run_config=cfg, evaluate=evaluate if val_instances is not None else None,
                   accelerator=accelerator, desc="train detector")
    elapsed = time.time() - started
    if val_instances is not None:
        if metrics.get("step") != result.step:  # a rerun of a finished run: the loop had no step left to evaluate
            model.eval()
            with torch.no_grad():
                evaluate(model, result.step)
        metrics["train_seconds"] = round(elapsed, 1)
        atomic_write_text(run / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    summary = problems.summary()
    if summary:
        print(summary, file=sys.stderr)
    return metrics
