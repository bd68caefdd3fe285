"""Hugging Face BERT checkpoints (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``) to and from
our text core.

The file's names map onto ``BertPretrainingModel``'s (``vl/text/bert.py``)::

    [bert.]embeddings.{word,position,token_type}_embeddings   text_encoder.embeddings.{...}_embeddings
    [bert.]embeddings.LayerNorm                                text_encoder.embeddings.norm
    [bert.]encoder.layer.{i}.attention.self.{query,key,value}  text_encoder.encoder.layers.{i}.attention.{...}
    [bert.]encoder.layer.{i}.attention.output.dense            text_encoder.encoder.layers.{i}.attention.out
    [bert.]encoder.layer.{i}.attention.output.LayerNorm        text_encoder.encoder.layers.{i}.attention_residual.norm
    [bert.]encoder.layer.{i}.intermediate.dense                text_encoder.encoder.layers.{i}.ffn.fc_in
    [bert.]encoder.layer.{i}.output.dense                      text_encoder.encoder.layers.{i}.ffn.fc_out
    [bert.]encoder.layer.{i}.output.LayerNorm                  text_encoder.encoder.layers.{i}.ffn_residual.norm
    [bert.]pooler.dense                                        text_encoder.pooler.dense
    cls.predictions.transform.dense / .LayerNorm               mlm.transform.dense / mlm.transform.norm
    cls.predictions.decoder.weight                             mlm.decoder.weight (= the word embeddings)
    cls.predictions.bias, cls.predictions.decoder.bias         mlm.decoder.bias
    cls.seq_relationship                                       nsp

The ``bert.`` prefix is present in ``BertForPreTraining``/``BertForMaskedLM`` files and absent in ``BertModel``
files; old TensorFlow-converted files name LayerNorm parameters ``gamma``/``beta``. Both are accepted.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

from vl.checkpoints.io import (
    LoadReport,
    detect_checkpoint_kind,
    load_hf_weights,
    load_into,
    read_json_file,
    save_weights,
)
from vl.config import atomic_write_text
from vl.text.bert import BertPretrainingModel
from vl.encoders.text import TextEncoder, TextEncoderConfig
from vl.errors import UserError

# Hugging Face ``hidden_act`` -> our activation name (``vl.encoders.transformer.activation_fn``).
HF_TO_OUR_ACTIVATION = {
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_new",  # the same tanh approximation
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
OUR_TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_tanh": "gelu_new",
                        "gelu_pytorch_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}

# BertConfig's defaults, used for keys a config.json leaves out.
HF_BERT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}

# Module names outside the layer stack: (Hugging Face, ours).
_MODULE_NAMES = (
    ("bert.embeddings.word_embeddings", "text_encoder.embeddings.word_embeddings"),
    ("bert.embeddings.position_embeddings", "text_encoder.embeddings.position_embeddings"),
    ("bert.embeddings.token_type_embeddings", "text_encoder.embeddings.token_type_embeddings"),
    ("bert.embeddings.LayerNorm", "text_encoder.embeddings.norm"),
    ("bert.pooler.dense", "text_encoder.pooler.dense"),
    ("cls.predictions.transform.dense", "mlm.transform.dense"),
    ("cls.predictions.transform.LayerNorm", "mlm.transform.norm"),
    ("cls.predictions.decoder", "mlm.decoder"),
    ("cls.seq_relationship", "nsp"),
)
# Module names inside layer i: (Hugging Face under bert.encoder.layer.{i}, ours under text_encoder.encoder.layers.{i}).
_LAYER_MODULE_NAMES = (
    ("attention.self.query", "attention.query"),
    ("attention.self.key", "attention.key"),
    ("attention.self.value", "attention.value"),
    ("attention.output.dense", "attention.out"),
    ("attention.output.LayerNorm", "attention_residual.norm"),
    ("intermediate.dense", "ffn.fc_in"),
    ("output.dense", "ffn.fc_out"),
    ("output.LayerNorm", "ffn_residual.norm"),
)
_HF_MODULES = dict(_MODULE_NAMES)
_OUR_MODULES = {ours: hf for hf, ours in _MODULE_NAMES}
_HF_LAYER_MODULES = dict(_LAYER_MODULE_NAMES)
_OUR_LAYER_MODULES = {ours: hf for hf, ours in _LAYER_MODULE_NAMES}
_HF_LAYER = re.compile(r"bert\.encoder\.layer\.(\d+)\.(.+)")
_OUR_LAYER = re.compile(r"text_encoder\.encoder\.layers\.(\d+)\.(.+)")
# Non-persistent buffers that some transformers versions wrote into the file; they carry no weights.
_IGNORED_HF_KEY = re.compile(r"(bert\.)?embeddings\.(position_ids|token_type_ids)")

# Which head a key of ours belongs to; the heads a checkpoint holds decide what may stay at its initial values.
HEAD_PREFIXES = {"pooler": "text_encoder.pooler.", "mlm": "mlm.", "nsp": "nsp."}


def hf_key_to_ours(hf_key: str) -> str | None:
    """Our ``BertPretrainingModel`` name for a Hugging Face BERT tensor name, or None when it is not BERT's."""
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", hf_key)
    key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
    if not key.startswith(("bert.", "cls.")):
        key = "bert." + key  # a BertModel file: no prefix
    if key == "cls.predictions.bias":
        return "mlm.decoder.bias"
    if "." not in key:
        return None
    module, leaf = key.rsplit(".", 1)
    if leaf not in ("weight", "bias"):
        return None
    layer = _HF_LAYER.fullmatch(module)
    if layer:
        ours = _HF_LAYER_MODULES.get(layer.group(2))
        return f"text_encoder.encoder.layers.{layer.group(1)}.{ours}.{leaf}" if ours else None
    ours = _HF_MODULES.get(module)
    return f"{ours}.{leaf}" if ours else None


