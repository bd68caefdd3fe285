"""Fine-tuning the text core on a task: the model, the four fine-tuning modes, and finetune / predict / evaluate.

A task (``vl/text/classify.py``, ``tag.py``, ``span_qa.py``) supplies its file format, features, head,
decoding and metric (the ``TextTask`` protocol below); this module runs them the same way for every task.

Modes (``finetune.mode``):

- ``full``: every weight trains;
- ``frozen``: the encoder is frozen (and kept in eval mode, so its features are deterministic); the head trains;
- ``adapters``: bottleneck adapters after attention and feed-forward in every layer; adapters, LayerNorms and the
  head train. The run stores only those weights (``model.safetensors``) on top of its base checkpoint, whose path
  and SHA-256 ``config.yaml`` records (``init``, ``init_sha256``);
- ``scalar-mix``: the encoder is frozen; the head reads a learned softmax-weighted sum of the embeddings and
  every layer's output, times a learned scale (ELMo).

A fine-tuning run directory: ``config.yaml`` (``TextFinetuneRun``), ``vocab.txt`` + ``tokenizer_config.json``,
``model.safetensors``, ``val_metrics.json`` and what the training loop writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn
from vl.progress import progress_bar

from vl.checkpoints.io import load_into, load_state_file
from vl.checkpoints.text_init import TextCheckpoint, init_from_checkpoint, load_text_checkpoint, weights_sha256
from vl.config import ConfigError, atomic_write_text, load_config
from vl.data.epochs import EpochBatchStream
from vl.encoders.adapters import ScalarMix, add_adapters, freeze_all_but_adapters
from vl.encoders.text import TextEncoder, TextEncoderConfig
from vl.errors import UserError
from vl.compress.losses import soft_choice_loss
from vl.text.tokenizer import Tokenizer
from vl.train.loop import TrainConfig, TrainResult, seed_everything, train

FinetuneMode = Literal["full", "frozen", "adapters", "scalar-mix"]
FINETUNE_MODES = ("full", "frozen", "adapters", "scalar-mix")


@dataclass(frozen=True)
class FinetuneConfig:
    mode: FinetuneMode = "full"  # full, frozen, adapters or scalar-mix (module docstring)
    adapter_size: int = 64  # adapters: bottleneck width
    epochs: float = 3.0  # > 0: train.steps = ceil(epochs * train features / (batch_size * grad_accum_steps))
    max_len: int = 128  # word pieces per input, [CLS] and [SEP] included
    head_dropout: float = 0.1
    eval_batch_size: int = 64
    doc_stride: int = 64  # span-qa: step between overlapping context windows, in word pieces
    max_query_len: int = 64  # span-qa: the question is cut to this many word pieces
    max_answer_len: int = 30  # span-qa: longest predicted answer, in word pieces
    n_best: int = 20  # span-qa: start and end candidates per window

    def __post_init__(self):
        if self.mode not in FINETUNE_MODES:
            raise ValueError(f"mode must be one of {', '.join(FINETUNE_MODES)}, got {self.mode!r}")
        for name in ("adapter_size", "max_len", "eval_batch_size", "doc_stride", "max_query_len", "max_answer_len",
                     "n_best"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.max_len < 8:
            raise ValueError(f"max_len must be at least 8, got {self.max_len}")


@dataclass(frozen=True)
class TextFinetuneConfig:
    """What ``vl finetune --config`` holds (``configs/text-finetune-*.yaml``)."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class TextFinetuneRun:
    """The resolved config of a fine-tuning run (``RUN/config.yaml``): enough to rebuild the model."""

    task: str
    init: str  # the base checkpoint (absolute path)
    init_sha256: str  # SHA-256 of its weights file; adapter runs check it when loading
    model: TextEncoderConfig
    labels: tuple[Any, ...] = ()  # label values, index = class id (classify, tag)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class TextTask(Protocol):
    """What a task module provides. Examples are the file's records; features are model inputs (one example may
    give several, as span QA's context windows do); ``collate`` turns features into a batch of tensors."""

    name: str
    metric: str  # the headline metric of ``score``

    def read(self, path: str | os.PathLike) -> list[Any]: ...

    def labels(self, examples: Sequence[Any]) -> tuple[Any, ...]: ...

    def featurize(self, examples: Sequence[Any], tokenizer: Tokenizer, labels: Sequence[Any],
                  cfg: FinetuneConfig, training: bool) -> list[Any]: ...

    def collate(self, features: Sequence[Any]) -> dict[str, torch.Tensor]: ...

    def build_head(self, hidden_size: int, num_labels: int, dropout: float) -> nn.Module: ...

    def decode(self, examples: Sequence[Any], features: Sequence[Any], outputs: Sequence[torch.Tensor],
               labels: Sequence[Any], cfg: FinetuneConfig) -> Any: ...

    def score(self, examples: Sequence[Any], predictions: Any) -> dict[str, float]: ...

    def write_predictions(self, examples: Sequence[Any], predictions: Any, path: str | os.PathLike) -> None: ...

    def read_predictions(self, path: str | os.PathLike) -> Any: ...


