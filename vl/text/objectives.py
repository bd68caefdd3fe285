"""Text-only pretraining objectives (BERT family) and the model that computes them.

Objectives, by their YAML name (``TEXT_OBJECTIVE_REGISTRY``), each returning named losses (and logged metrics):

- ``mlm``: masked LM, cross-entropy at the selected positions only -> ``mlm`` (+ ``mlm_acc``);
- ``nsp`` / ``sop``: next-sentence / sentence-order prediction from the pooled [CLS] -> ``nsp`` or ``sop``
  (+ ``*_acc``);
- ``electra``: replaced-token detection. A small generator MLM (sharing the discriminator's word, position and
  segment embeddings) fills the masked positions with tokens sampled from its distribution; the discriminator
  labels every real token original or replaced -> ``gen_mlm`` and ``rtd`` (weights 1 and λ = 50 by default),
  with ``disc_acc`` and ``disc_baseline_acc`` (the accuracy of answering "original" everywhere);
- ``clm``: causal LM (GPT) through the encoder's causal mask -> ``clm``;
- ``prefix_lm``: UniLM's sequence-to-sequence LM: bidirectional over [CLS] A [SEP], causal over B -> ``prefix_lm``.

Token-level heads run on the predicted positions only (``gather_positions``): the vocabulary projection is the
most expensive matmul. The LM objectives reuse the MLM head (UniLM shares one head across mask modes).

Objectives that need different inputs cannot share a run: ``mlm``/``nsp``/``sop``/``electra`` read masked
sequences, ``clm`` plain packed sequences and ``prefix_lm`` sentence pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vl.text.bert import BertPretrainingModel
from vl.encoders.heads import MLMHead, gather_positions
from vl.encoders.text import TextEncoderConfig
from vl.encoders.transformer import TransformerEncoder, activation_fn, build_attention_mask, init_bert_weights
from vl.errors import UserError

InputView = Literal["masked", "causal", "prefix"]
PairTaskName = Literal["none", "nsp", "sop", "next"]


@dataclass(frozen=True)
class TextObjective:
    """What a text objective needs from the data: its input view and its sentence-pair task."""

    name: str
    view: InputView
    pairs: PairTaskName = "none"


TEXT_OBJECTIVE_REGISTRY: dict[str, TextObjective] = {
    "mlm": TextObjective("mlm", "masked"),
    "nsp": TextObjective("nsp", "masked", "nsp"),
    "sop": TextObjective("sop", "masked", "sop"),
    "electra": TextObjective("electra", "masked"),
    "clm": TextObjective("clm", "causal"),
    "prefix_lm": TextObjective("prefix_lm", "prefix", "next"),
}


@dataclass(frozen=True)
class ElectraConfig:
    generator_hidden_size: int | None = None  # None: a quarter of the discriminator's hidden size
    generator_num_heads: int | None = None  # None: heads scaled like the width (at least 1)
    generator_intermediate_size: int | None = None  # None: 4 x generator width
    generator_num_layers: int | None = None  # None: as many layers as the discriminator
    disc_weight: float = 50.0  # λ: weight of the discriminator loss
    gen_weight: float = 1.0  # weight of the generator's MLM loss
    temperature: float = 1.0  # sampling temperature of the generator

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")

    def generator_sizes(self, cfg: TextEncoderConfig) -> tuple[int, int, int, int]:
        """(hidden, heads, intermediate, layers) of the generator for discriminator ``cfg``."""
        hidden = self.generator_hidden_size or max(1, cfg.hidden_size // 4)
        heads = self.generator_num_heads or max(1, cfg.num_heads * hidden // cfg.hidden_size)
        if hidden % heads:
            raise UserError(f"electra.generator_hidden_size {hidden} is not divisible by {heads} heads; set "
                            "electra.generator_num_heads")
        intermediate = self.generator_intermediate_size or 4 * hidden
        layers = self.generator_num_layers or cfg.num_layers
        return hidden, heads, intermediate, layers


@dataclass(frozen=True)
class ObjectivePlan:
    """The data a set of objectives needs: one input view, at most one pair task, whether to mask."""

    view: InputView
    pairs: PairTaskName
    masking: bool


def plan_objectives(objectives: Mapping[str, float]) -> ObjectivePlan:
    """Check that ``objectives`` (name -> weight) can share one batch; a clash is a UserError naming both."""
    if not objectives:
        raise UserError("config 'objectives' is empty: name at least one of " + ", ".join(TEXT_OBJECTIVE_REGISTRY))
    specs = []
    for name in objectives:
        if name not in TEXT_OBJECTIVE_REGISTRY:
            raise UserError(f"unknown text objective '{name}' in 'objectives' (known: "
                            f"{', '.join(TEXT_OBJECTIVE_REGISTRY)})")
        specs.append(TEXT_OBJECTIVE_REGISTRY[name])
    views = {spec.view for spec in specs}
    if len(views) > 1:
        first, second = specs[0], next(spec for spec in specs if spec.view != specs[0].view)
        raise UserError(f"objectives '{first.name}' and '{second.name}' need different inputs ({first.view} vs "
                        f"{second.view} sequences); train them in separate runs")
    pair_tasks = {spec.pairs for spec in specs if spec.pairs != "none"}
    if len(pair_tasks) > 1:
        raise UserError(f"objectives {' and '.join(sorted(pair_tasks))} build different sentence pairs; pick one")
    if "electra" in objectives and "mlm" in objectives:
        raise UserError("objectives 'electra' and 'mlm' both predict the masked tokens; electra's generator is "
                        "the MLM (drop 'mlm')")
    view = specs[0].view
    return ObjectivePlan(view=view, pairs=next(iter(pair_tasks), "none"), masking=view == "masked")


def objective_loss_weights(objectives: Mapping[str, float], electra: ElectraConfig) -> dict[str, float]:
    """The loop's ``loss_weights``: each objective's losses with the objective's weight."""
    weights: dict[str, float] = {}
    for name, weight in objectives.items():
        if name == "electra":
            weights["gen_mlm"] = weight * electra.gen_weight
            weights["rtd"] = weight * electra.disc_weight
        else:
            weights[name] = weight
    return weights


