"""A fusion model with its pretraining heads, as one module whose state dict is ``fusion.*`` + ``heads.*``.

Heads (``VLHeads``), all optional by ``HeadsConfig``:

- ``mlm``: ``MLMHead(H_t, vocab)`` with its decoder tied to ``fusion.text_embeddings.word_embeddings``; run it on
  ``text_hidden`` at masked positions only: (N, H_t) -> (N, V). (HF ``cls.predictions``.)
- ``itm``: ``nn.Linear(H, 2)`` on ``pooled``; row 1 = matched, row 0 = mismatched. (HF ``cls.seq_relationship``;
  LXMERT uses the same convention; VisualBERT's rows are swapped on load and export by ``vl.checkpoints.hf_vl``.)
- ``region``: ``RegionHead(H_v, {"obj": C, "attr": A, "feat": D})`` on ``region_hidden`` at masked regions.
  (LXMERT ``obj_predict_head``.)
- ``answer``: ``AnswerHead(H, num_answers)`` on ``pooled``. (LXMERT ``answer_head``.)

A run directory holds ``config.yaml`` with a ``model:`` section (``FusionConfig``) and a ``heads:`` section
(``HeadsConfig``), and ``model.safetensors`` with this module's state dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vl.encoders.heads import AnswerHead, MLMHead, RegionHead
from vl.encoders.transformer import init_bert_weights
from vl.fusion.base import FusionConfig, OutputRows, VLOutput


@dataclass(frozen=True)
class HeadsConfig:
    mlm: bool = True  # masked language modelling head, tied to the word embeddings
    itm: bool = True  # image-text matching head, Linear(H, 2) on the pooled output
    region_outputs: dict[str, int] = field(default_factory=dict)  # e.g. {obj: 1600, attr: 400, feat: 2048}
    num_answers: int = 0  # LXMERT's image-QA answer head; 0 = none

    def __post_init__(self):
        for name, width in self.region_outputs.items():
            if width <= 0:
                raise ValueError(f"heads.region_outputs.{name} must be positive, got {width}")
        if self.num_answers < 0:
            raise ValueError(f"heads.num_answers must be >= 0, got {self.num_answers}")


class VLHeads(nn.Module):
    """The pretraining heads of a fusion model; absent heads are None (see the module docstring)."""

    def __init__(self, fusion: nn.Module, cfg: HeadsConfig):
        super().__init__()
        text = fusion.cfg.text
        self.cfg = cfg
        self.mlm = MLMHead(fusion.text_hidden_size, text.vocab_size, text.activation, text.layer_norm_eps) \
            if cfg.mlm else None
        self.itm = nn.Linear(fusion.hidden_size, 2) if cfg.itm else None
        self.region = RegionHead(fusion.region_hidden_size, dict(cfg.region_outputs), text.activation,
                                 text.layer_norm_eps) if cfg.region_outputs else None
        self.answer = AnswerHead(fusion.hidden_size, cfg.num_answers, text.layer_norm_eps) \
            if cfg.num_answers else None
        self.apply(lambda module: init_bert_weights(module, text.init_std))
        if self.mlm is not None:
            nn.init.zeros_(self.mlm.decoder.bias)
            self.mlm.tie_to(fusion.text_embeddings.word_embeddings)


class VLPretrainingModel(nn.Module):
    """``fusion`` (any registered fusion model) + ``heads`` (``VLHeads``); ``model(batch) -> VLOutput``.

    Objectives call the heads on the output themselves, at the positions that have targets; ``rows``
    (``head_rows``) lets the fusion model compute its last layer at those positions only.
    """

    def __init__(self, fusion: nn.Module, heads_cfg: HeadsConfig | None = None):
        super().__init__()
        self.fusion = fusion
        self.heads = VLHeads(fusion, heads_cfg or HeadsConfig())

    @property
    def cfg(self) -> FusionConfig:
        return self.fusion.cfg

    def forward(self, batch: dict[str, torch.Tensor], rows: OutputRows | None = None) -> VLOutput:
        return self.fusion(batch, rows) if rows is not None else self.fusion(batch)


# Where each pretraining objective reads the last hidden states: (stream, batch key of its selection) for the
# heads at masked positions, "pooled" for heads on the pooled output ([CLS], which the models always compute).
HEAD_ROWS: dict[str, tuple[str, str] | str] = {
    "mlm": ("text", "mlm_labels"),
    "mrc": ("regions", "mrm_class_targets"),
    "mrc_kl": ("regions", "mrm_mask"),
    "mrfr": ("regions", "mrm_mask"),
    "itm": "pooled",
    "qa": "pooled",
}


def head_rows(batch: dict, objectives: Sequence[str]) -> OutputRows | None:
    """The rows ``objectives`` read, from the batch's targets; None when one of them may read any row.

    mlm: text rows with ``mlm_labels != -100``; mrc: regions with ``mrm_class_targets != -100``; mrc_kl, mrfr:
    ``mrm_mask``; itm, qa: the pooled output only. An objective not in ``HEAD_ROWS`` (wra reads every pair of
    positions) or a missing target key gives None: compute every row.
    """
    selected: dict[str, torch.Tensor] = {}
    for name in objectives:
        reads = HEAD_ROWS.get(name)
        if reads is None:
            return None
        if reads == "pooled":
            continue
        stream, key = reads
        target = batch.get(key)
        if not isinstance(target, torch.Tensor):
            return None
        chosen = target.bool() if key == "mrm_mask" else target != -100  # (B, T) or (B, R)
        selected[stream] = selected[stream] | chosen if stream in selected else chosen
    input_ids = batch.get("input_ids")
    region_feats = batch.get("region_feats")
    if not isinstance(input_ids, torch.Tensor) or not isinstance(region_feats, torch.Tensor):
        return None
    text = selected.get("text", torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device))
    regions = selected.get("regions", torch.zeros(region_feats.shape[:2], dtype=torch.bool,
                                                  device=region_feats.device))
    if text.shape != input_ids.shape or regions.shape != region_feats.shape[:2]:
        return None
    return OutputRows(text=text, regions=regions)


def build_pretraining_model(cfg: FusionConfig, heads_cfg: HeadsConfig | None = None) -> VLPretrainingModel:
    """The fusion model ``cfg`` describes, with the heads ``heads_cfg`` asks for."""
    from vl.fusion import build_fusion

    return VLPretrainingModel(build_fusion(cfg), heads_cfg)