# --------------------------------------------------------------------------------------------------------------
# The model


class TextTaskModel(nn.Module):
    """``text_encoder`` (+ ``scalar_mix`` in scalar-mix mode) + a task ``head``.

    ``forward(batch)`` returns the head's named losses (for the training loop); ``outputs(batch)`` the head's
    raw output (logits). Parameter names: ``text_encoder.*`` (as in BertPretrainingModel), ``scalar_mix.*``,
    ``head.*``.
    """

    def __init__(self, cfg: TextEncoderConfig, head: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.text_encoder = TextEncoder(cfg)
        self.scalar_mix: ScalarMix | None = None
        self.head = head
        self.mode: FinetuneMode = "full"

    def apply_mode(self, mode: FinetuneMode, adapter_size: int = 64) -> None:
        """Add adapters / the scalar mix and set ``requires_grad`` for ``mode`` (after loading base weights)."""
        self.mode = mode
        for param in self.parameters():
            param.requires_grad = True
        if mode == "frozen":
            self.text_encoder.requires_grad_(False)
        elif mode == "adapters":
            add_adapters(self.text_encoder, adapter_size, self.cfg.activation)
            freeze_all_but_adapters(self.text_encoder)
        elif mode == "scalar-mix":
            self.scalar_mix = ScalarMix(self.cfg.num_layers + 1)
            self.text_encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> TextTaskModel:
        super().train(mode)
        if self.mode in ("frozen", "scalar-mix"):
            self.text_encoder.eval()  # a frozen encoder gives deterministic features
        return self

    def hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, H): the last layer, or the scalar mix of every layer."""
        out = self.text_encoder(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                                return_all=self.scalar_mix is not None)
        return self.scalar_mix(out.all_hidden) if self.scalar_mix is not None else out.hidden

    def outputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.hidden(batch))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = self.outputs(batch)
        losses = self.head.loss(outputs, batch)
        if "teacher_logits" in batch:  # distillation (vl.compress.distill): one class per input
            losses["distill"] = soft_choice_loss(outputs, batch["teacher_logits"], batch["distill_temperature"])
        return losses

    def trainable_names(self) -> set[str]:
        return {name for name, param in self.named_parameters() if param.requires_grad}


def build_task_model(task: TextTask, cfg: TextEncoderConfig, num_labels: int, fcfg: FinetuneConfig,
                     checkpoint: TextCheckpoint | None) -> TextTaskModel:
    """The task model, initialised from ``checkpoint`` (when given) before its mode is applied."""
    model = TextTaskModel(cfg, task.build_head(cfg.hidden_size, num_labels, fcfg.head_dropout))
    if checkpoint is not None:
        init_from_checkpoint(model, checkpoint, prefixes=("text_encoder.",))
    model.apply_mode(fcfg.mode, fcfg.adapter_size)
    return model


# --------------------------------------------------------------------------------------------------------------
# Running a model over features


def run_model(model: TextTaskModel, task: TextTask, features: Sequence[Any], batch_size: int,
              desc: str = "predict") -> list[torch.Tensor]:
    """The head output for every feature (CPU tensors, padding removed along the sequence when per-token)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[torch.Tensor] = []
    with torch.no_grad():
        for start in progress_bar(range(0, len(features), batch_size), desc=desc, leave=False):
            chunk = features[start:start + batch_size]
            batch = {key: value.to(device) for key, value in task.collate(chunk).items()}
            logits = model.outputs(batch).float().cpu()
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            for row, length in enumerate(lengths):
                outputs.append(logits[row, :length] if logits.ndim == 3 else logits[row])
    model.train(was_training)
    return outputs


