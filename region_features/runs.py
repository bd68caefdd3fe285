"""Reading a trained detector: a run directory of ``vl-regions train``, or a config naming weights on disk.

A run directory holds (written by ``vl.train.detector``)::

    RUN/config.yaml                  the resolved run config; only its ``detector:`` section is read here
    RUN/labels.json                  {"categories": [{"id", "name"}], "attributes": [...], "flip_attributes": [...]}
    RUN/checkpoints/step-N/          model.safetensors + train_state.pt
    RUN/model.safetensors            the final weights
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from region_features.detector import DetectorConfig, RegionDetector
from region_features.pipeline import DetectorLabels, load_weights
from vl.config import from_dict, read_yaml
from vl.errors import UserError

_STEP_DIR = re.compile(r"^step-(\d+)$")


def read_detector_config(path: Path) -> DetectorConfig:
    """The ``detector:`` section of a run config; the training sections are the trainer's business."""
    data = read_yaml(path)
    section = data.get("detector", {}) if isinstance(data, dict) else data
    return from_dict(DetectorConfig, section, source=str(path), prefix="detector")


def newest_weights(run: Path) -> Path | None:
    """The weights of the newest complete checkpoint, else the run's final ``model.safetensors``, else None."""
    root = run / "checkpoints"
    steps = []
    if root.is_dir():
        for path in root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / "model.safetensors").is_file():
                steps.append((int(match.group(1)), path / "model.safetensors"))
    if steps:
        return max(steps)[1]
    final = run / "model.safetensors"
    return final if final.is_file() else None


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
        detector_cfg = read_detector_config(config_path)
        labels = DetectorLabels.read(source / "labels.json")
        weights = newest_weights(source)
        if weights is not None:
            model = RegionDetector(dataclasses.replace(detector_cfg, weights_path=None))
            load_weights(model, weights)
        elif detector_cfg.weights_path is not None:
            model = RegionDetector(detector_cfg)
        else:
            raise UserError(f"--detector {source} has no weights (no checkpoint, model.safetensors or weights_path)")
    elif source.is_file():
        detector_cfg = read_detector_config(source)
        if detector_cfg.weights_path is None:
            raise UserError(f"--detector {source}: a config needs detector.weights_path naming its weights")
        model = RegionDetector(detector_cfg)
        labels = _default_labels(detector_cfg)
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
