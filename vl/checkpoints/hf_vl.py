"""Hugging Face LXMERT and VisualBERT checkpoints to and from our fusion models, and BERT into a text stream.

A ``save_pretrained`` directory of ``LxmertForPreTraining`` / ``LxmertModel`` loads into a ``DualStreamModel``
(``cross.kind: lxmert``), one of ``VisualBertForPreTraining`` / ``VisualBertModel`` into a ``SingleStreamModel``
(VisualBERT configuration), each inside a ``VLPretrainingModel`` with the heads the file holds. Names map as::

    LXMERT                                            ours (VLPretrainingModel)
    lxmert.embeddings.{word,position,token_type}_…    fusion.text_embeddings.{…}; LayerNorm -> norm
    lxmert.encoder.visn_fc.{visn_fc,visn_layer_norm}  fusion.region_embeddings.{feature_proj,feature_norm}
    lxmert.encoder.visn_fc.{box_fc,box_layer_norm}    fusion.region_embeddings.{box_proj,box_norm}
    lxmert.encoder.layer.{i}.<BERT layer>             fusion.text_layers.{i}.<layer>
    lxmert.encoder.r_layers.{i}.<BERT layer>          fusion.vision_layers.{i}.<layer>
    lxmert.encoder.x_layers.{i}.visual_attention.…    fusion.cross_layers.{i}.cross_attention / cross_residual
    lxmert.encoder.x_layers.{i}.lang_* / visn_*       fusion.cross_layers.{i}.text_layer / vision_layer
    lxmert.pooler.dense                               fusion.pooler.dense
    cls.predictions.{transform,bias,decoder}          heads.mlm.{transform,decoder.bias,decoder.weight (tied)}
    cls.seq_relationship                              heads.itm
    obj_predict_head.{transform,decoder_dict.<name>}  heads.region.{transform,decoders.<name>}
    answer_head.logit_fc.{0,2,3}                      heads.answer.{dense,norm,classifier}

    VisualBERT
    visual_bert.embeddings.{word,position,token_type}_embeddings, LayerNorm   fusion.text_embeddings.*
    visual_bert.embeddings.visual_projection            fusion.region_embeddings.feature_proj
    visual_bert.embeddings.visual_token_type_embeddings fusion.region_embeddings.type_embeddings
    visual_bert.embeddings.visual_position_embeddings   fusion.region_embeddings.position_embeddings
    visual_bert.encoder.layer.{i}.<BERT layer>          fusion.encoder.layers.{i}.<layer>
    visual_bert.pooler.dense, cls.*                     fusion.pooler.dense, heads.mlm / heads.itm

VisualBERT's ``cls.seq_relationship`` scores row 0 = matched; ``heads.itm`` follows this project's (and LXMERT's)
convention, row 1 = matched, so its two rows are swapped on load and swapped back on export.
Base-model files (``LxmertModel``, ``VisualBertModel``) have no ``lxmert.``/``visual_bert.`` prefix and no heads.
Inputs map as: ``visual_feats`` = ``region_feats``, ``visual_pos`` = ``region_boxes``, ``visual_attention_mask``
= ``region_mask``; VisualBERT's ``visual_embeds`` = ``region_feats`` with ``visual_token_type_ids`` all 1.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from vl.checkpoints.hf_bert import HF_TO_OUR_ACTIVATION, OUR_TO_HF_ACTIVATION, load_hf_bert
from vl.checkpoints.io import (
    LoadReport,
    detect_checkpoint_kind,
    load_hf_weights,
    load_into,
    read_json_file,
    save_weights,
)
from vl.config import atomic_write_text
from vl.encoders.regions import init_visual_tables
from vl.encoders.text import TextEncoderConfig
from vl.errors import UserError
from vl.fusion.base import CrossConfig, FusionConfig, RegionConfig, VisionStreamConfig
from vl.fusion.pretraining import HeadsConfig, VLPretrainingModel, build_pretraining_model

LXMERT_KIND = "hf-lxmert"
VISUALBERT_KIND = "hf-visualbert"

# LxmertConfig's / VisualBertConfig's defaults, for keys a config.json leaves out.
HF_LXMERT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522, "hidden_size": 768, "num_attention_heads": 12, "num_qa_labels": 9500,
    "num_object_labels": 1600, "num_attr_labels": 400, "intermediate_size": 3072, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
    "type_vocab_size": 2, "initializer_range": 0.02, "l_layers": 9, "x_layers": 5, "r_layers": 5,
    "visual_feat_dim": 2048, "visual_pos_dim": 4, "visual_loss_normalizer": 6.67, "task_matched": True,
    "task_mask_lm": True, "task_obj_predict": True, "task_qa": True, "visual_obj_loss": True,
    "visual_attr_loss": True, "visual_feat_loss": True,
}
HF_VISUALBERT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522, "hidden_size": 768, "visual_embedding_dim": 512, "num_hidden_layers": 12,
    "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
    "initializer_range": 0.02, "layer_norm_eps": 1e-12, "bypass_transformer": False,
    "special_visual_initialize": True, "pad_token_id": 1,
}
LXMERT_LAYER_NORM_EPS = 1e-12  # hard-coded in modeling_lxmert.py
GEOMETRY_BY_POS_DIM = {4: "lxmert4", 5: "vilbert5", 7: "uniter7"}

# A BERT layer's modules: ours (TransformerLayer) -> Hugging Face.
BERT_LAYER = {
    "attention.query": "attention.self.query",
    "attention.key": "attention.self.key",
    "attention.value": "attention.self.value",
    "attention.out": "attention.output.dense",
    "attention_residual.norm": "attention.output.LayerNorm",
    "ffn.fc_in": "intermediate.dense",
    "ffn.fc_out": "output.dense",
    "ffn_residual.norm": "output.LayerNorm",
}


def _lxmert_x_half(side: str) -> dict[str, str]:
    """One stream's half of an LXMERT x-layer: ours (TransformerLayer) -> Hugging Face (``lang``/``visn``)."""
    return {
        "attention.query": f"{side}_self_att.self.query",
        "attention.key": f"{side}_self_att.self.key",
        "attention.value": f"{side}_self_att.self.value",
        "attention.out": f"{side}_self_att.output.dense",
        "attention_residual.norm": f"{side}_self_att.output.LayerNorm",
        "ffn.fc_in": f"{side}_inter.dense",
        "ffn.fc_out": f"{side}_output.dense",
        "ffn_residual.norm": f"{side}_output.LayerNorm",
    }