def evaluate_model(model: TextTaskModel, task: TextTask, examples: Sequence[Any], features: Sequence[Any],
                   labels: Sequence[Any], fcfg: FinetuneConfig) -> tuple[Any, dict[str, float]]:
    outputs = run_model(model, task, features, fcfg.eval_batch_size, desc="evaluate")
    predictions = task.decode(examples, features, outputs, labels, fcfg)
    return predictions, task.score(examples, predictions)


# --------------------------------------------------------------------------------------------------------------
# Commands


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def finetune_text(task: TextTask, cfg: TextFinetuneConfig, init: str | os.PathLike, train_file: str | os.PathLike,
                  val_file: str | os.PathLike | None, out: str | os.PathLike, teacher: Any | None = None
                  ) -> tuple[TrainResult, dict[str, float]]:
    """Fine-tune the checkpoint ``init`` on ``train_file``; evaluate on ``val_file``; write run directory ``out``.

    teacher: a ``vl.compress.distill.Teacher`` (``init`` its run directory): train a new model of architecture
    ``teacher.student`` on the teacher's soft labels as well, with its tokenizer and label set.

    Returns the training result and the validation metrics (also in ``out/val_metrics.json``).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if teacher is None:
        checkpoint = load_text_checkpoint(init)
        tokenizer, model_cfg, weights_file = checkpoint.tokenizer(), checkpoint.cfg, checkpoint.weights_file
    else:
        checkpoint, tokenizer, model_cfg = None, Tokenizer.from_dir(teacher.run_dir), teacher.student
        weights_file = teacher.run_dir / "model.safetensors"
    fcfg = cfg.finetune
    if fcfg.max_len > model_cfg.max_position:
        _note(f"finetune.max_len {fcfg.max_len} exceeds the model's max_position {model_cfg.max_position}; "
              f"using {model_cfg.max_position}")
        fcfg = dataclasses.replace(fcfg, max_len=model_cfg.max_position)
    train_examples = task.read(train_file)
    val_examples = task.read(val_file) if val_file is not None else []
    labels = teacher.answers if teacher is not None else task.labels(train_examples)
    train_features = task.featurize(train_examples, tokenizer, labels, fcfg, training=True)
    val_features = task.featurize(val_examples, tokenizer, labels, fcfg, training=False) if val_examples else []
    if not train_features:
        raise UserError(f"--train {train_file} gives no training examples")

    train_cfg = cfg.train
    if fcfg.epochs > 0:
        per_step = train_cfg.batch_size * train_cfg.grad_accum_steps
        steps = max(1, math.ceil(fcfg.epochs * len(train_features) / per_step))
        train_cfg = dataclasses.replace(train_cfg, steps=steps)
    run = TextFinetuneRun(task=task.name, init=str(Path(init).resolve()), init_sha256=weights_sha256(weights_file),
                          model=model_cfg, labels=tuple(labels), finetune=fcfg, train=train_cfg)

    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    seed_everything(train_cfg.seed)
    model = build_task_model(task, model_cfg, len(labels), fcfg, checkpoint)
    compute_losses, loss_weights = None, None
    if teacher is not None:
        compute_losses, loss_weights = teacher.prepare(model, {"cls": 1.0}, labels)
    trainable = model.trainable_names()
    save_filter = (lambda key: key in trainable) if fcfg.mode == "adapters" else None
    stream = EpochBatchStream(lambda epoch: train_features, train_cfg.batch_size,
                             lambda features, generator: task.collate(features), seed=train_cfg.seed)

    def evaluate(eval_model: nn.Module, step: int) -> dict[str, float]:
        _, metrics = evaluate_model(eval_model, task, val_examples, val_features, labels, fcfg)
        return {f"val_{name}": value for name, value in metrics.items()}

    result = train(model, stream, train_cfg, out, run_config=run, save_filter=save_filter,
                   evaluate=evaluate if val_features else None, loss_weights=loss_weights,
                   compute_losses=compute_losses, desc=f"{'distill' if teacher else 'finetune'} {task.name}")
    metrics: dict[str, float] = {}
    if val_features:
        evaluated = [row for row in result.history if any(key.startswith("val_") for key in row)]
        if evaluated:
            metrics = {key[4:]: value for key, value in evaluated[-1].items() if key.startswith("val_")}
        else:  # the run was already complete: evaluate the final weights
            _, metrics = evaluate_model(model, task, val_examples, val_features, labels, fcfg)
        atomic_write_text(out / "val_metrics.json", json.dumps(metrics, indent=2) + "\n")
    return result, metrics


def load_finetuned(run_dir: str | os.PathLike, task: TextTask) -> tuple[TextTaskModel, TextFinetuneRun, Tokenizer]:
    """Rebuild a fine-tuned model from its run directory (adapter runs: base checkpoint + adapters)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"--run {run_dir} has no config.yaml (not a fine-tuning run)")
    try:
        run = load_config(TextFinetuneRun, config_path)
    except ConfigError as err:
        raise UserError(f"--run {run_dir} is not a text fine-tuning run ({err})") from None
    if run.task != task.name:
        raise UserError(f"--run {run_dir} was fine-tuned for '{run.task}', not '{task.name}'")
    tokenizer = Tokenizer.from_dir(run_dir)
    weights = run_dir / "model.safetensors"
    if run.finetune.mode == "adapters":
        base = load_text_checkpoint(run.init)
        digest = weights_sha256(base.weights_file)
        if digest != run.init_sha256:
            raise UserError(f"base checkpoint {base.weights_file} changed since {run_dir} was fine-tuned on it "
                            "(SHA-256 differs); adapters only work on the exact base weights")
        model = build_task_model(task, run.model, len(run.labels), run.finetune, base)
        trainable = model.trainable_names()
        state = load_state_file(weights)
        report = load_into(model, state, weights, strict=False)
        missing = sorted(key for key in report.missing if key in trainable)
        if missing or report.unexpected:
            name = missing[0] if missing else report.unexpected[0]
            raise UserError(f"adapter weights {weights} do not match the model (first mismatch: '{name}')")
    else:
        model = build_task_model(task, run.model, len(run.labels), run.finetune, None)
        load_into(model, load_state_file(weights), weights)
    model.eval()
    return model, run, tokenizer


