"""Vision-language pretraining (``vl pretrain``): shards + feature store -> multi-task batches -> the training loop.

A run config (``configs/pretrain-*.yaml``) has the sections

- ``model``: a ``FusionConfig`` mapping, or the path of a model config file (``configs/uniter-tiny.yaml``; relative
  to the run config's directory, else to the working directory), which holds the architecture only; ``heads``: a
  ``HeadsConfig``, the heads this recipe trains;
- ``data``: ``vl.data.vl_batches.PretrainDataConfig`` (workers, shuffling, lengths, masking, task mixing);
- ``objectives``: name -> ``{weight, mix, options}``: the loss weight, the task's mix ratio (``data.mix: sample``)
  and the objective's constructor options (``vl.objectives.build_objective``);
- ``train``: the loop's ``TrainConfig``;
- ``tokenizer``: a tokenizer directory, optional (see ``resolve_tokenizer``);
- ``qa``: ``QAConfig``, the answer vocabulary of image questions.

Image questions (LXMERT's fifth task). With ``--questions Q --annotations A`` (VQA v2 files) the questions join
the captions as text (MLM, ITM and the rest read them as they read captions) and train the ``qa`` objective on
their soft answer scores. The answer vocabulary (``qa.min_answer_count``) is saved as ``answers.json``; the
questions are written into ``qa/questions-*.json`` (COCO captions layout plus ``answer_targets``), as many parts
as there are caption sources, and read side by side with the captions (``StreamConfig.interleave``).

The run directory holds what the loop writes (``vl.train.loop``) plus ``vocab.txt`` / ``tokenizer_config.json``
and ``faults.json`` (samples skipped, by kind, summed over ranks). Its ``model.safetensors`` is a
``VLPretrainingModel`` state dict (``fusion.*``, ``heads.*``) and its ``config.yaml`` has ``model:`` and ``heads:``
sections, so it loads with ``vl.checkpoints.vl_run.load_vl_run`` and serves as ``--init`` of fine-tuning or further
pretraining.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from region_features.ids import expand_shards
from vl.config import atomic_write_text
from vl.data.shards import FaultCounter, ShardStream, read_records
from vl.data.tags import region_tagger
from vl.data.vl_batches import PretrainBatchMaker, PretrainStream, TaskMixer
from vl.errors import UserError
from vl.fusion.base import FusionConfig
from vl.fusion.pretraining import HeadsConfig, VLPretrainingModel, build_pretraining_model
from vl.objectives import build_objective
from vl.text.tokenizer import Tokenizer
from vl.train.loop import TrainResult, make_accelerator, seed_everything, train
from vl.train.pretrain_config import FAULTS_FILE, QUESTIONS_DIR, VLPretrainConfig
from vl.train.pretrain_heldout import evaluate_heldout, heldout_batches
from vl.train.pretrainer import VLPretrainer, batch_plans, task_objectives


def _note(message: str) -> None:
    print(f"pretrain: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------------------
# Sources, tokenizer, model


def resolve_sources(shards: str | None, captions: str | None) -> list[str]:
    """The shard list of ``--shards`` (tar shards, or a COCO captions ``.json``) or ``--captions``."""
    if (shards is None) == (captions is None):
        raise UserError("give exactly one of --shards PATTERN and --captions JSON")
    pattern = shards if shards is not None else captions
    sources = expand_shards(pattern)
    if captions is not None and not all(s.lower().endswith(".json") for s in sources):
        raise UserError(f"--captions {captions} must name COCO captions .json file(s)")
    return sources


def write_question_sources(out: Path, cfg: VLPretrainConfig, questions: str, annotations: str, parts: int,
                           init: str | None) -> tuple[list[str], list[str]]:
    """The answer vocabulary and the question files of a run that pretrains on image questions (``qa``).

    The vocabulary is the run's own ``answers.json`` (a resumed run), else ``--init``'s, else built from the
    annotations (``cfg.qa``). Every question becomes a record with its soft answer scores (``vl finetune vqa``'s
    targets), written round-robin into ``parts`` files ``out/qa/questions-NNNNN.json``. Returns (answers, paths).
    """
    from vl.data.formats import check_questions_match, read_vqa_annotations, read_vqa_questions
    from vl.tasks.vqa.answers import ANSWERS_FILE, saved_or_built_answers, soft_targets, write_answers

    question_list = read_vqa_questions(questions)
    annotation_list = read_vqa_annotations(annotations)
    check_questions_match(question_list, annotation_list, questions, annotations)
    saved = [out / ANSWERS_FILE, *([Path(init) / ANSWERS_FILE] if init is not None else [])]
    answers = saved_or_built_answers(saved, annotation_list, cfg.qa.min_answer_count, cfg.qa.answer_counting,
                                     f"--annotations {annotations}", "qa.min_answer_count")
    index = {answer: position for position, answer in enumerate(answers)}
    by_question = {annotation.question_id: annotation for annotation in annotation_list}
    records = [{"id": question.question_id, "image_id": question.image_id, "caption": question.question,
                "answer_targets": sorted([answer, score] for answer, score in
                                         soft_targets(by_question[question.question_id].answer_strings,
                                                      index).items())}
               for question in question_list]
    folder = out / QUESTIONS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    count = max(1, min(parts, len(records)))
    paths = []
    for part in range(count):
        path = folder / f"questions-{part:05d}.json"
        atomic_write_text(path, json.dumps({"annotations": records[part::count]}) + "\n")
        paths.append(str(path))
    write_answers(answers, out / ANSWERS_FILE)
    return answers, paths


def _captions_for_tokenizer(sources: Sequence[str], caption_source: str, limit: int) -> list[str]:
    faults = FaultCounter(0, "tokenizer training")
    captions: list[str] = []
    for source in sources:
        for record in read_records(source, caption_source, faults, warn=False):
            captions.append(record.caption)
            if len(captions) >= limit:
                return captions
    return captions


def resolve_tokenizer(out: Path, cfg: VLPretrainConfig, sources: Sequence[str], init: str | None,
                      tokenizer_dir: str | None) -> Tokenizer:
    """The run's tokenizer, saved into ``out``: the one already there (a resumed run), else ``--tokenizer`` or the
    config's ``tokenizer``, else ``--init``'s ``vocab.txt``, else one trained on the captions."""
    if (out / "vocab.txt").is_file():
        return Tokenizer.from_dir(out)
    chosen = tokenizer_dir or cfg.tokenizer
    if chosen is None and init is not None and (Path(init) / "vocab.txt").is_file():
        chosen = init
    if chosen is not None:
        tokenizer = Tokenizer.from_dir(chosen)
    else:
        captions = _captions_for_tokenizer(sources, cfg.data.caption_source, cfg.tokenizer_max_captions)
        if not captions:
            raise UserError(f"no captions to train a tokenizer on in {sources[0]}; give --tokenizer DIR")
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "captions.txt"
            corpus.write_text("\n".join(captions) + "\n", encoding="utf-8")
            tokenizer = Tokenizer.train([corpus], cfg.model.text.vocab_size,
                                        min_frequency=cfg.tokenizer_min_frequency)
        _note(f"trained a {tokenizer.vocab_size}-token WordPiece vocabulary on {len(captions)} captions")
    tokenizer.save(out)
    return tokenizer


def _union_heads(base: HeadsConfig, wanted: HeadsConfig, init: str) -> HeadsConfig:
    outputs = dict(base.region_outputs)
    for name, width in wanted.region_outputs.items():
        outputs.setdefault(name, width)
    if base.num_answers and wanted.num_answers and base.num_answers != wanted.num_answers:
        raise UserError(f"--init {init} has an answer head of {base.num_answers} answers but the run's answer "
                        f"vocabulary has {wanted.num_answers}; put the init's answers.json beside its weights")
    return HeadsConfig(mlm=base.mlm or wanted.mlm, itm=base.itm or wanted.itm, region_outputs=outputs,
                       num_answers=base.num_answers or wanted.num_answers)


def build_model(cfg: VLPretrainConfig, init: str | None) -> tuple[VLPretrainingModel, FusionConfig, HeadsConfig]:
    """The model to pretrain: fresh from the config, or from ``--init`` (a VL run of ours, a Hugging Face
    LXMERT / VisualBERT directory, or BERT / a text run for the text stream). Heads the objectives need that the
    init lacks start fresh."""
    if init is None:
        return build_pretraining_model(cfg.model, cfg.heads), cfg.model, cfg.heads
    from vl.checkpoints.io import VL_RUN_KIND, detect_checkpoint_kind, load_into

    kind = detect_checkpoint_kind(init)
    text_init = kind == "hf-bert"
    if kind == VL_RUN_KIND:
        from vl.checkpoints.vl_run import read_model_config

        text_init = not isinstance(read_model_config(init)[0], FusionConfig)
    if text_init:
        model_cfg = _with_text_of(cfg.model, init, kind)
        model = build_pretraining_model(model_cfg, cfg.heads)
        _init_text_stream(model, init, kind)
        return model, model_cfg, cfg.heads
    from vl.checkpoints.vl_run import load_vl_checkpoint

    loaded = load_vl_checkpoint(init)
    if loaded.cfg != cfg.model:
        _note(f"the model architecture comes from --init {init}; the config's model section is not used")
    heads = _union_heads(loaded.heads.cfg, cfg.heads, init)
    if heads == loaded.heads.cfg:
        return loaded, loaded.cfg, heads
    model = build_pretraining_model(loaded.cfg, heads)
    report = load_into(model, loaded.state_dict(), init, strict=False)
    fresh = sorted({".".join(key.split(".")[:3]) for key in report.missing})
    if fresh:
        _note(f"--init {init} has no {', '.join(fresh)}; they start fresh")
    return model, loaded.cfg, heads


_TEXT_FIELDS_FROM_INIT = ("vocab_size", "hidden_size", "num_heads", "intermediate_size", "max_position",
                          "type_vocab_size", "activation", "layer_norm_eps", "pad_token_id", "pre_ln")


def _with_text_of(model_cfg: FusionConfig, init: str, kind: str) -> FusionConfig:
    """``model_cfg`` with the text encoder's shape taken from a BERT / text-run checkpoint (its layer count kept)."""
    if kind == "hf-bert":
        from vl.checkpoints.hf_bert import text_config_from_hf
        from vl.checkpoints.io import read_json_file

        text = text_config_from_hf(read_json_file(Path(init) / "config.json"), Path(init) / "config.json")
    else:
        from vl.checkpoints.vl_run import read_model_config

        text = read_model_config(init)[0]
    changes = {name: getattr(text, name) for name in _TEXT_FIELDS_FROM_INIT
               if getattr(text, name) != getattr(model_cfg.text, name)}
    if not changes:
        return model_cfg
    _note(f"the text stream's {', '.join(sorted(changes))} come from --init {init}")
    try:
        return dataclasses.replace(model_cfg, text=dataclasses.replace(model_cfg.text, **changes))
    except ValueError as err:
        raise UserError(f"--init {init}: its text encoder does not fit the model config: {err}") from None