LXMERT_MODULES = {
    "fusion.text_embeddings.word_embeddings": "lxmert.embeddings.word_embeddings",
    "fusion.text_embeddings.position_embeddings": "lxmert.embeddings.position_embeddings",
    "fusion.text_embeddings.token_type_embeddings": "lxmert.embeddings.token_type_embeddings",
    "fusion.text_embeddings.norm": "lxmert.embeddings.LayerNorm",
    "fusion.region_embeddings.feature_proj": "lxmert.encoder.visn_fc.visn_fc",
    "fusion.region_embeddings.feature_norm": "lxmert.encoder.visn_fc.visn_layer_norm",
    "fusion.region_embeddings.box_proj": "lxmert.encoder.visn_fc.box_fc",
    "fusion.region_embeddings.box_norm": "lxmert.encoder.visn_fc.box_layer_norm",
    "fusion.pooler.dense": "lxmert.pooler.dense",
    "heads.mlm.transform.dense": "cls.predictions.transform.dense",
    "heads.mlm.transform.norm": "cls.predictions.transform.LayerNorm",
    "heads.mlm.decoder": "cls.predictions.decoder",
    "heads.itm": "cls.seq_relationship",
    "heads.region.transform.dense": "obj_predict_head.transform.dense",
    "heads.region.transform.norm": "obj_predict_head.transform.LayerNorm",
    "heads.answer.dense": "answer_head.logit_fc.0",
    "heads.answer.norm": "answer_head.logit_fc.2",
    "heads.answer.classifier": "answer_head.logit_fc.3",
}
LXMERT_CROSS = {
    "cross_attention.query": "visual_attention.att.query",
    "cross_attention.key": "visual_attention.att.key",
    "cross_attention.value": "visual_attention.att.value",
    "cross_attention.out": "visual_attention.output.dense",
    "cross_residual.norm": "visual_attention.output.LayerNorm",
    **{f"text_layer.{ours}": hf for ours, hf in _lxmert_x_half("lang").items()},
    **{f"vision_layer.{ours}": hf for ours, hf in _lxmert_x_half("visn").items()},
}
VISUALBERT_MODULES = {
    "fusion.text_embeddings.word_embeddings": "visual_bert.embeddings.word_embeddings",
    "fusion.text_embeddings.position_embeddings": "visual_bert.embeddings.position_embeddings",
    "fusion.text_embeddings.token_type_embeddings": "visual_bert.embeddings.token_type_embeddings",
    "fusion.text_embeddings.norm": "visual_bert.embeddings.LayerNorm",
    "fusion.region_embeddings.feature_proj": "visual_bert.embeddings.visual_projection",
    "fusion.region_embeddings.type_embeddings": "visual_bert.embeddings.visual_token_type_embeddings",
    "fusion.region_embeddings.position_embeddings": "visual_bert.embeddings.visual_position_embeddings",
    "fusion.pooler.dense": "visual_bert.pooler.dense",
    "heads.mlm.transform.dense": "cls.predictions.transform.dense",
    "heads.mlm.transform.norm": "cls.predictions.transform.LayerNorm",
    "heads.mlm.decoder": "cls.predictions.decoder",
    "heads.itm": "cls.seq_relationship",
}
_LAYER_PATTERNS = {
    LXMERT_KIND: (
        (re.compile(r"fusion\.text_layers\.(\d+)\.(.+)"), "lxmert.encoder.layer.{}.{}", BERT_LAYER),
        (re.compile(r"fusion\.vision_layers\.(\d+)\.(.+)"), "lxmert.encoder.r_layers.{}.{}", BERT_LAYER),
        (re.compile(r"fusion\.cross_layers\.(\d+)\.(.+)"), "lxmert.encoder.x_layers.{}.{}", LXMERT_CROSS),
    ),
    VISUALBERT_KIND: (
        (re.compile(r"fusion\.encoder\.layers\.(\d+)\.(.+)"), "visual_bert.encoder.layer.{}.{}", BERT_LAYER),
    ),
}
_MODULES = {LXMERT_KIND: LXMERT_MODULES, VISUALBERT_KIND: VISUALBERT_MODULES}
_BASE_PREFIX = {LXMERT_KIND: "lxmert.", VISUALBERT_KIND: "visual_bert."}
_HEAD_PREFIXES = ("cls.", "obj_predict_head.", "answer_head.")
# Non-persistent buffers that some transformers versions wrote; they carry no weights.
_IGNORED_HF_KEY = re.compile(r"(lxmert\.|visual_bert\.)?embeddings\.(position_ids|token_type_ids)")