def our_key_to_hf(key: str) -> str:
    """The Hugging Face ``BertForPreTraining`` name of one of our ``BertPretrainingModel`` tensor names."""
    if key == "mlm.decoder.bias":
        return "cls.predictions.bias"
    module, leaf = key.rsplit(".", 1)
    layer = _OUR_LAYER.fullmatch(module)
    if layer:
        hf_module = _OUR_LAYER_MODULES.get(layer.group(2))
        hf = f"bert.encoder.layer.{layer.group(1)}.{hf_module}" if hf_module else None
    else:
        hf = _OUR_MODULES.get(module)
    if hf is None:
        raise KeyError(f"'{key}' has no Hugging Face BERT name")
    return f"{hf}.{leaf}"


def _config_value(config: dict[str, Any], key: str, kind: type, source: str) -> Any:
    value = config.get(key, HF_BERT_DEFAULTS[key])
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise UserError(f"{source}: '{key}' must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{source}: '{key}' must be a number, got {value!r}")
        value = float(value)
    return value


def text_config_from_hf(config: dict[str, Any], source: str | os.PathLike = "config.json") -> TextEncoderConfig:
    """Our ``TextEncoderConfig`` for a Hugging Face BERT ``config.json`` mapping; keys it leaves out take
    ``BertConfig``'s defaults. Variants the core does not implement (relative position embeddings, decoder or
    cross-attention BERT, other activations) are a UserError naming ``source``."""
    source = str(source)
    model_type = config.get("model_type", "bert")
    if model_type != "bert":
        raise UserError(f"{source}: model_type {model_type!r} is not a BERT checkpoint (expected 'bert')")
    position_type = config.get("position_embedding_type", "absolute")
    if position_type not in (None, "absolute"):
        raise UserError(f"{source}: position_embedding_type {position_type!r} is not supported (only 'absolute')")
    for flag in ("is_decoder", "add_cross_attention"):
        if config.get(flag):
            raise UserError(f"{source}: '{flag}: true' is not supported; only encoder BERT checkpoints load")
    hidden_act = config.get("hidden_act", HF_BERT_DEFAULTS["hidden_act"])
    if hidden_act not in HF_TO_OUR_ACTIVATION:
        raise UserError(f"{source}: hidden_act {hidden_act!r} is not supported "
                        f"(supported: {', '.join(HF_TO_OUR_ACTIVATION)})")
    pad_token_id = config.get("pad_token_id", HF_BERT_DEFAULTS["pad_token_id"])
    if pad_token_id is None:
        pad_token_id = 0  # only decides which embedding row gets no gradient; the weights load the same
    config = {**config, "pad_token_id": pad_token_id}
    try:
        return TextEncoderConfig(
            vocab_size=_config_value(config, "vocab_size", int, source),
            hidden_size=_config_value(config, "hidden_size", int, source),
            num_layers=_config_value(config, "num_hidden_layers", int, source),
            num_heads=_config_value(config, "num_attention_heads", int, source),
            intermediate_size=_config_value(config, "intermediate_size", int, source),
            max_position=_config_value(config, "max_position_embeddings", int, source),
            type_vocab_size=_config_value(config, "type_vocab_size", int, source),
            dropout=_config_value(config, "hidden_dropout_prob", float, source),
            attn_dropout=_config_value(config, "attention_probs_dropout_prob", float, source),
            layer_norm_eps=_config_value(config, "layer_norm_eps", float, source),
            activation=HF_TO_OUR_ACTIVATION[hidden_act],
            pre_ln=False,
            pad_token_id=_config_value(config, "pad_token_id", int, source),
            init_std=_config_value(config, "initializer_range", float, source),
        )
    except ValueError as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"{source}: {err}") from None


