"""The retrieval commands: ``vl finetune retrieval`` (``finetune_retrieval``) and ``vl evaluate retrieval``
(``evaluate_retrieval``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from vl.config import atomic_write_text
from vl.data.formats import read_karpathy
from vl.data.tags import region_tagger
from vl.errors import UserError
from vl.tasks.retrieval.config import TASK_NAME, VAL_METRICS_FILE, PairScore, RetrievalFinetuneConfig
from vl.tasks.retrieval.data import RetrievalCollator, RetrievalTrainData, load_split
from vl.tasks.retrieval.index import RetrievalIndex, evaluate_index
from vl.tasks.retrieval.metrics import rankings_json
from vl.tasks.retrieval.model import RETRIEVAL_RUN, RetrievalModel
from vl.tasks.runs import TaskRun, load_task_run
from vl.tasks.vl_finetune import apply_mode, check_store, encode_texts, note, open_store, prepare_init, steps_for_epochs
from vl.train.loop import TrainResult, seed_everything, train


def finetune_retrieval(cfg: RetrievalFinetuneConfig, init: str, karpathy: str | os.PathLike,
                       features: str | os.PathLike, out: str | os.PathLike,
                       tokenizer_dir: str | None = None, teacher: Any | None = None
                       ) -> tuple[TrainResult, dict[str, Any]]:
    """Fine-tune ``init`` for retrieval on the Karpathy ``retrieval.train_splits``; evaluate two-stage recall on
    ``retrieval.val_split``; write run directory ``out`` (resumed when it holds a checkpoint). Returns the training
    result and the validation report (also in ``out/val_metrics.json``).

    teacher: a ``vl.compress.distill.Teacher``: train the student (``init`` scratch, ``cfg.model``) on its scores
    as well, with its tokenizer."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    rcfg = cfg.retrieval
    store = open_store(features)
    train_split = load_split(karpathy, rcfg.train_splits, store, require_features=False)
    val_split = None
    if rcfg.val_split:
        images = [image for image in read_karpathy(karpathy, rcfg.val_split) if image.sentences]
        if images:
            val_split = load_split(karpathy, rcfg.val_split, store, rcfg.val_max_images, require_features=False)
    seed_everything(cfg.train.seed)
    resumed_tokenizer = str(out) if (out / "vocab.txt").is_file() else None
    if teacher is not None:
        tokenizer_dir = str(teacher.run_dir)
    init_model, tokenizer = prepare_init(init, cfg.model, resumed_tokenizer or tokenizer_dir or cfg.tokenizer,
                                         list(train_split.texts))
    fusion = init_model.model.fusion
    check_store(store, fusion.cfg)
    if rcfg.max_text_len > fusion.cfg.text.max_position:
        raise UserError(f"retrieval.max_text_len {rcfg.max_text_len} exceeds the model's max_position "
                        f"{fusion.cfg.text.max_position}")
    model = RetrievalModel(fusion, rcfg, init_model.model.heads.itm)
    if init_model.model.heads.itm is None:
        note(f"--init {init_model.source} has no ITM head; it starts fresh")
    loss_weights, source = {"itm": rcfg.itm_weight, "contrastive": rcfg.contrastive_weight}, init_model.source
    compute_losses = None
    if teacher is not None:
        compute_losses, loss_weights = teacher.prepare(model, loss_weights)
        source = f"the teacher {teacher.run_dir}"
    trainable = apply_mode(model, cfg.finetune)
    token_ids = encode_texts(tokenizer, train_split.texts, rcfg.max_text_len)
    train_cfg = steps_for_epochs(cfg.train, rcfg.epochs, len(train_split.image_ids))
    run = TaskRun(task=TASK_NAME, model=fusion.cfg, heads=RetrievalModel.heads_config(), settings=rcfg,
                  train=train_cfg, init=str(teacher.run_dir) if teacher is not None else init_model.source,
                  features=str(Path(features).resolve()),
                  extra={"karpathy": str(Path(karpathy).resolve())}, finetune=cfg.finetune)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    from vl.data.epochs import EpochBatchStream

    collate = RetrievalCollator(train_split, token_ids, store, fusion.cfg.region.feature_dim, rcfg.max_regions,
                                tokenizer.pad_id, region_tagger(store, tokenizer, fusion.cfg))
    stream = EpochBatchStream(RetrievalTrainData(train_split, token_ids, train_cfg.seed), train_cfg.batch_size,
                             collate, seed=train_cfg.seed)

    def validate(eval_model: RetrievalModel) -> dict[str, Any]:
        index = RetrievalIndex(eval_model, tokenizer, val_split, store, rcfg, progress=False)
        return evaluate_index(index, rcfg.rerank_k)[0]

    def evaluate(eval_model: nn.Module, step: int) -> dict[str, float]:
        report = validate(eval_model)
        values = {}
        for method in ("first_stage", "two_stage"):
            for direction, short in (("text_to_image", "t2i"), ("image_to_text", "i2t")):
                for name, value in report[method][direction].items():
                    values[f"val_{method}_{short}_r{name[2:]}"] = value
        return values

    verb = "distill" if teacher is not None else "finetune"
    note(f"{verb} retrieval: {len(train_split.image_ids)} training images ({len(train_split.texts)} captions), "
         f"{len(val_split.image_ids) if val_split else 0} validation images, {train_cfg.steps} steps from "
         f"{source}, mode {cfg.finetune.mode} "
         f"({sum(p.numel() for n, p in model.named_parameters() if n in trainable):,} trainable parameters)")
    result = train(model, stream, train_cfg, out, run_config=run.to_config(), evaluate=evaluate if val_split else None,
                   loss_weights=loss_weights, compute_losses=compute_losses,
                   desc=f"{verb} retrieval")
    report: dict[str, Any] = {}
    if val_split is not None:
        report = validate(model)
        atomic_write_text(out / VAL_METRICS_FILE, json.dumps(report, indent=2) + "\n")
    return result, report


def evaluate_retrieval(run_dir: str | os.PathLike, karpathy: str | os.PathLike, split: str,
                       features: str | os.PathLike, out: str | os.PathLike, k: int | None = None, full: bool = False,
                       top: int = 10, max_images: int | None = None, batch_size: int | None = None,
                       pair_score: PairScore | None = None) -> dict[str, Any]:
    """Recall@1/5/10 of a retrieval run on a Karpathy split (first stage, two-stage and, with ``full``, ITM on every
    pair); writes RANKINGS.json (the two-stage ranking, or the full one with ``full``; ``top`` >= 10 per query).
    Returns the report (see ``evaluate_index``)."""
    if top < 10:
        raise UserError(f"--top must be at least 10 (RANKINGS.json lists the top 10 or more), got {top}")
    if k is not None and k < 1:
        raise UserError(f"--k must be >= 1, got {k}")
    model, run, tokenizer = load_task_run(run_dir, RETRIEVAL_RUN)
    store = open_store(features)
    check_store(store, run.model)
    data = load_split(karpathy, split, store, max_images)
    index = RetrievalIndex(model, tokenizer, data, store, run.settings, batch_size, pair_score=pair_score)
    report, rankings = evaluate_index(index, k or run.settings.rerank_k, full, top)
    report["split"] = split
    report["rankings_from"] = "full" if full else "two_stage"
    document = rankings_json(data, rankings["text_to_image"], rankings["image_to_text"])
    atomic_write_text(out, json.dumps(document) + "\n")
    return report
