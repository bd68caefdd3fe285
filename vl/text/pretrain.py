"""Text-only pretraining (``vl pretrain-text``): corpus -> tokenizer -> examples -> the training loop.

A text run directory holds, besides what the loop writes (``vl.train.loop``):

- ``vocab.txt`` + ``tokenizer_config.json``: the tokenizer (trained on the corpus, or the ``--init`` one);
- ``config.yaml``: the resolved ``TextPretrainConfig``; its ``model:`` section is the ``TextEncoderConfig``;
- ``model.safetensors``: the ``BertPretrainingModel`` weights (``text_encoder.*``, ``mlm.*``, ``nsp.*``), which
  ``vl finetune --init``, ``vl convert RUN --to-hf`` and the VL models' text initialisation read. ELECTRA's
  generator lives only in the checkpoints under ``checkpoints/``; the discriminator is the exported encoder.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vl.checkpoints.text_init import init_from_checkpoint, load_text_checkpoint
from vl.text.corpus import expand_text_inputs, pack_documents, read_documents, tokenize_documents
from vl.text.masking import MaskingConfig, PhraseMatcher, TextMasker
from vl.text.pairs import build_sentence_pairs
from vl.data.seeds import stable_seed
from vl.data.epochs import EpochBatchStream
from vl.text.batches import TextPretrainCollator, pair_example, single_example
from vl.encoders.text import TextEncoderConfig
from vl.errors import UserError
from vl.text.objectives import ElectraConfig, TextPretrainingModel, objective_loss_weights, plan_objectives
from vl.text.tokenizer import Tokenizer
from vl.train.loop import TrainConfig, TrainResult, make_accelerator, seed_everything, train


@dataclass(frozen=True)
class TextDataConfig:
    max_len: int = 128  # ids per sequence, [CLS] and [SEP] included
    cross_documents: bool = True  # packing: continue a sequence into the next document (after a [SEP])
    short_seq_prob: float = 0.1  # sentence pairs: chance of a shorter target length (BERT)
    phrases: str | None = None  # masking.unit=phrase: a file with one phrase or entity per line
    vocab_size: int = 8000  # size of the tokenizer trained on the corpus when the run has none
    lowercase: bool = True  # that tokenizer lower-cases (uncased)
    min_frequency: int = 2  # least count of a merged word piece

    def __post_init__(self):
        if self.max_len < 8:
            raise ValueError(f"max_len must be at least 8, got {self.max_len}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ValueError(f"short_seq_prob must be in [0, 1], got {self.short_seq_prob}")


@dataclass(frozen=True)
class TextPretrainConfig:
    """A text pretraining run (YAML: ``configs/text-*.yaml``)."""

    model: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    objectives: dict[str, float] = field(default_factory=lambda: {"mlm": 1.0, "sop": 1.0})  # name -> weight
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    electra: ElectraConfig = field(default_factory=ElectraConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: str | None = None  # the --init checkpoint (recorded by the command)
    text: tuple[str, ...] = ()  # the --text inputs (recorded by the command)


def _note(message: str) -> None:
    print(f"pretrain-text: {message}", file=sys.stderr)


def resolve_tokenizer(out: Path, documents: list[list[str]], data: TextDataConfig, checkpoint=None) -> Tokenizer:
    """The run's tokenizer: the one already in ``out``, else the init checkpoint's, else one trained on the text."""
    if (out / "vocab.txt").is_file():
        return Tokenizer.from_dir(out)
    if checkpoint is not None:
        tokenizer = checkpoint.tokenizer()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "corpus.txt"
            corpus.write_text("\n".join(sentence for document in documents for sentence in document) + "\n")
            tokenizer = Tokenizer.train([corpus], data.vocab_size, lowercase=data.lowercase,
                                        min_frequency=data.min_frequency)
        _note(f"trained a {tokenizer.vocab_size}-token WordPiece vocabulary on the corpus")
    tokenizer.save(out)
    return tokenizer


def build_text_stream(cfg: TextPretrainConfig, documents, tokenizer: Tokenizer, rank: int = 0,
                      world_size: int = 1) -> EpochBatchStream:
    """The batch stream for ``cfg.objectives`` over tokenized ``documents`` (lists of sentences of ids)."""
    plan = plan_objectives(cfg.objectives)
    max_len = cfg.data.max_len
    masker = TextMasker.from_tokenizer(cfg.masking, tokenizer) if plan.masking else None
    matcher = None
    if plan.masking and cfg.masking.unit == "phrase":
        if cfg.data.phrases is None:
            raise UserError("masking.unit: phrase needs data.phrases (a file with one phrase per line)")
        matcher = PhraseMatcher.from_file(cfg.data.phrases, tokenizer)
    lm_mode = {"masked": "none", "causal": "causal", "prefix": "prefix"}[plan.view]
    collate = TextPretrainCollator(tokenizer.pad_id, masker, lm_mode, matcher,
                                   sentence_labels=plan.pairs in ("nsp", "sop"))
    if plan.pairs != "none":
        def examples_for_epoch(epoch: int):
            rng = random.Random(stable_seed(cfg.train.seed, epoch, 11))
            pairs = build_sentence_pairs(documents, max_len - 3, plan.pairs, rng, cfg.data.short_seq_prob)
            return [pair_example(pair, tokenizer.cls_id, tokenizer.sep_id) for pair in pairs]
    else:
        packed = [single_example(ids) for ids in pack_documents(documents, max_len, tokenizer.cls_id,
                                                                 tokenizer.sep_id, cfg.data.cross_documents)]

        def examples_for_epoch(epoch: int):
            return packed
    if not examples_for_epoch(0):
        raise UserError("the --text corpus gives no training sequences (too little text?)")
    return EpochBatchStream(examples_for_epoch, cfg.train.batch_size, collate, cfg.train.seed, rank, world_size)


def pretrain_text(cfg: TextPretrainConfig, text: list[str], out: str | os.PathLike,
                  init: str | os.PathLike | None = None) -> TrainResult:
    """Pretrain (or continue pretraining from ``init``) on ``text`` files into run directory ``out``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    plan_objectives(cfg.objectives)
    files = expand_text_inputs(text)
    documents = read_documents(files)
    checkpoint = load_text_checkpoint(init) if init is not None else None
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = resolve_tokenizer(out, documents, cfg.data, checkpoint)

    if checkpoint is not None:
        model_cfg = checkpoint.cfg
        if cfg.model != TextPretrainConfig().model:
            _note(f"the model architecture comes from --init {init}; the config's model section is not used")
    else:
        model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"the tokenizer in {out} has {tokenizer.vocab_size} tokens but the model embeds only "
                        f"{model_cfg.vocab_size}")
    if cfg.data.max_len > model_cfg.max_position:
        raise UserError(f"data.max_len {cfg.data.max_len} exceeds the model's max_position {model_cfg.max_position}")
    resolved = dataclasses.replace(cfg, model=model_cfg, init=str(init) if init is not None else None,
                                   text=tuple(str(t) for t in text))

    accelerator = make_accelerator(cfg.train.precision, cfg.train.cpu)
    seed_everything(cfg.train.seed)
    model = TextPretrainingModel(model_cfg, cfg.objectives, cfg.electra)
    if checkpoint is not None:
        left = init_from_checkpoint(model, checkpoint)
        if left:
            _note(f"--init {init} has no {', '.join(sorted({key.split('.')[0] for key in left}))} weights; "
                  "they start fresh")
    tokenized = tokenize_documents(documents, tokenizer)
    stream = build_text_stream(resolved, tokenized, tokenizer, accelerator.process_index, accelerator.num_processes)
    return train(
        model,
        stream,
        cfg.train,
        out,
        loss_weights=objective_loss_weights(cfg.objectives, cfg.electra),
        run_config=resolved,
        export_filter=lambda key: key.startswith(TextPretrainingModel.BERT_PREFIXES),
        accelerator=accelerator,
        desc="pretrain-text",
    )