def hf_config_from_text(cfg: TextEncoderConfig, architecture: str = "BertForPreTraining") -> dict[str, Any]:
    """The Hugging Face ``config.json`` mapping for ``cfg``; pre-LN stacks have no BERT equivalent."""
    if cfg.pre_ln:
        raise UserError("cannot export a pre-LN text encoder as a Hugging Face BERT checkpoint (BERT is post-LN)")
    if cfg.activation not in OUR_TO_HF_ACTIVATION:
        raise UserError(f"cannot export activation '{cfg.activation}' as a Hugging Face BERT hidden_act")
    return {
        "architectures": [architecture],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": OUR_TO_HF_ACTIVATION[cfg.activation],
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attn_dropout,
        "max_position_embeddings": cfg.max_position,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }


class HFBertCheckpoint(NamedTuple):
    """A loaded Hugging Face BERT directory. state_dict: tensors in ``BertPretrainingModel`` names; heads: which
    of "pooler", "mlm", "nsp" the file holds; source: the weights file (or shard index) they came from;
    file_names: our name -> the tensor's name in the file."""

    cfg: TextEncoderConfig
    state_dict: dict[str, torch.Tensor]
    heads: frozenset[str]
    source: Path
    file_names: dict[str, str]

    def file_key(self, key: str) -> str:
        """The name tensor ``key`` (ours) has, or would have, in this checkpoint's file; for error messages."""
        if key in self.file_names:
            return self.file_names[key]
        try:
            hf_key = our_key_to_hf(key)
        except KeyError:
            return key
        prefixed = any(name.startswith("bert.") for name in self.file_names.values())
        return hf_key if prefixed or not hf_key.startswith("bert.") else hf_key.removeprefix("bert.")