# --------------------------------------------------------------------------------------------------------------
# Losses


def _zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """0 that still depends on ``tensors`` (no NaN from an empty mean; every parameter keeps a gradient)."""
    return sum(tensor.float().sum() for tensor in tensors) * 0.0


def token_prediction_loss(head: MLMHead, hidden: torch.Tensor, labels: torch.Tensor,
                          name: str) -> dict[str, torch.Tensor]:
    """Cross-entropy of ``head`` at the positions where ``labels`` (B, T) != -100; hidden (B, T, H).

    Returns ``{name: loss, name_acc: accuracy}``; the head runs on the N selected rows only, (N, H) -> (N, V).
    """
    selected, targets = gather_positions(hidden, labels)  # (N, H), (N,)
    logits = head(selected)  # (N, V)
    if targets.numel() == 0:
        zero = _zero_loss(logits)
        return {name: zero, f"{name}_acc": zero.detach()}
    loss = F.cross_entropy(logits.float(), targets)
    accuracy = (logits.detach().argmax(dim=-1) == targets).float().mean()
    return {name: loss, f"{name}_acc": accuracy}


def sentence_pair_loss(head: nn.Module, pooled: torch.Tensor, labels: torch.Tensor,
                       name: str) -> dict[str, torch.Tensor]:
    """Binary NSP / SOP cross-entropy on the pooled [CLS] (B, H); labels (B,) 0 = positive, 1 = negative."""
    logits = head(pooled)  # (B, 2)
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = (logits.detach().argmax(dim=-1) == labels).float().mean()
    return {name: loss, f"{name}_acc": accuracy}


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), (N, V) -> (N,), by the Gumbel-max trick."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-9, 1.0 - 1e-7)))
    return (logits.float() / temperature + gumbel).argmax(dim=-1)


# --------------------------------------------------------------------------------------------------------------
# ELECTRA parts


class ElectraGenerator(nn.Module):
    """ELECTRA's generator: a small MLM over the discriminator's embeddings.

    The embeddings (width H) are the discriminator's own, passed in at call time; ``embed_project`` maps them to
    the generator's width G; the MLM head maps G back to H and decodes with the shared word embeddings.
    """

    def __init__(self, cfg: TextEncoderConfig, hidden_size: int, num_heads: int, intermediate_size: int,
                 num_layers: int, word_embeddings: nn.Embedding):
        super().__init__()
        self.embed_project = nn.Linear(cfg.hidden_size, hidden_size) if hidden_size != cfg.hidden_size else None
        self.encoder = TransformerEncoder(num_layers, hidden_size, num_heads, intermediate_size, dropout=cfg.dropout,
                                          attn_dropout=cfg.attn_dropout, layer_norm_eps=cfg.layer_norm_eps,
                                          activation=cfg.activation, pre_ln=cfg.pre_ln)
        self.mlm = MLMHead(hidden_size, cfg.vocab_size, cfg.activation, cfg.layer_norm_eps,
                           embedding_size=cfg.hidden_size)
        self.apply(lambda module: init_bert_weights(module, cfg.init_std))
        self.mlm.tie_to(word_embeddings)

    def forward(self, embedded: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """embedded (B, T, H) -> hidden (B, T, G)."""
        x = self.embed_project(embedded) if self.embed_project is not None else embedded
        return self.encoder(x, attn_mask)


class ReplacedTokenHead(nn.Module):
    """ELECTRA's discriminator head: Linear(H, H) -> activation -> Linear(H, 1), one logit per token."""

    def __init__(self, hidden_size: int, activation: str = "gelu"):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.act = activation_fn(activation)
        self.out = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.dense(hidden))).squeeze(-1)


# --------------------------------------------------------------------------------------------------------------
# The model