def _init_text_stream(model: VLPretrainingModel, init: str, kind: str) -> None:
    """The text stream from a Hugging Face BERT directory, or from a text-only run of ours (through a temporary
    Hugging Face export of its encoder)."""
    from vl.checkpoints.hf_vl import init_text_from_hf_bert

    if kind == "hf-bert":
        init_text_from_hf_bert(model, init)
        return
    from vl.checkpoints.hf_bert import export_hf_bert
    from vl.checkpoints.vl_run import load_vl_run

    text_model = load_vl_run(init)
    with tempfile.TemporaryDirectory() as tmp:
        init_text_from_hf_bert(model, export_hf_bert(text_model, text_model.cfg, tmp))


def check_compatibility(cfg: VLPretrainConfig, model_cfg: FusionConfig, heads: HeadsConfig, store: Any,
                        tokenizer: Tokenizer) -> None:
    """Errors naming the config key when the model, the feature store and the tokenizer disagree."""
    if store.feature_dim != model_cfg.region.feature_dim:
        raise UserError(f"the feature store {store.root} has {store.feature_dim}-d features but model.region."
                        f"feature_dim is {model_cfg.region.feature_dim} (--set model.region.feature_dim="
                        f"{store.feature_dim})")
    needs = {name for name in cfg.objectives}
    if needs & {"mrc", "mrc_kl"}:
        if store.num_classes == 0:
            raise UserError(f"objectives mrc / mrc_kl need detector classes, and the feature store {store.root} "
                            "has none")
        width = heads.region_outputs.get("obj")
        if width != store.num_classes:
            raise UserError(f"heads.region_outputs.obj is {width} but the feature store {store.root} has "
                            f"{store.num_classes} classes (--set heads.region_outputs.obj={store.num_classes})")
    if "mrfr" in needs and heads.region_outputs.get("feat") != store.feature_dim:
        raise UserError(f"heads.region_outputs.feat is {heads.region_outputs.get('feat')} but the features are "
                        f"{store.feature_dim}-d (--set heads.region_outputs.feat={store.feature_dim})")
    if tokenizer.vocab_size > model_cfg.text.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model embeds only "
                        f"{model_cfg.text.vocab_size} (model.text.vocab_size)")
    if cfg.data.max_text_len > model_cfg.text.max_position:
        raise UserError(f"data.max_text_len {cfg.data.max_text_len} exceeds model.text.max_position "
                        f"{model_cfg.text.max_position}")


