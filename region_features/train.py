"""Training the region detector on COCO instances: ``vl-regions train``.

A run directory holds everything needed to use or continue it::

    RUN/config.yaml                     the resolved ``DetectorRunConfig`` (detector.num_classes/num_attributes filled)
    RUN/labels.json                     {"categories": [{"id", "name"}], "attributes": [...], "flip_attributes": [...]}
    RUN/checkpoints/step-XXXXXXXX/      model.safetensors + train_state.pt (optimizer, step, data position, RNG)
    RUN/checkpoints/latest              the name of the newest complete checkpoint
    RUN/model.safetensors               the final weights (written when training ends)
    RUN/log.jsonl                       one line per logged step: step, lr, loss and each named loss
    RUN/metrics.json                    COCO mAP, mAP@0.5 and attribute accuracy on the validation set

Every file is written through a temporary name and a rename; a checkpoint directory is renamed into place only when
complete. Rerunning the same command resumes from ``latest`` exactly: the same sample order, flips and scales follow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from vl.progress import progress_bar

from region_features.coco import CocoInstances, flip_permutation, read_instances
from region_features.detector import BoxSelection, DetectorConfig, RegionDetector
from region_features.images import ProblemLog, load_image
from region_features.pipeline import (
    DetectorLabels,
    ImageFileDataset,
    batches_of,
    detection_results,
    load_weights,
    save_weights,
)
from vl.atomic import atomic_directory
from vl.config import atomic_write_text, load_config, save_config, to_dict
from vl.errors import UserError
from vl.precision import autocast, resolve_precision
from vl.train.schedule import lr_multiplier


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data settings of ``vl-regions train``."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    warmup_steps: int = 100
    max_steps: int = 1000  # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 8
    grad_clip: float = 10.0  # max gradient norm; 0 = off
    flip: bool = True  # random horizontal flips (left/right attribute words are swapped with the boxes)
    attribute_loss_weight: float = 1.0
    attribute_pos_weight: float = 0.0  # > 0: weight rare attributes' positives by negatives/positives, capped here
    checkpoint_every: int = 200  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # newest checkpoint directories kept
    eval_every: int = 0  # steps between validation runs; 0 = only at the end
    eval_batch_size: int = 8
    log_every: int = 10
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # forward-pass autocast; auto: bf16 where native (vl.precision)
    channels_last: bool = True  # channels-last convolutions (faster on CPU)
    num_workers: int = 0  # DataLoader worker processes decoding images
    threads: int = 0  # torch CPU threads; 0 = torch's default
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every",
                     "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if self.lr <= 0 or self.warmup_steps < 0 or self.num_workers < 0 or self.eval_every < 0:
            raise ValueError("train.lr must be > 0; warmup_steps, num_workers and eval_every >= 0")


@dataclass(frozen=True)
class DetectorRunConfig:
    """Everything a detector run is made from: the model and its training."""

    detector: DetectorConfig = field(default_factory=DetectorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------------------- data


class DetectionTrainData(Dataset):
    """COCO instances as training samples. Indexed by ``(index, flip)`` (see ``EpochSampler``).

    Returns a dict: ``index``, ``path``, ``image`` (3, H, W) uint8 or None when unreadable, ``warning`` (str or
    None), ``boxes`` (N, 4) float32 x1y1x2y2, ``labels`` (N,) int64 in 1..C, ``attributes`` (N, A) float32
    multi-hot. Crowd and degenerate boxes are left out; boxes are clipped to the decoded image.
    """

    def __init__(self, instances: CocoInstances, images_dir: str | os.PathLike, labels: DetectorLabels) -> None:
        self.images_dir = Path(images_dir)
        self.label_of = {category["id"]: i + 1 for i, category in enumerate(labels.categories)}
        attribute_index = {name: i for i, name in enumerate(labels.attributes)}
        self.flip_perm = torch.tensor(labels.flip_attributes or list(range(len(labels.attributes))), dtype=torch.long)
        self.items = []
        for image in instances.images:
            boxes = [b for b in image.boxes if not b.iscrowd and b.category_id in self.label_of]
            attributes = np.zeros((len(boxes), len(labels.attributes)), dtype=np.float32)
            for row, box in enumerate(boxes):
                for name in box.attributes:
                    if name in attribute_index:
                        attributes[row, attribute_index[name]] = 1.0
            self.items.append((
                str(self.images_dir / image.file_name),
                np.array([b.bbox for b in boxes], dtype=np.float32).reshape(-1, 4),
                np.array([self.label_of[b.category_id] for b in boxes], dtype=np.int64),
                attributes,
            ))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, bool]) -> dict:
        index, flip = key
        path, boxes, labels, attributes = self.items[index]
        loaded = load_image(path)
        sample = {"index": index, "path": path, "image": None, "warning": loaded.warning}
        if loaded.image is None:
            return sample
        image = torch.from_numpy(np.asarray(loaded.image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
        height, width = image.shape[-2:]
        boxes = torch.from_numpy(boxes).clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        valid = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        boxes, labels, attributes = boxes[valid], torch.from_numpy(labels)[valid], torch.from_numpy(attributes)[valid]
        if flip:
            image = image.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            attributes = attributes[:, self.flip_perm]  # an involution: left <-> right twins
        sample.update(image=image.contiguous(), boxes=boxes, labels=labels, attributes=attributes)
        return sample


class EpochSampler(Sampler):
    """Yields ``(index, flip)`` in a seeded order per epoch, starting at ``start`` (a resumed position)."""

    def __init__(self, size: int, seed: int, flip: bool) -> None:
        self.size, self.seed, self.flip = size, seed, flip
        self.epoch = 0
        self.start = 0

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        flips = (torch.rand(self.size, generator=generator) < 0.5).tolist()
        for position in range(self.start, self.size):
            yield order[position], bool(flips[position]) and self.flip

    def __len__(self) -> int:
        return self.size - self.start


def attribute_pos_weights(dataset: DetectionTrainData, cap: float) -> torch.Tensor:
    """Per attribute: (boxes without it) / (boxes with it), clamped to [1, cap]; (A,)."""
    attributes = np.concatenate([item[3] for item in dataset.items]) if dataset.items else np.zeros((0, 0))
    positives = torch.from_numpy(attributes.sum(0)).float()
    negatives = len(attributes) - positives
    return (negatives / positives.clamp_min(1.0)).clamp(1.0, cap)


def _collate(samples: list[dict]) -> list[dict]:
    return samples


# ------------------------------------------------------------------------------------------------------- checkpoints


def _checkpoint_dir(run: Path) -> Path:
    return run / "checkpoints"


def latest_checkpoint(run: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    root = _checkpoint_dir(Path(run))
    latest = root / "latest"
    if latest.is_file():
        candidate = root / latest.read_text().strip()
        if (candidate / "model.safetensors").is_file():
            return candidate
    steps = sorted(p for p in root.glob("step-*") if (p / "model.safetensors").is_file()) if root.is_dir() else []
    return steps[-1] if steps else None


def _write_checkpoint(run: Path, model: RegionDetector, state: dict, keep: int) -> Path:
    root = _checkpoint_dir(run)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:08d}"
    final = root / name
    with atomic_directory(final) as tmp:
        save_weights(model, tmp / "model.safetensors")
        torch.save(state, tmp / "train_state.pt")
    atomic_write_text(root / "latest", name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(checkpoint: Path, model: RegionDetector, optimizer: torch.optim.Optimizer) -> dict:
    load_weights(model, checkpoint / "model.safetensors")
    try:
        state = torch.load(checkpoint / "train_state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
    except Exception as err:  # noqa: BLE001 - a damaged state file is a user-facing error
        raise UserError(f"{checkpoint / 'train_state.pt'}: unreadable training state ({err})") from None
    return state


# ----------------------------------------------------------------------------------------------------------- evaluation


def evaluate_detector(
    model: RegionDetector,
    instances: CocoInstances,
    images_dir: str | os.PathLike,
    labels: DetectorLabels,
    batch_size: int = 8,
    num_workers: int = 0,
    problems: ProblemLog | None = None,
    precision: str = "fp32",
) -> dict:
    """COCO box mAP (pycocotools) and attribute accuracy on an annotated image set (``precision``: a resolved
    ``vl.precision`` choice for the forward passes).

    Attribute accuracy: for each ground-truth box with n >= 1 attributes, the attribute head (conditioned on the
    class the model predicts for that box) ranks all attributes; the share of its top n that are true. Chance level
    is n / A (``attr_chance``). ``attr_top1`` is the share of boxes whose single best attribute is true.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    problems = problems or ProblemLog()
    images_dir = Path(images_dir)
    items = [(image.image_id, images_dir / image.file_name) for image in instances.images]
    gt_boxes = {image.image_id: image.boxes for image in instances.images}
    attribute_index = {name: i for i, name in enumerate(labels.attributes)}
    dataset = ImageFileDataset(items, model.cfg.min_size, model.cfg.max_size)
    was_training = model.training
    model.eval()
    results: list[dict] = []
    attr_hits = attr_total = top1_hits = attr_boxes = 0
    chance = 0.0
    try:
        for batch in batches_of(dataset, batch_size, num_workers, problems):
            with torch.inference_mode(), autocast(precision, "cpu"):
                detections = model.detect_resized([sample["image"] for sample in batch])
            results.extend(detection_results(batch, detections, labels))
            if model.num_attributes == 0:
                continue
            given = []
            for sample in batch:
                boxes = [b.bbox for b in gt_boxes[sample["image_id"]] if not b.iscrowd]
                given.append(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * sample["scale"])
            with torch.inference_mode(), autocast(precision, "cpu"):
                regions = model.extract_regions([s["image"] for s in batch], BoxSelection(), given_boxes=given)
            for sample, region in zip(batch, regions):
                boxes = [b for b in gt_boxes[sample["image_id"]] if not b.iscrowd]
                for box, probs in zip(boxes, region["attr_probs"]):
                    truth = {attribute_index[a] for a in box.attributes if a in attribute_index}
                    if not truth:
                        continue
                    ranked = torch.argsort(probs, descending=True).tolist()
                    attr_hits += len(truth & set(ranked[: len(truth)]))
                    attr_total += len(truth)
                    top1_hits += int(ranked[0] in truth)
                    attr_boxes += 1
                    chance += len(truth) / len(labels.attributes)
    finally:
        model.train(was_training)
    metrics = {"images": len(items), "detections": len(results)}
    gt = _coco_ground_truth(instances)
    if results and gt["annotations"]:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(results)
            evaluator = COCOeval(coco_gt, coco_dt, "bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics["mAP"] = round(float(max(evaluator.stats[0], 0.0)), 4)
        metrics["mAP@0.5"] = round(float(max(evaluator.stats[1], 0.0)), 4)
    else:
        metrics["mAP"] = metrics["mAP@0.5"] = 0.0
    if attr_boxes:
        metrics["attr_accuracy"] = round(attr_hits / attr_total, 4)
        metrics["attr_top1"] = round(top1_hits / attr_boxes, 4)
        metrics["attr_chance"] = round(chance / attr_boxes, 4)
    return metrics


def _coco_ground_truth(instances: CocoInstances) -> dict:
    """A pycocotools-ready dict from the parsed instances (``area`` from the box, ids renumbered)."""
    images, annotations = [], []
    for image in instances.images:
        images.append({"id": image.image_id, "file_name": image.file_name,
                       "width": image.width or 0, "height": image.height or 0})
        for box in image.boxes:
            x1, y1, x2, y2 = box.bbox
            annotations.append({"id": len(annotations) + 1, "image_id": image.image_id,
                                "category_id": box.category_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": int(box.iscrowd)})
    return {"images": images, "annotations": annotations, "categories": instances.categories}


# ----------------------------------------------------------------------------------------------------------- training


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
        saved = load_config(DetectorRunConfig, saved_cfg_path)
        if to_dict(dataclasses.replace(saved.detector, weights_path=None)) != to_dict(
            dataclasses.replace(cfg.detector, weights_path=None)
        ):
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
    progress: bool | None = None,
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
    tcfg = cfg.train
    checkpoint = latest_checkpoint(run)
    if checkpoint is not None:
        _check_resume_compatible(run, cfg, labels)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run)
    labels.write(run / "labels.json")

    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    precision = resolve_precision(tcfg.precision, "cpu")
    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)
    model_cfg = cfg.detector if checkpoint is None else dataclasses.replace(cfg.detector, weights_path=None)
    model = RegionDetector(model_cfg)
    if tcfg.channels_last:
        model.use_channels_last()
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    # The fused AdamW kernel (CPU and CUDA) updates every tensor in one call; the default per-tensor loop cost
    # ~14 ms of a ~170 ms step of detector-tiny on 2 CPU cores. SGD gets the multi-tensor path.
    if tcfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(parameters, lr=tcfg.lr, weight_decay=tcfg.weight_decay, fused=True)
    else:
        optimizer = torch.optim.SGD(parameters, lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay,
                                    foreach=True)

    dataset = DetectionTrainData(instances, images_dir, labels)
    if model.num_attributes and tcfg.attribute_pos_weight > 0 and checkpoint is None:
        model.roi_heads.attr_head.pos_weight.copy_(attribute_pos_weights(dataset, tcfg.attribute_pos_weight))
    if len(dataset) < tcfg.batch_size:
        raise UserError(f"{instances_path} has {len(dataset)} images, fewer than train.batch_size={tcfg.batch_size}")
    sampler = EpochSampler(len(dataset), tcfg.seed, tcfg.flip)
    step = 0
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, model, optimizer)
        step, sampler.epoch, sampler.start = int(state["step"]), int(state["epoch"]), int(state["position"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_tuples(state["python_rng"]))
        _truncate_log(run / "log.jsonl", step)
        print(f"resuming {run} from {checkpoint.name}", file=sys.stderr)
    problems = ProblemLog()
    warned: set[str] = set()
    # Its own generator, so that creating an epoch's iterator does not draw from the global RNG (exact resume).
    loader = DataLoader(dataset, batch_size=tcfg.batch_size, sampler=sampler, num_workers=tcfg.num_workers,
                        collate_fn=_collate, drop_last=True, generator=torch.Generator().manual_seed(tcfg.seed))
    metrics: dict = {}
    bar = progress_bar(total=tcfg.max_steps, initial=step, desc="train detector", show=progress)
    last_checkpoint_step = step
    started = time.time()
    try:
        while step < tcfg.max_steps:
            for batch in loader:
                sampler.start += len(batch)
                images, targets = [], []
                for sample in batch:
                    if sample["warning"] and sample["path"] not in warned:  # once per file, not per epoch
                        warned.add(sample["path"])
                        problems.warn_image(sample["path"], sample["warning"])
                    if sample["image"] is None:
                        continue
                    images.append(sample["image"].float().div_(255.0))
                    target = {"boxes": sample["boxes"], "labels": sample["labels"]}
                    if model.num_attributes:
                        target["attributes"] = sample["attributes"]
                    targets.append(target)
                if not images:
                    continue
                lr = tcfg.lr * lr_multiplier(step, tcfg.max_steps, tcfg.warmup_steps, tcfg.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast(precision, "cpu"):
                    losses = model(images, targets)
                losses = {name: value.float() for name, value in losses.items()}
                weights = {"loss_attributes": tcfg.attribute_loss_weight}
                loss = sum(weights.get(name, 1.0) * value for name, value in losses.items())
                if not torch.isfinite(loss):
                    raise UserError(f"training diverged at step {step} (loss {loss.item()}); lower train.lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tcfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(parameters, tcfg.grad_clip)
                optimizer.step()
                step += 1
                bar.update(1)
                if step % tcfg.log_every == 0 or step == tcfg.max_steps:
                    record = {"step": step, "lr": lr, "loss": round(loss.item(), 5),
                              **{name: round(value.item(), 5) for name, value in losses.items()}}
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                    with open(run / "log.jsonl", "a") as log:
                        log.write(json.dumps(record) + "\n")
                if step % tcfg.checkpoint_every == 0 or step == tcfg.max_steps:
                    _write_checkpoint(run, model, _train_state(step, sampler, optimizer), tcfg.keep_checkpoints)
                    last_checkpoint_step = step
                if val_instances is not None and tcfg.eval_every and step % tcfg.eval_every == 0 and (
                    step < tcfg.max_steps
                ):
                    metrics = _evaluate_and_write(model, val_instances, val_images_dir, labels, tcfg, run, step,
                                                  problems)
                    bar.write(f"step {step}: " + json.dumps(metrics))
                if step >= tcfg.max_steps:
                    break
            else:  # the epoch is used up (a last partial batch is dropped)
                sampler.epoch += 1
                sampler.start = 0
    finally:
        bar.close()
    if last_checkpoint_step != step:  # e.g. a resumed run that was already complete
        _write_checkpoint(run, model, _train_state(step, sampler, optimizer), tcfg.keep_checkpoints)
    save_weights(model, run / "model.safetensors")
    elapsed = time.time() - started
    if val_instances is not None:
        metrics = _evaluate_and_write(model, val_instances, val_images_dir, labels, tcfg, run, step, problems)
        metrics["train_seconds"] = round(elapsed, 1)
        atomic_write_text(run / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    summary = problems.summary()
    if summary:
        print(summary, file=sys.stderr)
    return metrics


def _evaluate_and_write(model, val_instances, val_images_dir, labels, tcfg, run, step, problems) -> dict:
    metrics = evaluate_detector(model, val_instances, val_images_dir, labels, tcfg.eval_batch_size,
                                tcfg.num_workers, problems, resolve_precision(tcfg.precision, "cpu", quiet=True))
    metrics = {"step": step, **metrics}
    atomic_write_text(run / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def _train_state(step: int, sampler: EpochSampler, optimizer: torch.optim.Optimizer) -> dict:
    """Everything besides the weights that an exact resume needs; plain containers and tensors only."""
    return {
        "step": step,
        "epoch": sampler.epoch,
        "position": sampler.start,
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": _lists(random.getstate()),
    }


def _lists(value):
    return [_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint a resumed run restarts from)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def load_detector(source: str | os.PathLike) -> tuple[RegionDetector, DetectorLabels]:
    """A detector ready for inference (eval mode) from ``--detector``: a run directory of ``vl-regions train``
    (weights from its newest checkpoint, else ``model.safetensors``, else ``detector.weights_path``), or a run
    config YAML whose ``detector.weights_path`` names the weights (e.g. a torchvision ``fasterrcnn_resnet50_fpn``
    state dict; its COCO class names are used when it has torchvision's 90 classes)."""
    source = Path(source)
    if source.is_dir():
        config_path = source / "config.yaml"
        if not config_path.is_file():
            raise UserError(f"--detector {source} is not a detector run (no config.yaml)")
        cfg = load_config(DetectorRunConfig, config_path)
        labels = DetectorLabels.read(source / "labels.json")
        checkpoint = latest_checkpoint(source)
        weights = checkpoint / "model.safetensors" if checkpoint is not None else source / "model.safetensors"
        if weights.is_file():
            model = RegionDetector(dataclasses.replace(cfg.detector, weights_path=None))
            load_weights(model, weights)
        elif cfg.detector.weights_path is not None:
            model = RegionDetector(cfg.detector)
        else:
            raise UserError(f"--detector {source} has no weights (no checkpoint, model.safetensors or weights_path)")
    elif source.is_file():
        cfg = load_config(DetectorRunConfig, source)
        if cfg.detector.weights_path is None:
            raise UserError(f"--detector {source}: a config needs detector.weights_path naming its weights")
        model = RegionDetector(cfg.detector)
        labels = _default_labels(cfg.detector)
    else:
        raise UserError(f"--detector {source} does not exist")
    if len(labels.categories) != model.num_classes or len(labels.attributes) != model.num_attributes:
        raise UserError(f"--detector {source}: labels.json does not match the model's classes/attributes")
    return model.eval(), labels


def _default_labels(cfg: DetectorConfig) -> DetectorLabels:
    if cfg.is_torchvision and cfg.num_classes == 90:
        from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

        names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
        categories = [{"id": i, "name": names[i]} for i in range(1, 91)]
    else:
        categories = [{"id": i, "name": f"class_{i}"} for i in range(1, cfg.num_classes + 1)]
    num_attributes = cfg.num_attributes if cfg.has_attributes else 0
    return DetectorLabels(categories, [f"attribute_{j}" for j in range(num_attributes)], list(range(num_attributes)))
