"""Visual question answering (VQA v2): answer vocabulary, soft targets, the model, fine-tuning and prediction.

- **Answer vocabulary** (``build_answer_vocab``): the answers given at least ``min_answer_count`` times in the
  training annotations, after the official normalisation (``vl.tasks.vqa_eval.normalize_answer``: punctuation,
  number words to digits, articles, contractions). Counted over each question's ``multiple_choice_answer`` (the
  bottom-up-attention / UNITER / LXMERT rule; k = 9 gives VQA v2's 3,129 answers) or, with
  ``answer_counting: all``, over every annotator answer. Ordered by count, then alphabetically.
- **Targets** (``soft_targets``): for every vocabulary answer an annotator gave, its official score: for each of the
  10 annotators left out in turn, min(1, matches among the other 9 / 3), averaged (0.3 / 0.6 / 0.9 / 1.0 for
  1 / 2 / 3 / 4+ matches). That is exactly the accuracy the official metric gives that answer, so a model that
  predicts the highest-target answer scores the maximum achievable accuracy.
- **Model** (``VqaModel``): any fusion model + ``AnswerHead`` (Linear(H, 2H) -> GELU -> LayerNorm -> Linear(2H, A),
  LXMERT's) over the pooled output; loss = binary cross-entropy with logits against the soft targets, averaged over
  (questions x answers) and multiplied by the vocabulary size (UNITER / LXMERT), i.e. summed over answers.
- **Data** (``vqa_examples``, ``VqaCollator``): questions joined with their image's regions from a feature store by
  image id. Training skips (and counts) questions whose image has no features; prediction refuses them.

A VQA run directory holds ``config.yaml`` (``VqaRun``: ``model:`` and ``heads:`` sections, so
``vl.checkpoints.vl_run.load_vl_run`` also loads it, with its answer head), ``model.safetensors`` (``fusion.*``,
``heads.answer.*``), ``answers.json`` (the vocabulary), ``vocab.txt`` + ``tokenizer_config.json``,
``val_metrics.json`` and what the training loop writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from vl.progress import progress_bar

from vl.config import ConfigError, atomic_write_text, from_dict, load_config
from vl.data.tags import RegionTagger, region_tagger
from vl.data.formats import (
    VqaAnnotation,
    VqaQuestion,
    check_questions_match,
    read_vqa_annotations,
    read_vqa_questions,
)
from vl.errors import UserError
from vl.fusion import build_fusion
from vl.fusion.base import FusionConfig
from vl.fusion.pretraining import HeadsConfig, VLHeads
from vl.tasks.vl_finetune import (
    apply_mode,
    check_store,
    encode_texts,
    FinetuneModeMixin,
    missing_images,
    model_device,
    note,
    open_store,
    prepare_init,
    read_regions,
    read_task_config,
    record_regions,
    region_batch,
    SCRATCH,
    steps_for_epochs,
    text_batch,
    to_device,
    VLFinetuneMode,
    prepare_mode,
)
from vl.tasks.vqa_eval import evaluate_vqa, normalize_answer, vqa_accuracy
from vl.text.tokenizer import Tokenizer
from vl.train.loop import TrainConfig, TrainResult, seed_everything, train

TASK_NAME = "vqa"
ANSWERS_FILE = "answers.json"
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


@dataclass(frozen=True)
class VqaRun:
    """``RUN/config.yaml`` of a VQA run: enough to rebuild the model (``model`` + ``heads``) and its inputs."""

    task: str
    model: FusionConfig
    heads: HeadsConfig
    vqa: VqaConfig = field(default_factory=VqaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: str = SCRATCH
    features: str = ""
    box_selection: dict[str, Any] = field(default_factory=dict)  # how the store's boxes were chosen (vl vqa reuses)
    finetune: VLFinetuneMode = field(default_factory=VLFinetuneMode)


def load_vqa_finetune_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> VqaFinetuneConfig:
    data, source = read_task_config(path, overrides)
    return from_dict(VqaFinetuneConfig, data, source=source)


# --------------------------------------------------------------------------------------------------------------
# Answer vocabulary and targets


def question_subset(questions: Sequence[VqaQuestion], annotations: Sequence[VqaAnnotation], fraction: float,
                    seed: int) -> tuple[list[VqaQuestion], list[VqaAnnotation]]:
    """``fraction`` of the questions (at least one), drawn with ``seed`` and kept in file order, with their
    annotations. The draw depends only on the question ids and the seed, so runs that share them fine-tune on
    the same questions."""
    if fraction >= 1.0:
        return list(questions), list(annotations)
    ids = sorted(question.question_id for question in questions)
    keep_count = max(1, round(fraction * len(ids)))
    kept = {ids[i] for i in np.random.default_rng(seed).permutation(len(ids))[:keep_count].tolist()}
    return ([question for question in questions if question.question_id in kept],
            [annotation for annotation in annotations if annotation.question_id in kept])


def count_answers(annotations: Sequence[VqaAnnotation], counting: AnswerCounting = "multiple_choice") -> Counter:
    """Occurrences of each normalised answer: one per question (its ``multiple_choice_answer``) or one per
    annotator answer (``counting="all"``)."""
    counts: Counter = Counter()
    for annotation in annotations:
        answers = [annotation.multiple_choice_answer] if counting == "multiple_choice" else annotation.answer_strings
        for answer in answers:
            normalized = normalize_answer(answer)
            if normalized:
                counts[normalized] += 1
    return counts


def build_answer_vocab(annotations: Sequence[VqaAnnotation], min_count: int,
                       counting: AnswerCounting = "multiple_choice") -> list[str]:
    """Normalised answers occurring at least ``min_count`` times, most frequent first (ties alphabetical)."""
    counts = count_answers(annotations, counting)
    kept = [(answer, count) for answer, count in counts.items() if count >= min_count]
    return [answer for answer, _ in sorted(kept, key=lambda item: (-item[1], item[0]))]


def saved_or_built_answers(saved: Sequence[str | os.PathLike], annotations: Sequence[VqaAnnotation],
                           min_count: int, counting: AnswerCounting, what: str, key: str) -> list[str]:
    """The vocabulary of the first existing ``answers.json`` among ``saved``, else built from ``annotations``
    (``build_answer_vocab``); a UserError naming ``what`` (the annotations' flag and path) and the config ``key``
    to lower when no answer is frequent enough."""
    for path in saved:
        if Path(path).is_file():
            return read_answers(path)
    answers = build_answer_vocab(annotations, min_count, counting)
    if not answers:
        raise UserError(f"no answer of {what} occurs {min_count} times or more: lower {key}")
    return answers


def soft_targets(gt_answers: Sequence[str], answer_index: dict[str, int]) -> dict[int, float]:
    """``{vocabulary index: score}`` for every vocabulary answer among the annotators' (normalised) answers, the
    score being the official leave-one-annotator-out accuracy of predicting it (``vqa_accuracy``)."""
    targets: dict[int, float] = {}
    for candidate in dict.fromkeys(normalize_answer(answer) for answer in gt_answers):
        index = answer_index.get(candidate)
        if index is None:
            continue
        score = vqa_accuracy(candidate, gt_answers)
        if score > 0:
            targets[index] = score
    return targets


def write_answers(answers: Sequence[str], path: str | os.PathLike) -> None:
    atomic_write_text(path, json.dumps({"answers": list(answers)}, indent=0) + "\n")


def read_answers(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing: the run has no answer vocabulary")
    try:
        answers = json.loads(path.read_text(encoding="utf-8"))["answers"]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not an answers file ({err})") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise UserError(f"{path}: 'answers' must be a non-empty list of strings")
    return answers


# --------------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class VqaExample:
    """One question, tokenised, with its soft targets (empty when unannotated or no answer is in the vocabulary)."""

    question_id: int
    image_id: int
    token_ids: tuple[int, ...]
    target_ids: tuple[int, ...] = ()
    target_scores: tuple[float, ...] = ()


def vqa_examples(questions: Sequence[VqaQuestion], tokenizer: Tokenizer, max_text_len: int,
                 annotations: Sequence[VqaAnnotation] | None = None,
                 answer_index: dict[str, int] | None = None) -> list[VqaExample]:
    """Questions as examples (file order); with ``annotations`` and ``answer_index``, with soft targets."""
    by_question = {annotation.question_id: annotation for annotation in annotations or ()}
    token_ids = encode_texts(tokenizer, [question.question for question in questions], max_text_len)
    examples = []
    for question, ids in zip(questions, token_ids):
        annotation = by_question.get(question.question_id)
        targets = soft_targets(annotation.answer_strings, answer_index) \
            if annotation is not None and answer_index is not None else {}
        examples.append(VqaExample(question.question_id, question.image_id, tuple(ids), tuple(targets),
                                   tuple(targets.values())))
    return examples


def with_features(examples: Sequence[VqaExample], store: Any, flag: str, questions_flag: str) -> list[VqaExample]:
    """The examples whose image has features in ``store``; the others are counted and reported on stderr."""
    missing = set(missing_images(store, [example.image_id for example in examples]))
    if not missing:
        return list(examples)
    kept = [example for example in examples if example.image_id not in missing]
    note(f"warning: {len(examples) - len(kept)} of {len(examples)} questions of {questions_flag} skipped: "
         f"{len(missing)} images have no features in {flag} {store.root} (first: image {sorted(missing)[0]})")
    return kept


class VqaCollator:
    """Examples -> a batch: text keys, region keys (read from ``store``, with object tags when a ``tagger`` is
    given) and ``answer_targets`` (B, A) float."""

    def __init__(self, store: Any, feature_dim: int, max_regions: int, num_answers: int, pad_id: int,
                 tagger: RegionTagger | None = None):
        self.store = store
        self.feature_dim = feature_dim
        self.max_regions = max_regions
        self.num_answers = num_answers
        self.pad_id = pad_id
        self.tagger = tagger

    def __call__(self, examples: Sequence[VqaExample], generator: torch.Generator | None = None
                 ) -> dict[str, torch.Tensor]:
        batch = text_batch([example.token_ids for example in examples], self.pad_id)
        batch.update(region_batch([read_regions(self.store, example.image_id, self.max_regions, self.tagger)
                                   for example in examples], self.feature_dim))
        targets = torch.zeros(len(examples), self.num_answers)
        for row, example in enumerate(examples):
            if example.target_ids:
                targets[row, list(example.target_ids)] = torch.tensor(example.target_scores)
        batch["answer_targets"] = targets
        return batch


# --------------------------------------------------------------------------------------------------------------
# The model


class VqaModel(FinetuneModeMixin, nn.Module):
    """``fusion`` + ``heads.answer`` (``AnswerHead`` on the pooled output).

    ``logits(batch)`` -> (B, A); ``forward(batch)`` -> ``{"vqa": BCE * A, "vqa_score": mean target score of the
    argmax answer}`` (the batch's soft VQA accuracy). The state dict (``fusion.*``, ``heads.answer.*``) is that of
    a ``VLPretrainingModel`` with ``HeadsConfig(mlm=False, itm=False, num_answers=A)``.
    """

    def __init__(self, fusion: nn.Module, num_answers: int):
        super().__init__()
        if num_answers < 1:
            raise UserError("the answer vocabulary is empty: lower vqa.min_answer_count")
        self.fusion = fusion
        self.heads = VLHeads(fusion, self.heads_config(num_answers))
        self.num_answers = num_answers

    @staticmethod
    def heads_config(num_answers: int) -> HeadsConfig:
        return HeadsConfig(mlm=False, itm=False, region_outputs={}, num_answers=num_answers)

    @property
    def cfg(self) -> FusionConfig:
        return self.fusion.cfg

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.heads.answer(self.pooled_output(batch))  # (B, A)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.logits(batch).float()
        targets = batch["answer_targets"].float()
        loss = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
        picked = targets.gather(1, logits.detach().argmax(dim=1, keepdim=True)).mean()
        return {"vqa": loss, "vqa_score": picked}


@torch.no_grad()
def answer_logits(model: VqaModel, examples: Sequence[VqaExample], collate: VqaCollator, batch_size: int,
                  desc: str = "predict") -> torch.Tensor:
    """(N, A) answer logits of every example, in order (eval mode; the model's training mode is restored)."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for start in progress_bar(range(0, len(examples), batch_size), desc=desc, leave=False):
            batch = to_device(collate(examples[start:start + batch_size]), device)
            chunks.append(model.logits(batch).float().cpu())
    finally:
        model.train(was_training)
    if not chunks:
        return torch.zeros(0, model.num_answers)
    return torch.cat(chunks)


def predicted_answers(logits: torch.Tensor, answers: Sequence[str]) -> list[str]:
    return [answers[index] for index in logits.argmax(dim=1).tolist()]


def results_json(examples: Sequence[VqaExample], predictions: Sequence[str]) -> list[dict[str, Any]]:
    """The official results format: ``[{"question_id", "answer"}]``."""
    return [{"question_id": example.question_id, "answer": answer} for example, answer in zip(examples, predictions)]


# --------------------------------------------------------------------------------------------------------------
# Commands


def _store_box_selection(store: Any) -> dict[str, Any]:
    meta = store.meta if isinstance(store.meta, dict) else {}
    keys = ("min_boxes", "max_boxes", "num_boxes", "score_threshold", "nms_threshold")
    return {key: meta[key] for key in keys if key in meta}


def finetune_vqa(cfg: VqaFinetuneConfig, init: str, train_questions: str | os.PathLike,
                 train_annotations: str | os.PathLike, val_questions: str | os.PathLike | None,
                 val_annotations: str | os.PathLike | None, features: str | os.PathLike, out: str | os.PathLike,
                 tokenizer_dir: str | None = None) -> tuple[TrainResult, dict[str, Any]]:
    """Fine-tune ``init`` on VQA; evaluate on the val files (official accuracy); write run directory ``out``.

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

    answers = saved_or_built_answers([out / ANSWERS_FILE], annotations, vcfg.min_answer_count, vcfg.answer_counting,
                                     f"--train-annotations {train_annotations}", "vqa.min_answer_count")
    answer_index = {answer: index for index, answer in enumerate(answers)}

    seed_everything(cfg.train.seed)
    resumed_tokenizer = str(out) if (out / "vocab.txt").is_file() else None
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
    trainable = apply_mode(model, cfg.finetune)
    run = VqaRun(task=TASK_NAME, model=fusion.cfg, heads=VqaModel.heads_config(len(answers)), vqa=vcfg,
                 train=train_cfg, init=init_model.source, features=str(Path(features).resolve()),
                 box_selection=_store_box_selection(store), finetune=cfg.finetune)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    write_answers(answers, out / ANSWERS_FILE)
    collate = VqaCollator(store, fusion.cfg.region.feature_dim, vcfg.max_regions, len(answers), tokenizer.pad_id,
                          region_tagger(store, tokenizer, fusion.cfg))
    from vl.data.text_pretrain import TextBatchStream

    stream = TextBatchStream(lambda epoch: train_examples, train_cfg.batch_size, collate, seed=train_cfg.seed)

    def evaluate(eval_model: nn.Module, step: int) -> dict[str, float]:
        metrics = evaluate_examples(eval_model, val_examples, val_gold, collate, answers, vcfg.eval_batch_size)
        values = {"val_accuracy": metrics["overall"]}
        values.update({f"val_{name}": value for name, value in metrics["per_answer_type"].items()})
        return values

    share = f" ({vcfg.train_fraction:.0%} of them)" if vcfg.train_fraction < 1.0 else ""
    note(f"finetune vqa: {len(answers)} answers, {len(train_examples)} training{share} and {len(val_examples)} "
         f"validation questions, {train_cfg.steps} steps from {init_model.source}, mode {cfg.finetune.mode} "
         f"({sum(p.numel() for n, p in model.named_parameters() if n in trainable):,} trainable parameters)")
    result = train(model, stream, train_cfg, out, run_config=run, evaluate=evaluate if val_examples else None,
                   loss_weights={"vqa": 1.0}, desc="finetune vqa")
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


def load_vqa_run(run_dir: str | os.PathLike) -> tuple[VqaModel, VqaRun, Tokenizer, list[str]]:
    """A fine-tuned VQA run: (model in eval mode, its config, tokenizer, answer vocabulary)."""
    from vl.checkpoints.io import load_into, load_state_file

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir} is not a directory")
    if not config_path.is_file():
        raise UserError(f"--run {run_dir} has no config.yaml (not a VQA run)")
    try:
        run = load_config(VqaRun, config_path)
    except ConfigError as err:
        raise UserError(f"--run {run_dir} is not a VQA run ({str(err).splitlines()[0]})") from None
    if run.task != TASK_NAME:
        raise UserError(f"--run {run_dir} was fine-tuned for '{run.task}', not '{TASK_NAME}'")
    answers = read_answers(run_dir / ANSWERS_FILE)
    if len(answers) != run.heads.num_answers:
        raise UserError(f"--run {run_dir}: {ANSWERS_FILE} lists {len(answers)} answers but the model predicts "
                        f"{run.heads.num_answers}")
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"--run {run_dir} has no model.safetensors (did its training finish?)")
    model = VqaModel(build_fusion(run.model), len(answers))
    prepare_mode(model, run.finetune)
    load_into(model, load_state_file(weights), weights)
    model.eval()
    return model, run, Tokenizer.from_dir(run_dir), answers


def shuffled_images(examples: Sequence[VqaExample], seed: int) -> list[VqaExample]:
    """The examples with every image replaced by another image of the same file (a seeded derangement of the
    distinct image ids): the image-blind control. What a model still answers right then, it answers from the
    question alone (language priors), so the gap to the real images is what it reads from the image."""
    image_ids = sorted({example.image_id for example in examples})
    if len(image_ids) < 2:
        raise UserError("--shuffle-images needs questions on at least two images")
    order = np.random.default_rng(seed).permutation(len(image_ids))
    # a cyclic shift along a random order is a derangement: no image keeps its own regions
    other = {image_ids[order[i]]: image_ids[order[(i + 1) % len(order)]] for i in range(len(order))}
    return [dataclasses.replace(example, image_id=other[example.image_id]) for example in examples]


def predict_vqa(run_dir: str | os.PathLike, questions_path: str | os.PathLike, features: str | os.PathLike,
                out: str | os.PathLike, batch_size: int | None = None, shuffle_images: int | None = None) -> int:
    """Answer every question of ``questions_path``; write the official results JSON to ``out``; returns the count.
    With ``shuffle_images`` (a seed), each question is answered on another image's regions (``shuffled_images``)."""
    model, run, tokenizer, answers = load_vqa_run(run_dir)
    questions = read_vqa_questions(questions_path)
    store = open_store(features)
    check_store(store, run.model)
    missing = missing_images(store, [question.image_id for question in questions])
    if missing:
        raise UserError(f"--features {features} has no features for {len(missing)} images of --questions "
                        f"{questions_path} (first: image {missing[0]}); extract them with vl-regions extract")
    examples = vqa_examples(questions, tokenizer, run.vqa.max_text_len)
    if shuffle_images is not None:
        examples = shuffled_images(examples, shuffle_images)
    collate = VqaCollator(store, run.model.region.feature_dim, run.vqa.max_regions, len(answers), tokenizer.pad_id,
                          region_tagger(store, tokenizer, run.model))
    logits = answer_logits(model, examples, collate, batch_size or run.vqa.eval_batch_size)
    results = results_json(examples, predicted_answers(logits, answers))
    atomic_write_text(out, json.dumps(results) + "\n")
    return len(results)


def evaluate_vqa_files(annotations_path: str | os.PathLike, results_path: str | os.PathLike) -> dict[str, Any]:
    """``evaluate_vqa`` on an annotations file and a results file."""
    from vl.data.formats import read_vqa_results

    return evaluate_vqa(read_vqa_annotations(annotations_path), read_vqa_results(results_path))


def format_vqa_metrics(metrics: dict[str, Any]) -> str:
    """Overall and per-answer-type accuracy as the lines ``vl evaluate vqa`` prints."""
    lines = [f"overall: {metrics['overall']:.2f} ({metrics['num_questions']} questions)"]
    lines += [f"{name}: {value:.2f}" for name, value in metrics["per_answer_type"].items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# One image, one question (vl vqa)


def image_regions(detector: Any, image_path: str | os.PathLike, selection: Any) -> dict[str, np.ndarray]:
    """Regions of one image file as ``vl-regions extract`` stores them and ``FeatureStore`` reads them back:
    ``features`` (K, D) (rounded through float16, as the store keeps them), ``normalized_boxes`` (K, 4), the class
    and attribute distributions with their argmax and confidence. ``detector`` is a loaded ``RegionDetector``."""
    from region_features.images import load_image
    from region_features.pipeline import ResizeToModel, to_original

    image_path = Path(image_path)
    if not image_path.is_file():
        raise UserError(f"--image {image_path} is not a file")
    loaded = load_image(image_path, detector.cfg.max_size)
    if loaded.image is None:
        raise UserError(f"--image {image_path}: {loaded.warning}")
    orig_w, orig_h = loaded.original_size
    image = ResizeToModel(detector.cfg.min_size, detector.cfg.max_size)(loaded.image)  # (3, h, w) uint8
    scale_x, scale_y = image.shape[-1] / orig_w, image.shape[-2] / orig_h
    sample = {"orig_size": (orig_h, orig_w),
              "scale": torch.tensor([scale_x, scale_y, scale_x, scale_y], dtype=torch.float32)}
    with torch.inference_mode():
        region = detector.extract_regions([image], selection)[0]
    boxes = to_original(region["boxes"], sample)
    normalized = (boxes / torch.tensor([orig_w, orig_h, orig_w, orig_h], dtype=torch.float32)).clamp(0.0, 1.0)

    def stored(key: str) -> np.ndarray:  # as the store keeps it: float16
        return region[key].float().numpy().astype(np.float16)

    return {"features": stored("region_feats"), "normalized_boxes": normalized.numpy().astype(np.float32),
            "object_probs": stored("object_probs"), "object_ids": region["object_ids"].numpy(),
            "object_conf": region["object_conf"].float().numpy(), "attr_probs": stored("attr_probs"),
            "attr_ids": region["attr_ids"].numpy(), "attr_conf": region["attr_conf"].float().numpy()}


def answer_image_question(run_dir: str | os.PathLike, detector_source: str | os.PathLike,
                          image_path: str | os.PathLike, question: str, top: int = 5,
                          selection_overrides: dict[str, Any] | None = None) -> list[tuple[str, float]]:
    """The ``top`` answers (with sigmoid scores) of a VQA run to ``question`` about one image file: regions from
    the detector run (boxes chosen as the run's feature store chose them, unless overridden), then the model."""
    from region_features.detector import BoxSelection
    from region_features.runs import load_detector

    if not question.strip():
        raise UserError("--question is empty")
    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    model, run, tokenizer, answers = load_vqa_run(run_dir)
    detector, labels = load_detector(detector_source)
    if detector.feature_dim != run.model.region.feature_dim:
        raise UserError(f"--detector {detector_source} gives {detector.feature_dim}-d region features but --run "
                        f"{run_dir} reads {run.model.region.feature_dim}-d ones")
    settings = {**run.box_selection, **(selection_overrides or {})}
    selection = BoxSelection(**{key: value for key, value in settings.items()
                                if key in {f.name for f in dataclasses.fields(BoxSelection)}})
    record = image_regions(detector, image_path, selection)
    tagger = None
    if run.model.tags is not None:
        tagger = RegionTagger(labels.class_names, list(labels.attributes), tokenizer, run.model.tags)
    batch = text_batch(encode_texts(tokenizer, [question], run.vqa.max_text_len), tokenizer.pad_id)
    batch.update(region_batch([record_regions(record, run.vqa.max_regions, tagger)], run.model.region.feature_dim))
    with torch.no_grad():
        scores = torch.sigmoid(model.logits(batch).float())[0]  # (A,)
    values, indices = scores.topk(min(top, len(answers)))
    return [(answers[index], float(value)) for value, index in zip(values.tolist(), indices.tolist())]