class TextPretrainingModel(nn.Module):
    """A BERT-family model with the heads its objectives need; ``forward(batch)`` returns the named losses.

    Parameter names follow ``BertPretrainingModel`` (``text_encoder.*``, ``mlm.*`` tied to the word
    embeddings, ``nsp.*``, which also serves SOP), so ``bert_state_dict()`` is a checkpoint any BERT loader reads.
    With ELECTRA, ``generator.*`` and ``rtd.*`` are added; the discriminator is ``text_encoder``.
    """

    BERT_PREFIXES = ("text_encoder.", "mlm.", "nsp.")

    def __init__(self, cfg: TextEncoderConfig, objectives: Mapping[str, float], electra: ElectraConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.plan = plan_objectives(objectives)
        self.objectives = tuple(objectives)
        self.electra_cfg = electra or ElectraConfig()
        bert = BertPretrainingModel(cfg)  # its modules, under its names
        self.text_encoder, self.mlm, self.nsp = bert.text_encoder, bert.mlm, bert.nsp
        self.generator: ElectraGenerator | None = None
        self.rtd: ReplacedTokenHead | None = None
        if "electra" in self.objectives:
            hidden, heads, intermediate, layers = self.electra_cfg.generator_sizes(cfg)
            self.generator = ElectraGenerator(cfg, hidden, heads, intermediate, layers,
                                              self.text_encoder.embeddings.word_embeddings)
            self.rtd = ReplacedTokenHead(cfg.hidden_size, cfg.activation)
            self.rtd.apply(lambda module: init_bert_weights(module, cfg.init_std))

    def bert_state_dict(self) -> dict[str, torch.Tensor]:
        """The ``BertPretrainingModel`` part of the weights (what a run directory's model.safetensors holds)."""
        return {key: value for key, value in self.state_dict().items() if key.startswith(self.BERT_PREFIXES)}

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Losses and metrics of the configured objectives on one batch (keys: ``vl.text.batches``)."""
        attention_mask = batch["attention_mask"]
        token_type_ids = batch.get("token_type_ids")
        losses: dict[str, torch.Tensor] = {}
        if self.plan.view in ("causal", "prefix"):
            mode = self.plan.view
            out = self.text_encoder(batch["input_ids"], attention_mask, token_type_ids, mask_mode=mode,
                                    prefix_len=batch.get("prefix_len") if mode == "prefix" else None)
            name = "clm" if mode == "causal" else "prefix_lm"
            return token_prediction_loss(self.mlm, out.hidden, batch["lm_labels"], name)
        if self.generator is not None:
            electra_losses, pooled = self._electra(batch)
            losses.update(electra_losses)
        else:
            out = self.text_encoder(batch["input_ids"], attention_mask, token_type_ids)
            pooled = out.pooled
            if "mlm" in self.objectives:
                losses.update(token_prediction_loss(self.mlm, out.hidden, batch["mlm_labels"], "mlm"))
        if self.plan.pairs in ("nsp", "sop"):
            losses.update(sentence_pair_loss(self.nsp, pooled, batch["sentence_labels"], self.plan.pairs))
        return losses

    def _electra(self, batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Generator MLM, sampled replacements, discriminator over every real token; also returns its pooled."""
        masked_ids, labels = batch["input_ids"], batch["mlm_labels"]
        attention_mask, token_type_ids = batch["attention_mask"], batch.get("token_type_ids")
        padding = None if bool(attention_mask.all()) else attention_mask
        attn_mask = build_attention_mask(padding, "bidirectional", seq_len=masked_ids.shape[1])
        gen_hidden = self.generator(self.text_encoder.embeddings(masked_ids, token_type_ids), attn_mask)
        selected_hidden, targets = gather_positions(gen_hidden, labels)  # (N, G), (N,)
        gen_logits = self.generator.mlm(selected_hidden)  # (N, V), only at the masked positions
        losses: dict[str, torch.Tensor] = {}
        selected = labels != -100  # (B, T)
        original = torch.where(selected, labels, masked_ids)  # (B, T) the uncorrupted sequence
        corrupted = original.clone()
        if targets.numel():
            losses["gen_mlm"] = F.cross_entropy(gen_logits.float(), targets)
            losses["gen_mlm_acc"] = (gen_logits.detach().argmax(dim=-1) == targets).float().mean()
            corrupted[selected] = sample_tokens(gen_logits.detach(), self.electra_cfg.temperature)
        else:
            losses["gen_mlm"] = _zero_loss(gen_logits)
            losses["gen_mlm_acc"] = losses["gen_mlm"].detach()
        replaced = (corrupted != original).float()  # (B, T)
        out = self.text_encoder(corrupted, attention_mask, token_type_ids)
        disc_logits = self.rtd(out.hidden)  # (B, T)
        real = attention_mask.bool()
        logits, is_replaced = disc_logits[real].float(), replaced[real]
        losses["rtd"] = F.binary_cross_entropy_with_logits(logits, is_replaced)
        losses["disc_acc"] = ((logits.detach() > 0).float() == is_replaced).float().mean()
        losses["disc_baseline_acc"] = 1.0 - is_replaced.mean()
        losses["replaced_rate"] = is_replaced.mean()
        return losses, out.pooled