def _swap_itm_rows(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VisualBERT's matching head has row 0 = matched (BERT's next-sentence convention); ours and LXMERT's have
    row 1 = matched. Swapping the two rows converts either way."""
    return {key: state_dict[key].flip(0) for key in ("heads.itm.weight", "heads.itm.bias") if key in state_dict}


def our_key_to_hf(key: str, kind: str) -> str:
    """The Hugging Face name (``LxmertForPreTraining`` / ``VisualBertForPreTraining``) of a ``VLPretrainingModel``
    tensor name; KeyError when the tensor has no counterpart there."""
    if key == "heads.mlm.decoder.bias":
        return "cls.predictions.bias"
    module, leaf = key.rsplit(".", 1)
    region = re.fullmatch(r"heads\.region\.decoders\.(\w+)", module)
    if region and kind == LXMERT_KIND:
        return f"obj_predict_head.decoder_dict.{region.group(1)}.{leaf}"
    if module in _MODULES[kind]:
        return f"{_MODULES[kind][module]}.{leaf}"
    for pattern, template, table in _LAYER_PATTERNS[kind]:
        match = pattern.fullmatch(module)
        if match and match.group(2) in table:
            return f"{template.format(match.group(1), table[match.group(2)])}.{leaf}"
    raise KeyError(f"'{key}' has no Hugging Face {kind} name")


# --------------------------------------------------------------------------------------------------------------
# Configs


def _value(config: dict[str, Any], defaults: dict[str, Any], key: str, kind: type, source: str) -> Any:
    value = config.get(key, defaults[key])
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise UserError(f"{source}: '{key}' must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{source}: '{key}' must be a number, got {value!r}")
        value = float(value)
    return value


def _activation(config: dict[str, Any], source: str) -> str:
    hidden_act = config.get("hidden_act", "gelu")
    if hidden_act not in HF_TO_OUR_ACTIVATION:
        raise UserError(f"{source}: hidden_act {hidden_act!r} is not supported "
                        f"(supported: {', '.join(HF_TO_OUR_ACTIVATION)})")
    return HF_TO_OUR_ACTIVATION[hidden_act]


def _build(source: str, make):
    try:
        return make()
    except ValueError as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"{source}: {err}") from None


def lxmert_configs_from_hf(config: dict[str, Any], source: str | os.PathLike = "config.json"
                           ) -> tuple[FusionConfig, HeadsConfig]:
    """Our (FusionConfig, HeadsConfig) for an ``LxmertForPreTraining`` ``config.json`` mapping."""
    source = str(source)

    def get(key: str, kind: type) -> Any:
        return _value(config, HF_LXMERT_DEFAULTS, key, kind, source)

    pos_dim = get("visual_pos_dim", int)
    if pos_dim not in GEOMETRY_BY_POS_DIM:
        raise UserError(f"{source}: visual_pos_dim {pos_dim} is not supported (4, 5 or 7)")
    hidden, heads = get("hidden_size", int), get("num_attention_heads", int)
    text = _build(source, lambda: TextEncoderConfig(
        vocab_size=get("vocab_size", int), hidden_size=hidden, num_layers=get("l_layers", int), num_heads=heads,
        intermediate_size=get("intermediate_size", int), max_position=get("max_position_embeddings", int),
        type_vocab_size=get("type_vocab_size", int), dropout=get("hidden_dropout_prob", float),
        attn_dropout=get("attention_probs_dropout_prob", float), layer_norm_eps=LXMERT_LAYER_NORM_EPS,
        activation=_activation(config, source), pre_ln=False, pad_token_id=0,
        init_std=get("initializer_range", float)))
    fusion = _build(source, lambda: FusionConfig(
        fusion="dual_stream", text=text,
        region=RegionConfig(feature_dim=get("visual_feat_dim", int), geometry=GEOMETRY_BY_POS_DIM[pos_dim],
                            part_norm=True, combine="mean", final_norm="none", type_embedding="none"),
        vision=VisionStreamConfig(hidden_size=hidden, num_layers=get("r_layers", int), num_heads=heads,
                                  intermediate_size=get("intermediate_size", int)),
        cross=CrossConfig(kind="lxmert", num_layers=get("x_layers", int)),
        pooling="text_cls"))
    region_outputs = {}
    if get("task_obj_predict", bool):
        if get("visual_obj_loss", bool):
            region_outputs["obj"] = get("num_object_labels", int)
        if get("visual_attr_loss", bool):
            region_outputs["attr"] = get("num_attr_labels", int)
        if get("visual_feat_loss", bool):
            region_outputs["feat"] = get("visual_feat_dim", int)
    heads_cfg = _build(source, lambda: HeadsConfig(
        mlm=True, itm=True, region_outputs=region_outputs,
        num_answers=get("num_qa_labels", int) if get("task_qa", bool) else 0))
    return fusion, heads_cfg


def visualbert_configs_from_hf(config: dict[str, Any], source: str | os.PathLike = "config.json"
                               ) -> tuple[FusionConfig, HeadsConfig]:
    """Our (FusionConfig, HeadsConfig) for a ``VisualBertForPreTraining`` ``config.json`` mapping."""
    source = str(source)

    def get(key: str, kind: type) -> Any:
        return _value(config, HF_VISUALBERT_DEFAULTS, key, kind, source)

    if get("bypass_transformer", bool):
        raise UserError(f"{source}: 'bypass_transformer: true' (VisualBERT's text-only encoder plus one joint "
                        "layer) is not supported")
    pad_token_id = config.get("pad_token_id", HF_VISUALBERT_DEFAULTS["pad_token_id"])
    pad_token_id = 0 if pad_token_id is None else pad_token_id
    text = _build(source, lambda: TextEncoderConfig(
        vocab_size=get("vocab_size", int), hidden_size=get("hidden_size", int),
        num_layers=get("num_hidden_layers", int), num_heads=get("num_attention_heads", int),
        intermediate_size=get("intermediate_size", int), max_position=get("max_position_embeddings", int),
        type_vocab_size=get("type_vocab_size", int), dropout=get("hidden_dropout_prob", float),
        attn_dropout=get("attention_probs_dropout_prob", float), layer_norm_eps=get("layer_norm_eps", float),
        activation=_activation(config, source), pre_ln=False, pad_token_id=pad_token_id,
        init_std=get("initializer_range", float)))
    fusion = _build(source, lambda: FusionConfig(
        fusion="single_stream", text=text,
        region=RegionConfig(feature_dim=get("visual_embedding_dim", int), geometry="none", part_norm=False,
                            combine="sum", final_norm="text", type_embedding="own", type_id=1,
                            position_embedding=True)))
    return fusion, HeadsConfig(mlm=True, itm=True)


def hf_architecture(cfg: FusionConfig, heads: HeadsConfig) -> str:
    """``hf-lxmert`` or ``hf-visualbert``: the Hugging Face format ``cfg`` can be exported to exactly.

    Raises UserError saying what does not match when neither does.
    """
    if cfg.text.pre_ln:
        raise UserError("cannot export a pre-LN model: LXMERT and VisualBERT are post-LN")
    if cfg.tags is not None:
        raise UserError("cannot export a model with object tags (model.tags): LXMERT and VisualBERT read none")
    if cfg.region.box_relations:
        raise UserError("cannot export a model with region.box_relations: LXMERT and VisualBERT have no "
                        "attention bias from box pairs")
    if cfg.text.activation not in OUR_TO_HF_ACTIVATION:
        raise UserError(f"cannot export activation '{cfg.text.activation}' as a Hugging Face hidden_act")
    region = cfg.region
    if cfg.fusion == "dual_stream":
        problems = []
        if cfg.cross.kind != "lxmert":
            problems.append(f"cross.kind is '{cfg.cross.kind}' (LXMERT: 'lxmert'; ViLBERT has no Hugging Face "
                            "format)")
        if cfg.vision.intermediate_size != cfg.text.intermediate_size:
            problems.append("vision.intermediate_size differs from text.intermediate_size")
        if cfg.text.layer_norm_eps != LXMERT_LAYER_NORM_EPS:
            problems.append(f"text.layer_norm_eps is {cfg.text.layer_norm_eps} (LXMERT: 1e-12)")
        if region.geometry == "none" or not region.part_norm or not region.box_norm or region.combine != "mean" \
                or region.final_norm != "none" or region.type_embedding != "none" or region.position_embedding:
            problems.append("the region embeddings are not LXMERT's (LN(W f) + LN(W b)) / 2")
        if heads.region_outputs and not set(heads.region_outputs) <= {"obj", "attr", "feat"}:
            problems.append(f"region head outputs {sorted(heads.region_outputs)} (LXMERT: obj, attr, feat)")
        if heads.region_outputs.get("feat", region.feature_dim) != region.feature_dim:
            problems.append("the region head's 'feat' width differs from region.feature_dim")
        if (heads.region_outputs or heads.num_answers) and not (heads.mlm and heads.itm):
            problems.append("LxmertForPreTraining always has MLM and matching heads")
        if problems:
            raise UserError("cannot export as Hugging Face LXMERT: " + "; ".join(problems))
        return LXMERT_KIND
    problems = []
    if not (region.geometry == "none" and not region.part_norm and region.final_norm == "text"
            and region.type_embedding == "own" and region.type_id == 1 and region.position_embedding):
        problems.append("the region embeddings are not VisualBERT's (geometry none, part_norm false, final_norm "
                        "text, type_embedding own with type_id 1, position_embedding true)")
    if heads.region_outputs or heads.num_answers:
        problems.append("VisualBertForPreTraining has no region or answer head")
    if heads.mlm != heads.itm:
        problems.append("VisualBertForPreTraining has both an MLM and a matching head, or neither")
    if problems:
        raise UserError("cannot export as Hugging Face VisualBERT: " + "; ".join(problems))
    return VISUALBERT_KIND


def hf_config(cfg: FusionConfig, heads: HeadsConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` mapping for ``cfg`` + ``heads`` (see ``hf_architecture``)."""
    kind = hf_architecture(cfg, heads)
    text = cfg.text
    with_heads = heads.mlm or heads.itm or bool(heads.region_outputs) or bool(heads.num_answers)
    common = {
        "vocab_size": text.vocab_size, "hidden_size": text.hidden_size, "num_attention_heads": text.num_heads,
        "intermediate_size": text.intermediate_size, "hidden_act": OUR_TO_HF_ACTIVATION[text.activation],
        "hidden_dropout_prob": text.dropout, "attention_probs_dropout_prob": text.attn_dropout,
        "max_position_embeddings": text.max_position, "type_vocab_size": text.type_vocab_size,
        "initializer_range": text.init_std, "tie_word_embeddings": True,
    }
    if kind == LXMERT_KIND:
        outputs = heads.region_outputs
        return {
            "architectures": ["LxmertForPreTraining" if with_heads else "LxmertModel"], "model_type": "lxmert",
            **common, "l_layers": text.num_layers, "r_layers": cfg.vision.num_layers,
            "x_layers": cfg.cross.num_layers, "visual_feat_dim": cfg.region.feature_dim,
            "visual_pos_dim": cfg.region.geometry_dim,
            "task_mask_lm": heads.mlm, "task_matched": heads.itm, "task_obj_predict": bool(outputs),
            "task_qa": bool(heads.num_answers), "num_qa_labels": heads.num_answers or 1,
            "visual_obj_loss": "obj" in outputs, "visual_attr_loss": "attr" in outputs,
            "visual_feat_loss": "feat" in outputs, "num_object_labels": outputs.get("obj", 1),
            "num_attr_labels": outputs.get("attr", 1),
        }
    return {
        "architectures": ["VisualBertForPreTraining" if with_heads else "VisualBertModel"],
        "model_type": "visual_bert", **common, "num_hidden_layers": text.num_layers,
        "visual_embedding_dim": cfg.region.feature_dim, "layer_norm_eps": text.layer_norm_eps,
        "bypass_transformer": False, "special_visual_initialize": True, "pad_token_id": text.pad_token_id,
    }


