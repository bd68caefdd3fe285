"""The VQA commands: ``vl finetune vqa`` (``finetune_vqa``), ``vl predict vqa`` (``predict_vqa``) and
``vl evaluate vqa`` (``evaluate_vqa_files``, ``format_vqa_metrics``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from vl.config import atomic_write_text
from vl.data.formats import VqaAnnotation, check_questions_match, read_vqa_annotations, read_vqa_questions
from vl.data.tags import region_tagger
from vl.errors import UserError
from vl.tasks.runs import TaskRun, load_task_run
from vl.text.tokenizer import Tokenizer
from vl.tasks.vl_finetune import (
    apply_mode,
    check_store,
    missing_images,
    note,
    open_store,
    prepare_init,
    steps_for_epochs,
)
from vl.tasks.vqa.answers import ANSWERS_FILE, saved_or_built_answers, write_answers
from vl.tasks.vqa.config import TASK_NAME, VAL_METRICS_FILE, VqaFinetuneConfig
from vl.tasks.vqa.data import VqaCollator, VqaExample, question_subset, shuffled_images, vqa_examples, with_features
from vl.tasks.vqa.metric import evaluate_vqa
from vl.tasks.vqa.model import VQA_RUN, VqaModel, answer_logits, predicted_answers
from vl.train.loop import TrainResult, seed_everything, train


def results_json(examples: Sequence[VqaExample], predictions: Sequence[str]) -> list[dict[str, Any]]:
    """The official results format: ``[{"question_id", "answer"}]``."""
    return [{"question_id": example.question_id, "answer": answer} for example, answer in zip(examples, predictions)]


def _store_box_selection(store: Any) -> dict[str, Any]:
    meta = store.meta if isinstance(store.meta, dict) else {}
    keys = ("min_boxes", "max_boxes", "num_boxes", "score_threshold", "nms_threshold")
    return {key: meta[key] for key in keys if key in meta}


def finetune_vqa(cfg: VqaFinetuneConfig, init: str, train_questions: str | os.PathLike,
                 train_annotations: str | os.PathLike, val_questions: str | os.PathLike | None,
                 val_annotations: str | os.PathLike | None, features: str | os.PathLike, out: str | os.PathLike,
                 tokenizer_dir: str | None = None, teacher: Any | None = None) -> tuple[TrainResult, dict[str, Any]]:
    """Fine-tune ``init`` on VQA; evaluate on the val files (official accuracy); write run directory ``out``.

    teacher: a ``vl.compress.distill.Teacher``: train the student (``init`` scratch, ``cfg.model``) on its soft
    answers as well, with its answer vocabulary and tokenizer.

    Resumes when ``out`` holds a checkpoint (the vocabulary and tokenizer saved there are reused). Returns the
    training result and the validation metrics (``evaluate_vqa``'s, also in ``out/val_metrics.json``).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if (val_questions is None) != (val_annotations is None):
        raise UserError("give both --val-questions and --val-annotations, or neither")
    questions = read_vqa_questions(train_questions)
    annotations = read_vqa_annotations(train_annotations)
    check_questions_match(questions, annotations, train_questions, train_annotations)
    questions, annotations = question_subset(questions, annotations, cfg.vqa.train_fraction, cfg.vqa.subset_seed)
    val_qs = read_vqa_questions(val_questions) if val_questions is not None else []
    val_anns = read_vqa_annotations(val_annotations) if val_annotations is not None else []
    if val_questions is not None:
        check_questions_match(val_qs, val_anns, val_questions, val_annotations)
    store = open_store(features)
    vcfg = cfg.vqa

    saved_answers = [out / ANSWERS_FILE] + ([teacher.run_dir / ANSWERS_FILE] if teacher is not None else [])
    answers = saved_or_built_answers(saved_answers, annotations, vcfg.min_answer_count, vcfg.answer_counting,
                                     f"--train-annotations {train_annotations}", "vqa.min_answer_count")
    answer_index = {answer: index for index, answer in enumerate(answers)}

    seed_everything(cfg.train.seed)
    resumed_tokenizer = str(out) if (out / "vocab.txt").is_file() else None
    if teacher is not None:
        tokenizer_dir = str(teacher.run_dir)
    init_model, tokenizer = prepare_init(init, cfg.model, resumed_tokenizer or tokenizer_dir or cfg.tokenizer,
                                         [question.question for question in questions])
    fusion = init_model.model.fusion
    check_store(store, fusion.cfg)
    if vcfg.max_text_len > fusion.cfg.text.max_position:
        raise UserError(f"vqa.max_text_len {vcfg.max_text_len} exceeds the model's max_position "
                        f"{fusion.cfg.text.max_position}")
    train_examples = with_features(vqa_examples(questions, tokenizer, vcfg.max_text_len, annotations, answer_index),
                                   store, "--features", f"--train-questions {train_questions}")
    if not train_examples:
        raise UserError(f"no question of --train-questions {train_questions} has image features in --features "
                        f"{features}")
    val_examples = with_features(vqa_examples(val_qs, tokenizer, vcfg.max_text_len), store, "--features",
                                 f"--val-questions {val_questions}") if val_qs else []
    val_ids = {example.question_id for example in val_examples}
    val_gold = [annotation for annotation in val_anns if annotation.question_id in val_ids]

    train_cfg = steps_for_epochs(cfg.train, vcfg.epochs, len(train_examples))
    model = VqaModel(fusion, len(answers))
    compute_losses, loss_weights, source = None, {"vqa": 1.0}, init_model.source
    if teacher is not None:
        compute_losses, loss_weights = teacher.prepare(model, loss_weights, answers)
        source = f"the teacher {teacher.run_dir}"
    trainable = apply_mode(model, cfg.finetune)
    run = TaskRun(task=TASK_NAME, model=fusion.cfg, heads=VqaModel.heads_config(len(answers)), settings=vcfg,
                  train=train_cfg, init=str(teacher.run_dir) if teacher is not None else init_model.source,
                  features=str(Path(features).resolve()),
                  extra={"box_selection": _store_box_selection(store)}, finetune=cfg.finetune)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    write_answers(answers, out / ANSWERS_FILE)
    collate = VqaCollator(store, fusion.cfg.region.feature_dim, vcfg.max_regions, len(answers), tokenizer.pad_id,
                          region_tagger(store, tokenizer, fusion.cfg))
    from vl.data.epochs import EpochBatchStream

    stream = EpochBatchStream(lambda epoch: train_examples, train_cfg.batch_size, collate, seed=train_cfg.seed)

    def evaluate(eval_model: nn.Module, step: int) -> dict[str, float]:
        metrics = evaluate_examples(eval_model, val_examples, val_gold, collate, answers, vcfg.eval_batch_size)
        values = {"val_accuracy": metrics["overall"]}
        values.update({f"val_{name}": value for name, value in metrics["per_answer_type"].items()})
        return values

    share = f" ({vcfg.train_fraction:.0%} of them)" if vcfg.train_fraction < 1.0 else ""
    verb = "distill" if teacher is not None else "finetune"
    note(f"{verb} vqa: {len(answers)} answers, {len(train_examples)} training{share} and {len(val_examples)} "
         f"validation questions, {train_cfg.steps} steps from {source}, mode {cfg.finetune.mode} "
         f"({sum(p.numel() for n, p in model.named_parameters() if n in trainable):,} trainable parameters)")
    result = train(model, stream, train_cfg, out, run_config=run.to_config(),
                   evaluate=evaluate if val_examples else None, loss_weights=loss_weights,
                   compute_losses=compute_losses, desc=f"{verb} vqa")
    metrics: dict[str, Any] = {}
    if val_examples:
        metrics = evaluate_examples(model, val_examples, val_gold, collate, answers, vcfg.eval_batch_size)
        atomic_write_text(out / VAL_METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    return result, metrics


def evaluate_examples(model: VqaModel, examples: Sequence[VqaExample], gold: Sequence[VqaAnnotation],
                      collate: VqaCollator, answers: Sequence[str], batch_size: int) -> dict[str, Any]:
    """The official accuracy (``evaluate_vqa``) of the model's answers to ``examples`` against ``gold``."""
    predictions = predicted_answers(answer_logits(model, examples, collate, batch_size, desc="evaluate"), answers)
    return evaluate_vqa(list(gold), results_json(examples, predictions))


def predict_vqa(run_dir: str | os.PathLike, questions_path: str | os.PathLike, features: str | os.PathLike,
                out: str | os.PathLike, batch_size: int | None = None, shuffle_images: int | None = None) -> int:
    """Answer every question of ``questions_path``; write the official results JSON to ``out``; returns the count.
    With ``shuffle_images`` (a seed), each question is answered on another image's regions (``shuffled_images``)."""
    model, run, tokenizer = load_task_run(run_dir, VQA_RUN)
    examples, collate = question_inputs(run, tokenizer, questions_path, features, shuffle_images)
    logits = answer_logits(model, examples, collate, batch_size or run.settings.eval_batch_size)
    results = results_json(examples, predicted_answers(logits, list(run.answers)))
    atomic_write_text(out, json.dumps(results) + "\n")
    return len(results)


def question_inputs(run: TaskRun, tokenizer: Tokenizer, questions_path: str | os.PathLike,
                    features: str | os.PathLike, shuffle_images: int | None = None
                    ) -> tuple[list[VqaExample], VqaCollator]:
    """A VQA run's examples of every question in ``questions_path`` and the collator that batches them from
    ``features``; an image without features is an error naming both files."""
    questions = read_vqa_questions(questions_path)
    store = open_store(features)
    check_store(store, run.model)
    missing = missing_images(store, [question.image_id for question in questions])
    if missing:
        raise UserError(f"--features {features} has no features for {len(missing)} images of --questions "
                        f"{questions_path} (first: image {missing[0]}); extract them with vl-regions extract")
    examples = vqa_examples(questions, tokenizer, run.settings.max_text_len)
    if shuffle_images is not None:
        examples = shuffled_images(examples, shuffle_images)
    collate = VqaCollator(store, run.model.region.feature_dim, run.settings.max_regions, len(run.answers),
                          tokenizer.pad_id, region_tagger(store, tokenizer, run.model))
    return examples, collate


def evaluate_vqa_files(annotations_path: str | os.PathLike, results_path: str | os.PathLike) -> dict[str, Any]:
    """``evaluate_vqa`` on an annotations file and a results file."""
    from vl.data.formats import read_vqa_results

    return evaluate_vqa(read_vqa_annotations(annotations_path), read_vqa_results(results_path))


def format_vqa_metrics(metrics: dict[str, Any]) -> str:
    """Overall and per-answer-type accuracy as the lines ``vl evaluate vqa`` prints."""
    lines = [f"overall: {metrics['overall']:.2f} ({metrics['num_questions']} questions)"]
    lines += [f"{name}: {value:.2f}" for name, value in metrics["per_answer_type"].items()]
    return "\n".join(lines)