# --------------------------------------------------------------------------------------------------------------
# The run


def summarize_faults(counts: Mapping[str, int], batches: int, batch_size: int) -> str:
    if not counts:
        return f"no samples skipped ({batches} batches)"
    listed = ", ".join(f"{count} {kind.replace('_', ' ')}" for kind, count in sorted(counts.items()))
    return f"skipped {sum(counts.values())} samples ({listed}) over {batches} batches of {batch_size}"


def pretrain_vl(cfg: VLPretrainConfig, out: str | os.PathLike, features: str, shards: str | None = None,
                captions: str | None = None, init: str | None = None, tokenizer_dir: str | None = None,
                val_shards: str | None = None, val_batches: int = 8, plot: bool = True,
                questions: str | None = None, annotations: str | None = None) -> TrainResult:
    """Pretrain into run directory ``out`` (resuming from its latest checkpoint when it has one).

    features: the region feature store; shards / captions: the image-caption source (``resolve_sources``);
    init / tokenizer_dir: see ``build_model`` and ``resolve_tokenizer``; val_shards: held-out shards evaluated
    every ``train.eval_every`` steps and at the end; plot: draw ``loss.png`` at the end; questions / annotations:
    VQA v2 files of image questions for the ``qa`` objective (see the module docstring).
    """
    from accelerate.utils import DistributedDataParallelKwargs

    from region_features.store import FeatureStore

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    sources = resolve_sources(shards, captions)
    if (questions is None) != (annotations is None):
        raise UserError("give both --questions and --annotations (VQA v2 files), or neither")
    if "qa" in cfg.objectives and questions is None:
        raise UserError("objective 'qa' trains on image questions: give --questions Q --annotations A (VQA v2)")
    if questions is not None and "qa" not in cfg.objectives:
        raise UserError(f"--questions {questions} trains the qa objective, which the config's objectives do not "
                        "list: add qa to them")
    val_sources = expand_shards(val_shards) if val_shards is not None else None
    store = FeatureStore(features)
    # On a machine without a GPU, cpu=True makes processes started by a launcher train together (gloo).
    cpu = cfg.train.cpu or not torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # One task per batch leaves other heads unused in a step: DDP must look for unused parameters.
        accelerator = make_accelerator(cfg.train.precision, cpu,
                                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    else:
        accelerator = make_accelerator(cfg.train.precision, cpu)
    out.mkdir(parents=True, exist_ok=True)
    answers: list[str] = []
    with accelerator.main_process_first():
        if questions is not None:
            answers, question_sources = write_question_sources(out, cfg, questions, annotations, len(sources), init)
            sources = [*sources, *question_sources]
        tokenizer = resolve_tokenizer(out, cfg, sources, init, tokenizer_dir)

    seed_everything(cfg.train.seed)
    model_cfg, heads_cfg = cfg.model, cfg.heads
    if answers:
        heads_cfg = dataclasses.replace(heads_cfg, num_answers=len(answers))
    if init is None:
        model_cfg = dataclasses.replace(model_cfg, text=dataclasses.replace(
            model_cfg.text, vocab_size=max(tokenizer.vocab_size, 8), pad_token_id=tokenizer.pad_id))
    model, model_cfg, heads_cfg = build_model(dataclasses.replace(cfg, model=model_cfg, heads=heads_cfg), init)
    check_compatibility(cfg, model_cfg, heads_cfg, store, tokenizer)
    objectives = {name: build_objective(name, model, spec.options) for name, spec in cfg.objectives.items()}
    tasks = task_objectives(cfg)
    module = VLPretrainer(model, objectives, tasks)
    plans = batch_plans(tasks, objectives)
    with_probs = any(name in ("mrc", "mrc_kl") for name in cfg.objectives)
    mixer = TaskMixer({name: spec.mix for name, spec in cfg.objectives.items()}, cfg.train.seed,
                      sum_all=cfg.data.mix == "sum")
    maker = PretrainBatchMaker(tokenizer, store, cfg.data, mixer, plans, model_cfg.region.geometry, with_probs,
                               region_tagger(store, tokenizer, model_cfg), num_answers=len(answers))
    stream_cfg = cfg.data.stream_config(cfg.train.batch_size)
    if questions is not None:  # questions and captions side by side, not the questions after every caption
        stream_cfg = dataclasses.replace(stream_cfg, interleave=True)
    stream = ShardStream(sources, stream_cfg, maker, seed=cfg.train.seed,
                         rank=accelerator.process_index, world_size=accelerator.num_processes,
                         check_record=maker.check_record,
                         length_of=maker.length_of if cfg.data.bucket_pool else None)
    data = PretrainStream(stream, cfg.data.num_workers, cfg.data.prefetch_factor)

    evaluate = None
    if val_sources is not None:
        eval_batches = heldout_batches(maker, val_sources, cfg.train.batch_size, val_batches, cfg.train.seed + 1)

        def evaluate(trained: nn.Module, step: int) -> dict[str, float]:
            return evaluate_heldout(trained, eval_batches)

    resolved = dataclasses.replace(cfg, model=model_cfg, heads=heads_cfg, init=init, shards=shards or captions,
                                   features=str(features), questions=questions, annotations=annotations)
    weights = {name: spec.weight for name, spec in cfg.objectives.items()}
    result = None
    try:
        result = train(module, data, cfg.train, out, loss_weights=weights, run_config=resolved, evaluate=evaluate,
                       accelerator=accelerator, desc="pretrain", plot=plot, sampled_losses=cfg.data.mix == "sample")
    finally:
        counts, batches = data.fault_counts(), data.batches
        rank = f"rank {accelerator.process_index}: " if accelerator.num_processes > 1 else ""
        _note(rank + summarize_faults(counts, batches, cfg.train.batch_size))
        ranks = 1
        together = result is not None and accelerator.num_processes > 1  # every rank got here (never after a crash)
        if together:
            counts, batches, ranks = _sum_over_ranks(counts, batches)
        if accelerator.is_main_process:
            atomic_write_text(out / FAULTS_FILE, json.dumps({"skipped": counts, "batches": batches, "ranks": ranks},
                                                            indent=2) + "\n")
        if together:
            # every rank leaves together and closes the group: a rank exiting with gloo's threads alive aborts
            accelerator.wait_for_everyone()
            accelerator.end_training()
    return result


def _sum_over_ranks(counts: Mapping[str, int], batches: int) -> tuple[dict[str, int], int, int]:
    """Fault counts and batches summed over every rank of the process group, and the number of ranks."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (dict(counts), batches))
    total: Counter[str] = Counter()
    for rank_counts, _ in gathered:
        total.update(rank_counts)
    return dict(total), sum(rank_batches for _, rank_batches in gathered), len(gathered)