# --------------------------------------------------------------------------------------------------------------
# Loading


class HFVLCheckpoint(NamedTuple):
    """A loaded Hugging Face LXMERT / VisualBERT directory: kind ("hf-lxmert" / "hf-visualbert"), our configs,
    its tensors in ``VLPretrainingModel`` names, and the weights file they came from."""

    kind: str
    cfg: FusionConfig
    heads: HeadsConfig
    state_dict: dict[str, torch.Tensor]
    source: Path


def _model_keys(cfg: FusionConfig, heads: HeadsConfig) -> list[str]:
    with torch.device("meta"):
        return list(build_pretraining_model(cfg, heads).state_dict())


def load_hf_vl(checkpoint_dir: str | os.PathLike, ignore_unknown: bool = False) -> HFVLCheckpoint:
    """Read a Hugging Face LXMERT or VisualBERT directory: its config as ours and its tensors renamed to ours.

    The heads follow the file: a head whose tensors are absent (a base-model file) is left out of the returned
    ``HeadsConfig``. A tensor with no counterpart (e.g. a fine-tuned task head) is a UserError naming it and the
    file, unless ``ignore_unknown``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    kind = detect_checkpoint_kind(checkpoint_dir)
    if kind not in (LXMERT_KIND, VISUALBERT_KIND):
        raise UserError(f"{checkpoint_dir} is a '{kind}' checkpoint, not a Hugging Face LXMERT or VisualBERT one")
    config_path = checkpoint_dir / "config.json"
    hf_json = read_json_file(config_path)
    from_hf = lxmert_configs_from_hf if kind == LXMERT_KIND else visualbert_configs_from_hf
    cfg, heads_cfg = from_hf(hf_json, config_path)
    hf_tensors, source = load_hf_weights(checkpoint_dir)
    hf_tensors = {key: value for key, value in hf_tensors.items() if not _IGNORED_HF_KEY.fullmatch(key)}
    prefix = _BASE_PREFIX[kind]
    if not any(key.startswith(prefix) for key in hf_tensors):  # a base-model file: no prefix, no heads
        hf_tensors = {(key if key.startswith(_HEAD_PREFIXES) else prefix + key): value
                      for key, value in hf_tensors.items()}
    # Keep the heads the file holds.
    region_outputs = {name: width for name, width in heads_cfg.region_outputs.items()
                      if f"obj_predict_head.decoder_dict.{name}.weight" in hf_tensors}
    heads_cfg = HeadsConfig(
        mlm=any(key.startswith("cls.predictions.") for key in hf_tensors),
        itm=any(key.startswith("cls.seq_relationship.") for key in hf_tensors),
        region_outputs=region_outputs,
        num_answers=heads_cfg.num_answers if any(key.startswith("answer_head.") for key in hf_tensors) else 0,
    )
    to_ours = {our_key_to_hf(key, kind): key for key in _model_keys(cfg, heads_cfg)}
    if kind == VISUALBERT_KIND:
        to_ours["cls.predictions.decoder.bias"] = "heads.mlm.decoder.bias"  # tied to cls.predictions.bias
    state_dict: dict[str, torch.Tensor] = {}
    first_name: dict[str, str] = {}
    unknown = []
    for hf_key, tensor in hf_tensors.items():
        key = to_ours.get(hf_key)
        if key is None:
            unknown.append(hf_key)
            continue
        if key in state_dict:
            if state_dict[key].shape != tensor.shape or not torch.equal(state_dict[key], tensor):
                raise UserError(f"checkpoint {source}: tensors '{first_name[key]}' and '{hf_key}' both map to "
                                f"'{key}' but differ")
            continue
        state_dict[key], first_name[key] = tensor, hf_key
    if unknown and not ignore_unknown:
        shown = ", ".join(f"'{key}'" for key in unknown[:5]) + (f" and {len(unknown) - 5} more"
                                                                  if len(unknown) > 5 else "")
        raise UserError(f"checkpoint {source} has tensors that are not part of {kind[3:]} pretraining: {shown}")
    if kind == VISUALBERT_KIND:
        state_dict.update(_swap_itm_rows(state_dict))
    return HFVLCheckpoint(kind=kind, cfg=cfg, heads=heads_cfg, state_dict=state_dict, source=source)


def load_hf_vl_model(checkpoint_dir: str | os.PathLike, ignore_unknown: bool = False
                     ) -> tuple[VLPretrainingModel, HFVLCheckpoint]:
    """A ``VLPretrainingModel`` built from a Hugging Face LXMERT / VisualBERT directory and loaded with its
    weights; every tensor of the model must be in the file (errors name the Hugging Face tensor)."""
    checkpoint = load_hf_vl(checkpoint_dir, ignore_unknown)
    model = build_pretraining_model(checkpoint.cfg, checkpoint.heads)
    kind = checkpoint.kind

    def describe(key: str) -> str:
        try:
            return our_key_to_hf(key, kind)
        except KeyError:
            return key

    load_into(model, checkpoint.state_dict, checkpoint.source, file_key=describe)
    return model, checkpoint


# --------------------------------------------------------------------------------------------------------------
# Exporting


def export_hf_vl(model: VLPretrainingModel, out_dir: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers`` loads as ``LxmertForPreTraining`` /
    ``VisualBertForPreTraining`` (or the base models when ``model`` has no heads). Returns ``out_dir``.

    Raises UserError when the architecture has no exact Hugging Face counterpart (see ``hf_architecture``).
    """
    if not isinstance(model, VLPretrainingModel):
        raise TypeError(f"export_hf_vl takes a VLPretrainingModel, not {type(model).__name__}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"export directory {out_dir} exists and is not a directory")
    heads_cfg = model.heads.cfg
    config = hf_config(model.cfg, heads_cfg)
    kind = hf_architecture(model.cfg, heads_cfg)
    base_only = config["architectures"][0] in ("LxmertModel", "VisualBertModel")
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key == "heads.mlm.decoder.weight":
            continue  # tied to the word embeddings; transformers ties it on load
        hf_key = our_key_to_hf(key, kind)
        if base_only:
            hf_key = hf_key.removeprefix(_BASE_PREFIX[kind])
        tensors[hf_key] = tensor
    if kind == VISUALBERT_KIND:
        swapped = _swap_itm_rows(model.state_dict())
        tensors.update({our_key_to_hf(key, kind): tensor for key, tensor in swapped.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(tensors, out_dir / "model.safetensors")
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


# --------------------------------------------------------------------------------------------------------------
# BERT into the text stream

_TEXT_FIELDS = ("vocab_size", "hidden_size", "num_heads", "intermediate_size", "max_position", "type_vocab_size",
                "activation")


def init_text_from_hf_bert(model: VLPretrainingModel | nn.Module, bert_dir: str | os.PathLike,
                           cross_layers: bool = True) -> LoadReport:
    """Initialise the text stream of ``model`` (a ``VLPretrainingModel`` or a bare fusion model) from a Hugging
    Face BERT directory, in place.

    Loaded: the text embeddings; BERT layer i into text layer i (single-stream: the joint encoder's layer i);
    the [CLS] pooler when the model pools with "text_cls"; the MLM head when the model has one. For LXMERT, with
    ``cross_layers``, BERT layers N_l .. N_l + N_x - 1 (those that exist) initialise the language self-attention
    and feed-forward of the cross-modality layers. VisualBERT's visual type / position tables are then copied
    from the loaded text tables, as VisualBERT initialises them. Region embeddings, the vision stream, the
    cross-attention and the ITM / region / answer heads keep their values.

    The BERT config must match the text config (width, heads, feed-forward, vocabulary, positions, segments,
    activation) and have at least as many layers as the text stream; otherwise a UserError names the field.
    """
    fusion = model.fusion if isinstance(model, VLPretrainingModel) else model
    prefix = "fusion." if isinstance(model, VLPretrainingModel) else ""
    cfg: FusionConfig = fusion.cfg
    checkpoint = load_hf_bert(bert_dir, ignore_unknown=True)
    bert_cfg = checkpoint.cfg
    for name in _TEXT_FIELDS:
        if getattr(bert_cfg, name) != getattr(cfg.text, name):
            raise UserError(f"BERT checkpoint {bert_dir}: {name} is {getattr(bert_cfg, name)!r} but the model's "
                            f"text.{name} is {getattr(cfg.text, name)!r}")
    if bert_cfg.num_layers < cfg.text.num_layers:
        raise UserError(f"BERT checkpoint {bert_dir} has {bert_cfg.num_layers} layers; the text stream needs "
                        f"{cfg.text.num_layers}")
    single = cfg.fusion == "single_stream"
    lxmert = not single and cfg.cross.kind == "lxmert"
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in checkpoint.state_dict.items():
        target = None
        if key.startswith("text_encoder.embeddings."):
            target = "text_embeddings." + key.removeprefix("text_encoder.embeddings.")
        elif key.startswith("text_encoder.pooler.") and cfg.pooling == "text_cls":
            target = "pooler." + key.removeprefix("text_encoder.pooler.")
        elif match := re.fullmatch(r"text_encoder\.encoder\.layers\.(\d+)\.(.+)", key):
            index, rest = int(match.group(1)), match.group(2)
            if index < cfg.text.num_layers:
                target = f"{'encoder.layers' if single else 'text_layers'}.{index}.{rest}"
            elif lxmert and cross_layers and index < cfg.text.num_layers + cfg.cross.num_layers:
                target = f"cross_layers.{index - cfg.text.num_layers}.text_layer.{rest}"
        if target is not None:
            renamed[prefix + target] = tensor
        elif key.startswith("mlm.") and isinstance(model, VLPretrainingModel) and model.heads.mlm is not None:
            renamed["heads." + key] = tensor
    report = load_into(model, renamed, checkpoint.source, strict=False)
    text_prefixes = tuple(prefix + name for name in ("text_embeddings.", "encoder.layers.", "text_layers."))
    not_loaded = [key for key in report.missing if key.startswith(text_prefixes)]
    if not_loaded:
        raise UserError(f"BERT checkpoint {checkpoint.source} lacks tensors for the text stream, e.g. "
                        f"'{not_loaded[0]}'")
    init_visual_tables(fusion.text_embeddings, fusion.region_embeddings)
    return report