def load_hf_bert(checkpoint_dir: str | os.PathLike, ignore_unknown: bool = False) -> HFBertCheckpoint:
    """Read a Hugging Face BERT directory: its config as ours, and its tensors renamed to ours.

    A tensor that is not part of BERT or its pretraining heads (e.g. a fine-tuned ``classifier``) is a UserError
    naming it and the file, unless ``ignore_unknown``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    kind = detect_checkpoint_kind(checkpoint_dir)
    if kind != "hf-bert":
        raise UserError(f"{checkpoint_dir} is a '{kind}' checkpoint, not a Hugging Face BERT one (config.json)")
    config_path = checkpoint_dir / "config.json"
    cfg = text_config_from_hf(read_json_file(config_path), config_path)
    hf_tensors, source = load_hf_weights(checkpoint_dir)
    state_dict: dict[str, torch.Tensor] = {}
    first_name: dict[str, str] = {}
    unknown = []
    for hf_key, tensor in hf_tensors.items():
        if _IGNORED_HF_KEY.fullmatch(hf_key):
            continue
        key = hf_key_to_ours(hf_key)
        if key is None:
            unknown.append(hf_key)
            continue
        if key in state_dict:  # e.g. both cls.predictions.bias and cls.predictions.decoder.bias
            if state_dict[key].shape != tensor.shape or not torch.equal(state_dict[key], tensor):
                raise UserError(f"checkpoint {source}: tensors '{first_name[key]}' and '{hf_key}' both map to "
                                f"'{key}' but differ")
            continue
        state_dict[key], first_name[key] = tensor, hf_key
    if unknown and not ignore_unknown:
        shown = ", ".join(f"'{key}'" for key in unknown[:5])
        if len(unknown) > 5:
            shown += f" and {len(unknown) - 5} more"
        raise UserError(f"checkpoint {source} has tensors that are not part of BERT pretraining: {shown}")
    heads = frozenset(head for head, prefix in HEAD_PREFIXES.items()
                      if any(key.startswith(prefix) and key != "mlm.decoder.weight" for key in state_dict))
    return HFBertCheckpoint(cfg=cfg, state_dict=state_dict, heads=heads, source=source, file_names=first_name)


def load_hf_bert_model(checkpoint_dir: str | os.PathLike, ignore_unknown: bool = False
                       ) -> tuple[BertPretrainingModel, LoadReport]:
    """A ``BertPretrainingModel`` built from a Hugging Face BERT directory's config and loaded with its weights.

    Every encoder tensor must be present with its shape. Heads the file lacks entirely (a ``BertModel`` file has
    no MLM/NSP heads, a ``BertForMaskedLM`` file no pooler or NSP head) keep their initial values and are listed
    in the report's ``missing``; a head that is only partly present is an error naming the missing tensor.
    """
    checkpoint = load_hf_bert(checkpoint_dir, ignore_unknown)
    model = BertPretrainingModel(checkpoint.cfg)
    absent = [prefix for head, prefix in HEAD_PREFIXES.items() if head not in checkpoint.heads]
    report = load_into(model, checkpoint.state_dict, checkpoint.source, allow_missing=absent,
                       file_key=checkpoint.file_key)
    return model, report


def export_hf_bert(model: BertPretrainingModel | TextEncoder, cfg: TextEncoderConfig,
                   out_dir: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers`` loads as ``BertForPreTraining`` (from a
    ``BertPretrainingModel``) or ``BertModel`` (from a ``TextEncoder``). Returns ``out_dir``.

    The MLM decoder weight is not written: Hugging Face ties it to the word embeddings on load, as we do.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"export directory {out_dir} exists and is not a directory")
    if isinstance(model, BertPretrainingModel):
        architecture, ours, encoder = "BertForPreTraining", model.state_dict(), model.text_encoder
    elif isinstance(model, TextEncoder):
        architecture, encoder = "BertModel", model
        ours = {"text_encoder." + key: value for key, value in model.state_dict().items()}
    else:
        raise TypeError(f"export_hf_bert takes a BertPretrainingModel or TextEncoder, not {type(model).__name__}")
    if encoder.cfg != cfg:
        raise ValueError("export_hf_bert: cfg differs from the config the model was built with")
    hf_config = hf_config_from_text(cfg, architecture)
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in ours.items():
        if key == "mlm.decoder.weight":
            continue  # tied to the word embeddings
        hf_key = our_key_to_hf(key)
        if architecture == "BertModel":
            hf_key = hf_key.removeprefix("bert.")
        tensors[hf_key] = tensor
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(tensors, out_dir / "model.safetensors")
    atomic_write_text(out_dir / "config.json", json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return out_dir

