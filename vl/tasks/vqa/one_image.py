"""``vl vqa``: a VQA run's answers to one question about one image file, the image's regions coming from a
detector run (``region_features.one_image.describe_image``) rather than a feature store."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from vl.data.tags import RegionTagger
from vl.errors import UserError
from vl.tasks.runs import load_task_run
from vl.tasks.vl_finetune import encode_texts, record_regions, region_batch, text_batch
from vl.tasks.vqa.model import VQA_RUN


def answer_image_question(run_dir: str | os.PathLike, detector_source: str | os.PathLike,
                          image_path: str | os.PathLike, question: str, top: int = 5,
                          selection_overrides: dict[str, Any] | None = None) -> list[tuple[str, float]]:
    """The ``top`` answers (with sigmoid scores) of a VQA run to ``question`` about one image file: regions from
    the detector run (boxes chosen as the run's feature store chose them, unless overridden), then the model."""
    from region_features.detector import BoxSelection
    from region_features.one_image import describe_image
    from region_features.runs import load_detector

    if not question.strip():
        raise UserError("--question is empty")
    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    model, run, tokenizer = load_task_run(run_dir, VQA_RUN)
    answers = list(run.answers)
    detector, labels = load_detector(detector_source)
    if detector.feature_dim != run.model.region.feature_dim:
        raise UserError(f"--detector {detector_source} gives {detector.feature_dim}-d region features but --run "
                        f"{run_dir} reads {run.model.region.feature_dim}-d ones")
    settings = {**run.extra["box_selection"], **(selection_overrides or {})}
    selection = BoxSelection(**{key: value for key, value in settings.items()
                                if key in {f.name for f in dataclasses.fields(BoxSelection)}})
    record = describe_image(detector, image_path, selection)
    tagger = None
    if run.model.tags is not None:
        tagger = RegionTagger(labels.class_names, list(labels.attributes), tokenizer, run.model.tags)
    batch = text_batch(encode_texts(tokenizer, [question], run.settings.max_text_len), tokenizer.pad_id)
    batch.update(region_batch([record_regions(record, run.settings.max_regions, tagger)], run.model.region.feature_dim))
    with torch.no_grad():
        scores = torch.sigmoid(model.logits(batch).float())[0]  # (A,)
    values, indices = scores.topk(min(top, len(answers)))
    return [(answers[index], float(value)) for value, index in zip(values.tolist(), indices.tolist())]
