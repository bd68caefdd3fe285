"""``vl distill``: a smaller student trained on a fine-tuned VQA, retrieval or text-classification teacher's soft
scores (Hinton et al.; DistilBERT).

The student config (``--config STUDENT.yaml``: ``DistillVqaConfig``, ``DistillRetrievalConfig``,
``DistillTextConfig``) is the task's fine-tuning config with a ``distill:`` section. Its ``model:`` is the
student's architecture; without one, the student is the teacher's architecture with ``distill.layer_fraction`` of
each layer stack (text, vision, cross). The student reads the teacher's inputs (tokenizer, answer vocabulary or
labels, region features, tags).

- Initialisation (``distill.init: teacher_layers``, DistilBERT's): every student tensor is copied from the teacher;
  student layer i of a stack of S layers takes teacher layer i * T // S of the same stack of T (every other layer
  at half depth). It needs the teacher's widths; ``scratch`` starts fresh.
- Loss: (1 - soft_weight) * the task's own losses + soft_weight * ``distill``, a KL divergence of the student's
  scores from the teacher's at temperature tau (``vl.compress.losses``): VQA's answer probabilities; for
  retrieval, the in-batch similarity distributions both ways and the ITM ranking of each anchor's pairs; a
  classifier's class distribution. With ``distill.hidden_weight`` (TinyBERT's hidden-state loss; VQA and
  classification, at the teacher's widths), also that weight * the MSE between the student's last hidden states
  and the teacher's at every real position of each stream.

The result is an ordinary run of the task (``distill.json`` records the teacher): predict, evaluate, serve, quantize
and convert accept it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vl.errors import UserError
from vl.fusion.base import FusionConfig
from vl.encoders.text import TextEncoderConfig
from vl.tasks.retrieval.config import RetrievalConfig
from vl.tasks.vl_finetune import VLFinetuneMode
from vl.tasks.vqa.config import VqaConfig
from vl.text.finetune import FinetuneConfig
from vl.train.loop import TrainConfig

DISTILL_FILE = "distill.json"
_LAYER_KEY = re.compile(r"^(.*layers)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 2.0  # tau: softens the teacher's answer probabilities
    soft_weight: float = 0.5  # share of the loss from the teacher's soft answers; the rest is the annotators'
    layer_fraction: float = 0.5  # without model:, the student keeps this share of each of the teacher's layer stacks
    init: Literal["teacher_layers", "scratch"] = "teacher_layers"  # DistilBERT: start from every other teacher layer
    hidden_weight: float = 0.0  # TinyBERT: weight of the MSE between the student's last hidden states and the teacher's

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.soft_weight <= 1.0:
            raise ValueError(f"soft_weight must be in [0, 1], got {self.soft_weight}")
        if not 0.0 < self.layer_fraction <= 1.0:
            raise ValueError(f"layer_fraction must be in (0, 1], got {self.layer_fraction}")
        if self.init not in ("teacher_layers", "scratch"):
            raise ValueError(f"init must be teacher_layers or scratch, got {self.init!r}")
        if self.hidden_weight < 0:
            raise ValueError(f"hidden_weight must be >= 0, got {self.hidden_weight}")


@dataclass(frozen=True)
class DistillVqaConfig:
    """What ``vl distill --config`` holds for a VQA teacher (``configs/distill-vqa-half.yaml``)."""

    model: FusionConfig | None = None  # the student; None: the teacher's with distill.layer_fraction of its layers
    vqa: VqaConfig = field(default_factory=VqaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: VLFinetuneMode = field(default_factory=VLFinetuneMode)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass(frozen=True)
class DistillRetrievalConfig:
    """What ``vl distill --config`` holds for a retrieval teacher (``configs/distill-retrieval-half.yaml``)."""

    model: FusionConfig | None = None
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: VLFinetuneMode = field(default_factory=VLFinetuneMode)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass(frozen=True)
class DistillTextConfig:
    """What ``vl distill --config`` holds for a text-classification teacher (``configs/distill-text-half.yaml``)."""

    model: TextEncoderConfig | None = None  # None: the teacher's with distill.layer_fraction of its layers
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


TASKS = {"vqa": ("--train-questions", "--train-annotations", "--features"),  # each teacher task's data flags
         "retrieval": ("--karpathy", "--features"), "classify": ("--train",)}


def _kept(count: int, fraction: float) -> int:
    """Layers kept of ``count``: ``fraction`` of them rounded half up, at least one."""
    return max(1, math.floor(count * fraction + 0.5)) if count else 0


def fewer_layers(cfg: FusionConfig, fraction: float) -> FusionConfig:
    """``cfg`` with ``fraction`` of each layer stack (at least one layer each, rounded half up)."""
    if cfg.cross is not None and cfg.cross.kind == "coattention":
        raise UserError("distill.layer_fraction cannot shorten a co-attention (ViLBERT) teacher, whose co-attention "
                        "layers name text and vision layers: give the student's model: in --config")
    text = dataclasses.replace(cfg.text, num_layers=_kept(cfg.text.num_layers, fraction))
    vision = dataclasses.replace(cfg.vision, num_layers=_kept(cfg.vision.num_layers, fraction)) if cfg.vision else None
    cross = dataclasses.replace(cfg.cross, num_layers=_kept(cfg.cross.num_layers, fraction)) if cfg.cross else None
    return dataclasses.replace(cfg, text=text, vision=vision, cross=cross)


def check_same_inputs(student: FusionConfig, teacher: FusionConfig, source: str) -> None:
    """The student must read the batches the teacher reads."""
    pairs = {"model.region.feature_dim": (student.region.feature_dim, teacher.region.feature_dim),
             "model.region.geometry": (student.region.geometry, teacher.region.geometry),
             "model.tags": (student.tags, teacher.tags), "model.fusion": (student.fusion, teacher.fusion)}
    for key, (mine, theirs) in pairs.items():
        if mine != theirs:
            raise UserError(f"--config {source}: {key} is {mine!r} but the teacher's is {theirs!r}; the student "
                            "reads the teacher's inputs")


def _stack_lengths(model: nn.Module) -> dict[str, int]:
    return {name: len(module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)}


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> int:
    """Copy every student tensor from the teacher (layer i of S <- layer i * T // S); returns how many. A tensor
    without a same-shaped teacher tensor is an error naming it."""
    student_stacks, teacher_stacks = _stack_lengths(student), _stack_lengths(teacher)
    source = teacher.state_dict()
    copied = {}
    for key, tensor in student.state_dict().items():
        name = key
        match = _LAYER_KEY.match(key)
        if match and match.group(1) in student_stacks and teacher_stacks.get(match.group(1)):
            stack, index = match.group(1), int(match.group(2))
            mapped = index * teacher_stacks[stack] // student_stacks[stack]
            name = f"{stack}.{mapped}.{match.group(3)}"
        found = source.get(name)
        if found is None or found.shape != tensor.shape:
            raise UserError(f"distill.init teacher_layers: the student's '{key}' {tuple(tensor.shape)} has no "
                            f"teacher tensor of that shape (widths must match the teacher's; or distill.init=scratch)")
        copied[key] = found
    student.load_state_dict(copied)
    return len(copied)


def _encoder(model: nn.Module, task: str) -> nn.Module:
    """The module whose output holds ``model``'s last hidden states (under DDP, of the wrapped model)."""
    model = getattr(model, "module", model)
    return model.text_encoder if task == "classify" else model.fusion


@contextmanager
def _recorded(model: nn.Module, task: str, into: list | None):
    """Append each output of ``model``'s encoder to ``into`` while inside (nothing when ``into`` is None)."""
    handle = None if into is None else _encoder(model, task).register_forward_hook(
        lambda _module, _inputs, output: into.append(output))
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _state_pairs(task: str, student: Any, teacher: Any, batch: Mapping[str, Any]) -> list[tuple]:
    """(student, teacher, real-position mask) of each stream's last hidden states: text, tags, regions."""
    if task == "classify":
        return [(student.hidden, teacher.hidden, batch.get("attention_mask"))]
    pairs = [(student.text_hidden, teacher.text_hidden, batch.get("attention_mask")),
             (student.region_hidden, teacher.region_hidden, batch.get("region_mask"))]
    if student.tag_hidden is not None and teacher.tag_hidden is not None:
        pairs.append((student.tag_hidden, teacher.tag_hidden, batch.get("region_mask")))
    return pairs


def distill_losses(task: str, teacher: nn.Module, temperature: float, hidden: bool = False
                   ) -> Callable[[nn.Module, Mapping[str, Any]], dict]:
    """The training loop's ``compute_losses`` for a ``task`` student: its usual outputs plus ``distill`` (and,
    with ``hidden``, ``hidden``: ``hidden_state_loss`` of the two models' last hidden states on the batch)."""
    from vl.compress.losses import hidden_state_loss

    teacher.eval()
    teacher.requires_grad_(False)

    def compute(student: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        device = batch["input_ids"].device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        if task == "retrieval":  # the student scores the teacher on its own pairs
            return student(batch, teacher=teacher, temperature=temperature)
        student_states, teacher_states = ([], []) if hidden else (None, None)
        with torch.no_grad(), _recorded(teacher, task, teacher_states):
            teacher_logits = teacher.outputs(batch) if task == "classify" else teacher.logits(batch)
        with _recorded(student, task, student_states):
            losses = student({**batch, "teacher_logits": teacher_logits, "distill_temperature": temperature})
        if hidden:
            losses["hidden"] = hidden_state_loss(_state_pairs(task, student_states[-1], teacher_states[-1], batch))
        return losses

    return compute


def _widths(model: nn.Module, task: str) -> tuple[int, ...]:
    cfg = model.cfg
    return (cfg.hidden_size,) if task == "classify" else (cfg.text_hidden_size, cfg.region_hidden_size)


@dataclass
class Teacher:
    """A fine-tuned run teaching a student of its task (``finetune_vqa``'s and ``finetune_retrieval``'s
    ``teacher``): the student reads the teacher's tokenizer (and answer vocabulary)."""

    run_dir: Path
    task: str
    model: nn.Module
    answers: tuple[Any, ...]  # VQA's answer vocabulary, a classifier's labels
    cfg: DistillConfig
    student: Any = None  # a text student's TextEncoderConfig (the VL tasks carry theirs in their configs)

    def prepare(self, student: nn.Module, task_weights: Mapping[str, float], answers: Sequence[str] = ()
                ) -> tuple[Callable, dict[str, float]]:
        """Initialise ``student`` as configured; the loop's ``compute_losses`` and ``loss_weights`` (the task's
        own, ``task_weights``, scaled by 1 - soft_weight, and ``distill``)."""
        if tuple(answers) != self.answers:
            raise UserError(f"the student's answers or labels differ from the teacher {self.run_dir}'s")
        hidden = self.cfg.hidden_weight > 0
        if hidden and self.task == "retrieval":
            raise UserError("distill.hidden_weight is for VQA and classification teachers: a retrieval student "
                            "scores pairs the teacher does not encode")
        if hidden and _widths(student, self.task) != _widths(self.model, self.task):
            raise UserError(f"distill.hidden_weight needs the teacher's hidden sizes {_widths(self.model, self.task)}"
                            f" in the student, which has {_widths(student, self.task)}")
        if self.cfg.init == "teacher_layers":
            init_from_teacher(student, self.model)
        weight = self.cfg.soft_weight
        weights = {name: (1.0 - weight) * value for name, value in task_weights.items()}
        weights["distill"] = weight
        if hidden:
            weights["hidden"] = self.cfg.hidden_weight
        return distill_losses(self.task, self.model, self.cfg.temperature, hidden), weights


def _teacher_task(teacher_dir: str) -> str | None:
    import yaml

    try:
        return (yaml.safe_load((Path(teacher_dir) / "config.yaml").read_text()) or {}).get("task")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def distill(config_path: str | None, overrides: list[str], teacher_dir: str, out: str,
            data: Mapping[str, str | None]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``vl distill``: train a student of the teacher's task on ``data`` (VQA: ``train_questions``,
    ``train_annotations``, ``val_questions``, ``val_annotations``, ``features``; retrieval: ``karpathy``,
    ``features``; classify: ``train``, ``val``). Returns (training result, validation metrics, what
    ``distill.json`` says)."""
    from vl.compress.quantize import is_quantized
    from vl.config import atomic_write_text

    if is_quantized(teacher_dir):
        raise UserError(f"--teacher {teacher_dir} is an int8 run; distill from the fp32 run it was quantized from")
    task = _teacher_task(teacher_dir)
    if task not in TASKS:
        shown = f"a {task} run" if task else "not a fine-tuned run"
        raise UserError(f"--teacher {teacher_dir} is {shown}; vl distill takes a fine-tuned "
                        f"{', '.join(list(TASKS)[:-1])} or {list(TASKS)[-1]} run")
    needed = [flag for flag in TASKS[task] if not data.get(flag.lstrip("-").replace("-", "_"))]
    if needed:
        raise UserError(f"--teacher {teacher_dir} is a {task} run: give {' and '.join(needed)}")
    if task == "classify":
        result, metrics, layers, widths, cfg = _distill_text(config_path, overrides, teacher_dir, out, data)
    else:
        result, metrics, layers, widths, cfg = _distill_vl(task, config_path, overrides, teacher_dir, out, data)
    info = {"teacher": str(Path(teacher_dir).resolve()), "task": task, **dataclasses.asdict(cfg),
            "layers": {name: {"teacher": pair[0], "student": pair[1]} for name, pair in layers.items()},
            "hidden_size": {"teacher": widths[0], "student": widths[1]}}
    atomic_write_text(Path(out) / DISTILL_FILE, json.dumps(info, indent=2) + "\n")
    return result, metrics, info


def _distill_vl(task: str, config_path: str | None, overrides: list[str], teacher_dir: str, out: str,
                data: Mapping[str, str | None]) -> tuple:
    from vl.config import load_config
    from vl.tasks.runs import load_any_task_run

    teacher_model, run, _ = load_any_task_run(teacher_dir)
    cfg = load_config(DistillVqaConfig if task == "vqa" else DistillRetrievalConfig, config_path, overrides)
    student = cfg.model or fewer_layers(run.model, cfg.distill.layer_fraction)
    check_same_inputs(student, run.model, str(config_path))
    teacher = Teacher(Path(teacher_dir), task, teacher_model, tuple(run.answers), cfg.distill)
    if task == "vqa":
        from vl.tasks.vqa.commands import finetune_vqa
        from vl.tasks.vqa.config import VqaFinetuneConfig

        finetune_cfg = VqaFinetuneConfig(model=student, vqa=cfg.vqa, train=cfg.train, finetune=cfg.finetune)
        result, metrics = finetune_vqa(finetune_cfg, "scratch", data["train_questions"], data["train_annotations"],
                                       data.get("val_questions"), data.get("val_annotations"), data["features"], out,
                                       teacher=teacher)
    else:
        from vl.tasks.retrieval.commands import finetune_retrieval
        from vl.tasks.retrieval.config import RetrievalFinetuneConfig

        finetune_cfg = RetrievalFinetuneConfig(model=student, retrieval=cfg.retrieval, train=cfg.train,
                                               finetune=cfg.finetune)
        result, metrics = finetune_retrieval(finetune_cfg, "scratch", data["karpathy"], data["features"], out,
                                             teacher=teacher)
    layers = {name: (getattr(run.model, name).num_layers, getattr(student, name).num_layers)
              for name in ("text", "vision", "cross") if getattr(student, name) is not None}
    return result, metrics, layers, (run.model.text.hidden_size, student.text.hidden_size), cfg.distill


def _distill_text(config_path: str | None, overrides: list[str], teacher_dir: str, out: str,
                  data: Mapping[str, str | None]) -> tuple:
    from vl.config import load_config
    from vl.text.classify import TASK as text_task
    from vl.text.finetune import TextFinetuneConfig, finetune_text, load_finetuned

    teacher_model, run, _ = load_finetuned(teacher_dir, text_task)
    cfg = load_config(DistillTextConfig, config_path, overrides)
    if cfg.finetune.mode != "full":
        raise UserError(f"--config {config_path}: finetune.mode is {cfg.finetune.mode}; a student trains in full")
    student = cfg.model or dataclasses.replace(run.model, num_layers=_kept(run.model.num_layers,
                                                                           cfg.distill.layer_fraction))
    for key in ("vocab_size", "type_vocab_size", "pad_token_id"):
        if getattr(student, key) != getattr(run.model, key):
            raise UserError(f"--config {config_path}: model.{key} is {getattr(student, key)!r} but the teacher's is "
                            f"{getattr(run.model, key)!r}; the student reads the teacher's inputs")
    teacher = Teacher(Path(teacher_dir), task="classify", model=teacher_model, answers=tuple(run.labels),
                      cfg=cfg.distill, student=student)
    result, metrics = finetune_text(text_task, TextFinetuneConfig(finetune=cfg.finetune, train=cfg.train),
                                    teacher_dir, data["train"], data.get("val"), out, teacher=teacher)
    return (result, metrics, {"text": (run.model.num_layers, student.num_layers)},
            (run.model.hidden_size, student.hidden_size), cfg.distill)