def predict_text(task: TextTask, run_dir: str | os.PathLike, input_file: str | os.PathLike,
                 out: str | os.PathLike) -> int:
    """Predict ``input_file`` with a fine-tuned run; write the task's prediction file to ``out``; returns count."""
    model, run, tokenizer = load_finetuned(run_dir, task)
    examples = task.read(input_file)
    features = task.featurize(examples, tokenizer, run.labels, run.finetune, training=False)
    outputs = run_model(model, task, features, run.finetune.eval_batch_size)
    predictions = task.decode(examples, features, outputs, run.labels, run.finetune)
    task.write_predictions(examples, predictions, out)
    return len(examples)


def evaluate_predictions(task: TextTask, gold_file: str | os.PathLike,
                         predictions_file: str | os.PathLike) -> dict[str, float]:
    return task.score(task.read(gold_file), task.read_predictions(predictions_file))


def read_jsonl(path: str | os.PathLike, what: str) -> list[dict[str, Any]]:
    """JSON objects, one per non-empty line; errors name ``what`` (the flag), the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{what} {path}:{number} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{what} {path}:{number} is not a JSON object")
            rows.append(row)
    if not rows:
        raise UserError(f"{what} {path} holds no examples")
    return rows


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def pad_batch(sequences: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """(B, T) long tensor of ``sequences`` right-padded with ``pad``."""
    length = max(len(sequence) for sequence in sequences)
    out = torch.full((len(sequences), length), pad, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, :len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
    return out
